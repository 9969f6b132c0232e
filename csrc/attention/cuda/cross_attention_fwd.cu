// cross_attention / cross_attention_varlen forward, the CUDA kernel (tiles in attention_tiles.cuh;
// the host side, shared with the CPU, is cross_attention.cpp).

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "attention/attention_kernels.h"
#include "attention/cuda/attention_tiles.cuh"
#include "attention/cuda/cross_attention_tc.h"
#include "common/dispatch.h"

namespace embedops {
namespace attn_cuda {

void check_cuda_limits(const char* op, int64_t D, int64_t Dv, int64_t blocks_x, int64_t heads) {
  TORCH_CHECK_VALUE(heads <= 65535, op, ": the CUDA kernels support up to 65535 heads, got ", heads);
  TORCH_CHECK_VALUE(D <= kMaxHeadDim && Dv <= kMaxHeadDim, op, ": the CUDA kernels support head dims up to ",
                    kMaxHeadDim, ", got D = ", D, ", Dv = ", Dv);
  TORCH_CHECK_VALUE(blocks_x <= INT32_MAX, op, ": too many (batch, tile) blocks for one launch: ", blocks_x);
}

void prepare_smem(const char* op, const void* kernel, size_t smem, const at::Tensor& like) {
  int dev = like.get_device(), optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK_VALUE(smem <= static_cast<size_t>(optin), op, ": head dims too large for this GPU's shared memory (",
                    smem, " bytes needed, ", optin, " available); use smaller head dims or float16/bfloat16/float32");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
}

// Split-KV: when the (query tile, head, batch) blocks cannot fill the GPU (latent queries over
// thousands of keys), the keys are split so that there are about two blocks per SM, at least 512
// keys per split; EMBEDOPS_ATTN_SPLIT_KV=0 turns it off. Returns the number of splits (1 = none).
int64_t choose_splits(int64_t blocks, int64_t max_k, const at::Tensor& like, int64_t* split_keys) {
  *split_keys = 0;
  const char* env = std::getenv("EMBEDOPS_ATTN_SPLIT_KV");
  if (env != nullptr && std::strcmp(env, "0") == 0) return 1;
  if (max_k < 2048 || blocks <= 0) return 1;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device()));
  if (blocks >= sms) return 1;
  int64_t n = std::min<int64_t>({(2 * static_cast<int64_t>(sms) + blocks - 1) / blocks, max_k / 512, 1024});
  if (n < 2) return 1;
  *split_keys = ((max_k + n - 1) / n + kTile - 1) / kTile * kTile;
  return (max_k + *split_keys - 1) / *split_keys;
}

void forward_into(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const SeqDesc& desc, double scale, bool varlen, at::Tensor& out, at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), D = q.size(-1), Dv = v.size(-1);
  if (out.numel() == 0) return;
  if (tensor_core_forward_enabled(q, D, Dv)) {  // opt-in, see cross_attention_tc.cu
    forward_tensor_cores(op, q, k, v, out, lse, desc, scale, varlen);
    return;
  }
  const int64_t ntiles = (desc.max_q_slot + kRowsPerBlock - 1) / kRowsPerBlock;
  check_cuda_limits(op, D, Dv, ntiles * desc.batch, Hq);
  if (ntiles == 0) return;
  const at::Tensor seq = seq_desc_on_device(desc, q.device());
  const SeqPtrs sp{seq.const_data_ptr<int64_t>(), desc.batch};
  const Dims dm{desc.batch, Hq, Hkv, D, Dv, ntiles};
  const int64_t lse_sb = varlen ? 0 : lse.stride(0), lse_sh = varlen ? lse.stride(0) : lse.stride(1);
  int64_t split_keys = 0;
  const int64_t nsplit = choose_splits(ntiles * desc.batch * Hq, desc.max_k, q, &split_keys);
  const dim3 grid(static_cast<unsigned>(ntiles * desc.batch), static_cast<unsigned>(Hq), static_cast<unsigned>(nsplit));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EMBEDOPS_DISPATCH_FLOATING(q.scalar_type(), "cross_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = forward_smem<acc_t>(D, Dv);
    auto kernel = forward_kernel<scalar_t, acc_t>;
    prepare_smem(op, reinterpret_cast<const void*>(kernel), smem, q);
    SplitKV<acc_t> split;
    at::Tensor part_o, part_lse;
    if (nsplit > 1) {
      const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      part_o = at::empty({nsplit, desc.batch, Hq, desc.max_q_slot, Dv}, acc_opts);
      part_lse = at::empty({nsplit, desc.batch, Hq, desc.max_q_slot}, acc_opts);
      split = SplitKV<acc_t>{part_o.data_ptr<acc_t>(), part_lse.data_ptr<acc_t>(), split_keys, desc.max_q_slot};
    }
    kernel<<<grid, kThreads, smem, stream>>>(rows_of<const scalar_t>(q, varlen), rows_of<const scalar_t>(k, varlen),
                                             rows_of<const scalar_t>(v, varlen), rows_of<scalar_t>(out, varlen),
                                             lse.data_ptr<acc_t>(), lse_sb, lse_sh, sp, dm, static_cast<acc_t>(scale),
                                             split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nsplit > 1) {
      const dim3 cgrid(static_cast<unsigned>(ntiles * desc.batch), static_cast<unsigned>(Hq));
      combine_kernel<scalar_t, acc_t><<<cgrid, kThreads, 0, stream>>>(split, nsplit, rows_of<scalar_t>(out, varlen),
                                                                      lse.data_ptr<acc_t>(), lse_sb, lse_sh, sp, dm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace attn_cuda

namespace {

void cross_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const SeqDesc& desc,
                                  double scale, bool varlen, at::Tensor& out, at::Tensor& lse) {
  attn_cuda::forward_into(varlen ? "cross_attention_varlen" : "cross_attention", q, k, v, desc, scale, varlen, out,
                          lse);
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(cross_attention_forward_stub, &cross_attention_forward_cuda);

}  // namespace embedops
