// cross_attention(_varlen) backward, the CUDA kernel: delta pre-pass, dQ kernel, dK/dV kernel
// (deterministic: every gradient element is written by exactly one thread, no atomics).

#include <ATen/ops/empty.h>

#include "attention/attention_kernels.h"
#include "attention/cuda/attention_tiles.cuh"
#include "common/dispatch.h"

namespace embedops {
namespace attn_cuda {

void backward_into(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse,
                   const SeqDesc& desc, double scale, bool varlen, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), D = q.size(-1), Dv = v.size(-1);
  if (q.numel() == 0 || k.numel() == 0 || dv.numel() == 0) return;
  const int64_t qtiles = (desc.max_q_slot + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t ktiles = (desc.max_k + kRowsPerBlock - 1) / kRowsPerBlock;
  check_cuda_limits(op, D, Dv, std::max(qtiles, ktiles) * desc.batch, Hq);
  if (qtiles == 0 || ktiles == 0) return;
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const at::Tensor seq = seq_desc_on_device(desc, q.device());
  const SeqPtrs sp{seq.const_data_ptr<int64_t>(), desc.batch};
  const Dims dq_dims{desc.batch, Hq, Hkv, D, Dv, qtiles};
  const Dims dk_dims{desc.batch, Hq, Hkv, D, Dv, ktiles};
  const int64_t lse_sb = varlen ? 0 : lse.stride(0), lse_sh = varlen ? lse.stride(0) : lse.stride(1);
  const dim3 qgrid(static_cast<unsigned>(qtiles * desc.batch), static_cast<unsigned>(Hq));
  const dim3 kgrid(static_cast<unsigned>(ktiles * desc.batch), static_cast<unsigned>(Hkv));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EMBEDOPS_DISPATCH_FLOATING(q.scalar_type(), "cross_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto Q = rows_of<const scalar_t>(q, varlen), K = rows_of<const scalar_t>(k, varlen),
               V = rows_of<const scalar_t>(v, varlen), O = rows_of<const scalar_t>(out, varlen),
               dO = rows_of<const scalar_t>(dout, varlen);
    delta_kernel<scalar_t, acc_t><<<qgrid, kThreads, 0, stream>>>(
        O, dO, dlse.defined() ? dlse.const_data_ptr<acc_t>() : nullptr, delta.data_ptr<acc_t>(), lse_sb, lse_sh, sp,
        dq_dims);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const size_t smem_q = dq_smem<acc_t>(D, Dv);
    auto kq = dq_kernel<scalar_t, acc_t>;
    prepare_smem(op, reinterpret_cast<const void*>(kq), smem_q, q);
    kq<<<qgrid, kThreads, smem_q, stream>>>(Q, K, V, dO, lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
                                           lse_sb, lse_sh, rows_of<scalar_t>(dq, varlen), sp, dq_dims,
                                           static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const size_t smem_k = dkdv_smem<acc_t>(D, Dv);
    auto kk = dkdv_kernel<scalar_t, acc_t>;
    prepare_smem(op, reinterpret_cast<const void*>(kk), smem_k, q);
    kk<<<kgrid, kThreads, smem_k, stream>>>(Q, K, V, dO, lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
                                           lse_sb, lse_sh, rows_of<scalar_t>(dk, varlen), rows_of<scalar_t>(dv, varlen),
                                           sp, dk_dims, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace attn_cuda

namespace {

void cross_attention_backward_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                   const at::Tensor& dlse, const SeqDesc& desc, double scale, bool varlen,
                                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  attn_cuda::backward_into(varlen ? "cross_attention_varlen_backward" : "cross_attention_backward", dout, q, k, v,
                           out, lse, dlse, desc, scale, varlen, dq, dk, dv);
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(cross_attention_backward_stub, &cross_attention_backward_cuda);

}  // namespace embedops
