// co_attention and mixture_attention (forward and backward), the host side of both backends
// (compiled once): argument checks, operands with a contiguous last dim, the outputs, and the
// kernels of the inputs' device (cpu/co_mixture_attention_kernel.cpp at the CPU level in use,
// cuda/co_mixture_attention.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "attention/attention.h"
#include "attention/attention_kernels.h"
#include "attention/co_mixture_attention.h"
#include "common/memory.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(co_attention_forward_stub, CoAttentionForwardKernel);
EMBEDOPS_DEFINE_STUB(co_attention_backward_stub, CoAttentionBackwardKernel);
EMBEDOPS_DEFINE_STUB(mixture_attention_forward_stub, MixtureAttentionForwardKernel);
EMBEDOPS_DEFINE_STUB(mixture_attention_backward_stub, MixtureAttentionBackwardKernel);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_host(
    const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx, const at::Tensor& vy,
    const std::optional<at::Tensor>& x_lengths, const std::optional<at::Tensor>& y_lengths,
    std::optional<double> scale) {
  const char* op = "co_attention";
  const CoDesc cd = check_co_attention_args(op, qx, ky, vx, vy, x_lengths, y_lengths);
  const double sc = resolve_scale(op, scale, qx.size(3));
  const int64_t B = qx.size(0), Lx = qx.size(1), H = qx.size(2), Ly = ky.size(1);
  const int64_t Dvx = vx.size(3), Dvy = vy.size(3);
  const auto lse_opts = qx.options().dtype(lse_dtype(qx.scalar_type()));
  at::Tensor ox = empty_output({B, Lx, H, Dvy}, qx.options()), oy = empty_output({B, Ly, H, Dvx}, qx.options());
  at::Tensor lx = at::empty({B, H, Lx}, lse_opts), ly = at::empty({B, H, Ly}, lse_opts);
  if (B * H == 0) return {ox, oy, lx, ly};
  const at::Tensor qc = prepare(qx, false), kc = prepare(ky, false), vxc = prepare(vx, false), vyc = prepare(vy, false);
  co_attention_forward_stub(qx.device().type(), qc, kc, vxc, vyc, cd, sc, ox, oy, lx, ly);
  return {ox, oy, lx, ly};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_backward_host(
    const at::Tensor& dox, const at::Tensor& doy, const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
    const at::Tensor& vy, const at::Tensor& ox, const at::Tensor& oy, const at::Tensor& lse_x, const at::Tensor& lse_y,
    const std::optional<at::Tensor>& dlse_x, const std::optional<at::Tensor>& dlse_y,
    const std::optional<at::Tensor>& x_lengths, const std::optional<at::Tensor>& y_lengths,
    std::optional<double> scale_in) {
  const char* op = "co_attention_backward";
  const CoDesc cd = check_co_attention_backward_args(op, dox, doy, qx, ky, vx, vy, ox, oy, lse_x, lse_y, dlse_x,
                                                     dlse_y, x_lengths, y_lengths);
  const double scale = resolve_scale(op, scale_in, qx.size(3));
  const int64_t B = qx.size(0), Lx = qx.size(1), H = qx.size(2), Ly = ky.size(1);
  at::Tensor dqx = zeros_output(qx.sizes(), qx.options()), dky = zeros_output(ky.sizes(), ky.options());
  at::Tensor dvx = zeros_output(vx.sizes(), vx.options()), dvy = zeros_output(vy.sizes(), vy.options());
  if (B * H == 0 || Lx == 0 || Ly == 0) return {dqx, dky, dvx, dvy};
  const at::Tensor qc = prepare(qx, false), kc = prepare(ky, false), vxc = prepare(vx, false), vyc = prepare(vy, false);
  const at::Tensor oxc = prepare(ox, false), oyc = prepare(oy, false), doxc = prepare(dox, false),
                   doyc = prepare(doy, false);
  const at::Tensor lxc = lse_x.contiguous(), lyc = lse_y.contiguous();
  const at::Tensor dlxc = dlse_x.has_value() ? dlse_x->contiguous() : at::Tensor();
  const at::Tensor dlyc = dlse_y.has_value() ? dlse_y->contiguous() : at::Tensor();
  co_attention_backward_stub(qx.device().type(), doxc, doyc, qc, kc, vxc, vyc, oxc, oyc, lxc, lyc, dlxc, dlyc, cd,
                             scale, dqx, dky, dvx, dvy);
  return {dqx, dky, dvx, dvy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_attention_host(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const at::Tensor& seg,
                                                                     const at::Tensor& weights,
                                                                     std::optional<double> scale) {
  const char* op = "mixture_attention";
  const MixDesc md = check_mixture_args(op, q, k, v, seg, weights);
  const double sc = resolve_scale(op, scale, q.size(3));
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), Dv = v.size(3);
  const int64_t M = md.M;
  at::Tensor out = empty_output({B, Lq, Hq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq, M}, q.options().dtype(lse_dtype(q.scalar_type())));
  at::Tensor seg_out = empty_output({B, Lq, Hq, M, Dv}, q.options());
  if (out.numel() == 0) return {out, lse.fill_(-std::numeric_limits<double>::infinity()), seg_out};
  const at::Tensor qc = prepare(q, false), kc = prepare(k, false), vc = prepare(v, false);
  mixture_attention_forward_stub(q.device().type(), qc, kc, vc, weights, md, sc, out, lse, seg_out);
  return {out, lse, seg_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_attention_backward_host(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seg,
    const at::Tensor& weights, const at::Tensor& seg_out, const at::Tensor& lse, std::optional<double> scale_in) {
  const char* op = "mixture_attention_backward";
  const MixDesc md = check_mixture_backward_args(op, dout, q, k, v, seg, weights, seg_out, lse);
  const double scale = resolve_scale(op, scale_in, q.size(3));
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2);
  const int64_t M = md.M;
  at::Tensor dq = zeros_output(q.sizes(), q.options()), dk = zeros_output(k.sizes(), k.options());
  at::Tensor dv = zeros_output(v.sizes(), v.options());
  at::Tensor dw4 = at::zeros({B, Lq, Hq, M}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (dq.numel() > 0 && dv.numel() > 0) {
    const at::Tensor qc = prepare(q, false), kc = prepare(k, false), vc = prepare(v, false),
                     doc = prepare(dout, false);
    const at::Tensor soc = seg_out.contiguous(), lc = lse.contiguous();
    mixture_attention_backward_stub(q.device().type(), doc, qc, kc, vc, weights, soc, lc, md, scale, dq, dk, dv, dw4);
  }
  // per-head dalpha, summed over heads (fixed order) for shared (B, Lq, M) weights
  at::Tensor dw = weights.dim() == 3 ? at::sum(dw4, {2}) : dw4;
  return {dq, dk, dv, dw.to(weights.scalar_type())};
}

void register_co_mixture_attention_ops(torch::Library& m) {
  m.impl("co_attention", &co_attention_host);
  m.impl("co_attention_backward", &co_attention_backward_host);
  m.impl("mixture_attention", &mixture_attention_host);
  m.impl("mixture_attention_backward", &mixture_attention_backward_host);
}

}  // namespace

EMBEDOPS_HOST_OPS(register_co_mixture_attention_ops)

}  // namespace embedops
