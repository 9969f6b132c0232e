// co_attention / mixture_attention, the CUDA kernels, built from the cross_attention CUDA kernels
// (forward_into / backward_into on a SeqDesc, attention_tiles.cuh); the host side, shared with the
// CPU, is co_mixture_attention.cpp. These are the simple, careful
// versions: they reuse the tested tiles and online-softmax math instead of fusing further.
//
// co_attention: two passes of the cross_attention kernels, x -> y (rows) and y -> x (columns,
// queries ky against keys qx). The affinity is therefore computed twice on the GPU (the CPU kernel
// computes each tile once); the backward sums both directions' dS contributions, which is exactly
// the shared dS = Pr (dPr - Dr) + Pc (dPc - Dc). Deterministic (no atomics).
// mixture_attention: one cross_attention pass per modality with the segment as the key range
// (SeqDesc k_start per batch), seg_out / lse stored per modality, out = sum_m w_m seg_out_m in
// float32 (float64 for float64). Backward per modality with dO_m = w_m dO (so delta = w_m dalpha_m),
// dalpha_m = dO . seg_out_m; dQ summed over modalities in float32, dK/dV rows are disjoint.

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "attention/attention_kernels.h"
#include "attention/co_mixture_attention.h"
#include "attention/cuda/attention_tiles.cuh"

namespace embedops {
namespace {

using namespace attn_cuda;

struct CoSeqs {
  SeqDesc rows, cols;  // x -> y (queries qx, keys ky) and y -> x (queries ky, keys qx)
};

CoSeqs co_seqs(const CoDesc& cd, int64_t B, int64_t Lx, int64_t Ly) {
  const std::vector<int64_t> zeros(B, 0);
  return {make_seq_desc(B, cd.xlen.data(), Lx, zeros.data(), cd.ylen.data()),
          make_seq_desc(B, cd.ylen.data(), Ly, zeros.data(), cd.xlen.data())};
}

void co_attention_forward_cuda(const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                               const at::Tensor& vy, const CoDesc& cd, double scale, at::Tensor& ox, at::Tensor& oy,
                               at::Tensor& lse_x, at::Tensor& lse_y) {
  const c10::cuda::CUDAGuard guard(qx.device());
  const CoSeqs s = co_seqs(cd, qx.size(0), qx.size(1), ky.size(1));
  forward_into("co_attention", qx, ky, vy, s.rows, scale, false, ox, lse_x);
  forward_into("co_attention", ky, qx, vx, s.cols, scale, false, oy, lse_y);
}

void co_attention_backward_cuda(const at::Tensor& dox, const at::Tensor& doy, const at::Tensor& qx,
                                const at::Tensor& ky, const at::Tensor& vx, const at::Tensor& vy,
                                const at::Tensor& ox, const at::Tensor& oy, const at::Tensor& lse_x,
                                const at::Tensor& lse_y, const at::Tensor& dlse_x, const at::Tensor& dlse_y,
                                const CoDesc& cd, double scale, at::Tensor& dqx, at::Tensor& dky, at::Tensor& dvx,
                                at::Tensor& dvy) {
  constexpr const char* op = "co_attention_backward";
  const c10::cuda::CUDAGuard guard(qx.device());
  const CoSeqs s = co_seqs(cd, qx.size(0), qx.size(1), ky.size(1));
  backward_into(op, dox, qx, ky, vy, ox, lse_x, dlse_x, s.rows, scale, false, dqx, dky, dvy);
  at::Tensor dky_c = at::zeros(ky.sizes(), ky.options()), dqx_c = at::zeros(qx.sizes(), qx.options());
  backward_into(op, doy, ky, qx, vx, oy, lse_y, dlse_y, s.cols, scale, false, dky_c, dqx_c, dvx);
  dqx.add_(dqx_c);
  dky.add_(dky_c);
}

// The SeqDesc of modality m: every query row, keys [start, start + len) of the segment.
SeqDesc modality_desc(const MixDesc& md, int64_t B, int64_t Lq, int64_t m) {
  std::vector<int64_t> ql(B, Lq), ks(B), kl(B);
  for (int64_t b = 0; b < B; ++b) {
    ks[b] = md.start[b * md.M + m];
    kl[b] = md.len[b * md.M + m];
  }
  return make_seq_desc(B, ql.data(), Lq, ks.data(), kl.data());
}

// weights as (B, Lq, 1 or Hq, M)
at::Tensor weights4(const at::Tensor& w) { return w.dim() == 3 ? w.unsqueeze(2) : w; }

void mixture_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& weights, const MixDesc& md, double scale, at::Tensor& out,
                                    at::Tensor& lse, at::Tensor& seg_out) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), Dv = v.size(3), M = md.M;
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor sum = at::zeros({B, Lq, Hq, Dv}, q.options().dtype(acc));
  const at::Tensor w4 = weights4(weights);
  for (int64_t m = 0; m < M; ++m) {
    at::Tensor om = at::empty({B, Lq, Hq, Dv}, q.options());
    at::Tensor lm = at::empty({B, Hq, Lq}, q.options().dtype(acc));
    forward_into("mixture_attention", q, k, v, modality_desc(md, B, Lq, m), scale, false, om, lm);
    seg_out.select(3, m).copy_(om);
    lse.select(3, m).copy_(lm);
    sum.add_(om.to(acc).mul(w4.select(3, m).unsqueeze(-1).to(acc)));
  }
  out.copy_(sum);
}

void mixture_attention_backward_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& weights, const at::Tensor& seg_out,
                                     const at::Tensor& lse, const MixDesc& md, double scale, at::Tensor& dq,
                                     at::Tensor& dk, at::Tensor& dv, at::Tensor& dw4) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Lq = q.size(1), M = md.M;
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor dq_sum = at::zeros(q.sizes(), q.options().dtype(acc));
  const at::Tensor w4 = weights4(weights);
  const at::Tensor dout_acc = dout.to(acc);
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor som = seg_out.select(3, m);  // (B, Lq, Hq, Dv), last dim contiguous
    dw4.select(3, m).copy_(dout_acc.mul(som.to(acc)).sum(-1));  // dalpha_m = dO . O_m
    const at::Tensor dout_m = dout_acc.mul(w4.select(3, m).unsqueeze(-1).to(acc)).to(q.scalar_type());
    at::Tensor dqm = at::zeros(q.sizes(), q.options()), dkm = at::zeros(k.sizes(), k.options()),
               dvm = at::zeros(v.sizes(), v.options());
    backward_into("mixture_attention_backward", dout_m, q, k, v, som, lse.select(3, m).contiguous(), at::Tensor(),
                  modality_desc(md, B, Lq, m), scale, false, dqm, dkm, dvm);
    dq_sum.add_(dqm.to(acc));
    dk.add_(dkm);  // the segments' key rows are disjoint: exact
    dv.add_(dvm);
  }
  dq.copy_(dq_sum);
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(co_attention_forward_stub, &co_attention_forward_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(co_attention_backward_stub, &co_attention_backward_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(mixture_attention_forward_stub, &mixture_attention_forward_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(mixture_attention_backward_stub, &mixture_attention_backward_cuda);

}  // namespace embedops
