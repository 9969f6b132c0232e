// co_attention / mixture_attention on CUDA (issue 6), built from the cross_attention CUDA kernels
// of attention_cuda.cuh (forward_cuda / backward_cuda on a SeqDesc). These are the simple, careful
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
#include <limits>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "attention/co_mixture_attention.h"
#include "attention/attention_cuda.cuh"

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_cuda(
    const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx, const at::Tensor& vy,
    const std::optional<at::Tensor>& x_lengths, const std::optional<at::Tensor>& y_lengths,
    std::optional<double> scale) {
  const char* op = "co_attention";
  const CoDesc cd = check_co_attention_args(op, qx, ky, vx, vy, x_lengths, y_lengths);
  const double sc = resolve_scale(op, scale, qx.size(3));
  const c10::cuda::CUDAGuard guard(qx.device());
  const CoSeqs s = co_seqs(cd, qx.size(0), qx.size(1), ky.size(1));
  auto [ox, lse_x] = forward_cuda(op, qx, ky, vy, s.rows, sc, false);
  auto [oy, lse_y] = forward_cuda(op, ky, qx, vx, s.cols, sc, false);
  return {ox, oy, lse_x, lse_y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_backward_cuda(
    const at::Tensor& dox, const at::Tensor& doy, const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
    const at::Tensor& vy, const at::Tensor& ox, const at::Tensor& oy, const at::Tensor& lse_x, const at::Tensor& lse_y,
    const std::optional<at::Tensor>& dlse_x, const std::optional<at::Tensor>& dlse_y,
    const std::optional<at::Tensor>& x_lengths, const std::optional<at::Tensor>& y_lengths, double scale) {
  const char* op = "co_attention_backward";
  const CoDesc cd = check_co_attention_backward_args(op, dox, doy, qx, ky, vx, vy, ox, oy, lse_x, lse_y, dlse_x,
                                                     dlse_y, x_lengths, y_lengths);
  const int64_t B = qx.size(0), Lx = qx.size(1), Ly = ky.size(1);
  const c10::cuda::CUDAGuard guard(qx.device());
  const CoSeqs s = co_seqs(cd, B, Lx, Ly);
  auto [dqx, dky, dvy] = backward_cuda(op, dox, qx, ky, vy, ox, lse_x, dlse_x, s.rows, scale, false);
  auto [dky_c, dqx_c, dvx] = backward_cuda(op, doy, ky, qx, vx, oy, lse_y, dlse_y, s.cols, scale, false);
  dqx.add_(dqx_c);
  dky.add_(dky_c);
  return {dqx, dky, dvx, dvy};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& seg,
                                                                      const at::Tensor& weights,
                                                                      std::optional<double> scale) {
  const char* op = "mixture_attention";
  const MixDesc md = check_mixture_args(op, q, k, v, seg, weights);
  const double sc = resolve_scale(op, scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), Dv = v.size(3), M = md.M;
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor seg_out = at::empty({B, Lq, Hq, M, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq, M}, q.options().dtype(acc));
  at::Tensor out = at::zeros({B, Lq, Hq, Dv}, q.options().dtype(acc));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out.to(q.scalar_type()), lse, seg_out};
  }
  const at::Tensor w4 = weights4(weights);
  for (int64_t m = 0; m < M; ++m) {
    auto [om, lm] = forward_cuda(op, q, k, v, modality_desc(md, B, Lq, m), sc, false);
    seg_out.select(3, m).copy_(om);
    lse.select(3, m).copy_(lm);
    out.add_(om.to(acc).mul(w4.select(3, m).unsqueeze(-1).to(acc)));
  }
  return {out.to(q.scalar_type()), lse, seg_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seg,
    const at::Tensor& weights, const at::Tensor& seg_out, const at::Tensor& lse, double scale) {
  const char* op = "mixture_attention_backward";
  const MixDesc md = check_mixture_backward_args(op, dout, q, k, v, seg, weights, seg_out, lse);
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), M = md.M;
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = lse_dtype(q.scalar_type());
  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(acc));
  at::Tensor dk = at::zeros(k.sizes(), k.options()), dv = at::zeros(v.sizes(), v.options());
  at::Tensor dw4 = at::zeros({B, Lq, Hq, M}, q.options().dtype(acc));
  const at::Tensor w4 = weights4(weights);
  const at::Tensor dout_acc = dout.to(acc);
  const at::Tensor so = seg_out.contiguous();
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor som = so.select(3, m);  // (B, Lq, Hq, Dv), last dim contiguous
    dw4.select(3, m).copy_(dout_acc.mul(som.to(acc)).sum(-1));  // dalpha_m = dO . O_m
    const at::Tensor dout_m = dout_acc.mul(w4.select(3, m).unsqueeze(-1).to(acc)).to(q.scalar_type());
    auto [dqm, dkm, dvm] =
        backward_cuda(op, dout_m, q, k, v, som, lse.select(3, m), std::nullopt, modality_desc(md, B, Lq, m), scale,
                      false);
    dq.add_(dqm.to(acc));
    dk.add_(dkm);  // the segments' key rows are disjoint: exact
    dv.add_(dvm);
  }
  const at::Tensor dw = weights.dim() == 3 ? dw4.sum(2) : dw4;
  return {dq.to(q.scalar_type()), dk, dv, dw.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedops, CUDA, m) {
  m.impl("co_attention", &co_attention_cuda);
  m.impl("co_attention_backward", &co_attention_backward_cuda);
  m.impl("mixture_attention", &mixture_attention_cuda);
  m.impl("mixture_attention_backward", &mixture_attention_backward_cuda);
}

}  // namespace embedops
