// cross_attention (padded and varlen, forward and backward), the host side of both backends
// (compiled once): argument checks, operands with a contiguous last dim, the outputs, and the
// kernel of the inputs' device (cpu/cross_attention_kernel.cpp at the CPU level in use,
// cuda/cross_attention_{fwd,bwd}.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_kernels.h"
#include "common/memory.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(cross_attention_forward_stub, CrossAttentionForwardKernel);
EMBEDOPS_DEFINE_STUB(cross_attention_backward_stub, CrossAttentionBackwardKernel);

namespace {

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const SeqDesc& desc, double scale, bool varlen) {
  const at::Tensor qc = prepare(q, varlen), kc = prepare(k, varlen), vc = prepare(v, varlen);
  const int64_t Hq = q.size(-2), Dv = v.size(-1);
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = Dv;
  const auto lse_opts = q.options().dtype(lse_dtype(q.scalar_type()));
  at::Tensor out = empty_output(out_shape, q.options());  // long Lq: tens of MB, fresh on every call
  at::Tensor lse = varlen ? at::empty({Hq, q.size(0)}, lse_opts) : at::empty({q.size(0), Hq, q.size(1)}, lse_opts);
  if (out.numel() == 0) return {out, lse};
  cross_attention_forward_stub(q.device().type(), qc, kc, vc, desc, scale, varlen, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& dlse,
                                                             const SeqDesc& desc, double scale, bool varlen) {
  const at::Tensor qc = prepare(q, varlen), kc = prepare(k, varlen), vc = prepare(v, varlen);
  const at::Tensor oc = prepare(out, varlen), doc = prepare(dout, varlen);
  const at::Tensor lc = lse.contiguous();
  const at::Tensor dlc = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  at::Tensor dq = zeros_output(q.sizes(), q.options());
  at::Tensor dk = zeros_output(k.sizes(), k.options());
  at::Tensor dv = zeros_output(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0 || dv.numel() == 0) return {dq, dk, dv};
  cross_attention_backward_stub(q.device().type(), doc, qc, kc, vc, oc, lc, dlc, desc, scale, varlen, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> cross_attention_host(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const std::optional<at::Tensor>& kv_lengths,
                                                       const std::optional<at::Tensor>& q_lengths,
                                                       std::optional<double> scale) {
  const char* op = "cross_attention";
  const SeqDesc desc = check_cross_attention_args(op, q, k, v, kv_lengths, q_lengths);
  return forward_impl(q, k, v, desc, resolve_scale(op, scale, q.size(3)), false);
}

std::tuple<at::Tensor, at::Tensor> cross_attention_varlen_host(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                              int64_t max_seqlen_k, std::optional<double> scale) {
  const char* op = "cross_attention_varlen";
  const SeqDesc desc =
      check_cross_attention_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return forward_impl(q, k, v, desc, resolve_scale(op, scale, q.size(2)), true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_host(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& kv_lengths,
    const std::optional<at::Tensor>& q_lengths, std::optional<double> scale) {
  const char* op = "cross_attention_backward";
  const SeqDesc desc = check_cross_attention_args(op, q, k, v, kv_lengths, q_lengths);
  check_cross_attention_backward_args(op, dout, q, v, out, lse, dlse, false);
  return backward_impl(dout, q, k, v, out, lse, dlse, desc, resolve_scale(op, scale, q.size(3)), false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_varlen_backward_host(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> scale) {
  const char* op = "cross_attention_varlen_backward";
  const SeqDesc desc =
      check_cross_attention_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_cross_attention_backward_args(op, dout, q, v, out, lse, dlse, true);
  return backward_impl(dout, q, k, v, out, lse, dlse, desc, resolve_scale(op, scale, q.size(2)), true);
}

void register_cross_attention_ops(torch::Library& m) {
  m.impl("cross_attention", &cross_attention_host);
  m.impl("cross_attention_varlen", &cross_attention_varlen_host);
  m.impl("cross_attention_backward", &cross_attention_backward_host);
  m.impl("cross_attention_varlen_backward", &cross_attention_varlen_backward_host);
}

}  // namespace

EMBEDOPS_HOST_OPS(register_cross_attention_ops)

}  // namespace embedops
