#pragma once
// The kernels of the attention family as stubs the host code calls (cross_attention.cpp,
// co_mixture_attention.cpp): CPU (cpu/*.cpp, compiled once per CPU level) and CUDA (cuda/*.cu). The host checks the
// arguments, gives every operand a contiguous last dim (prepare) and allocates the outputs
// (gradients zeroed); the kernels fill them. Optional tensors are passed undefined when absent.

#include <ATen/core/Tensor.h>

#include "attention/attention.h"
#include "attention/co_mixture_attention.h"
#include "common/kernel_stub.h"

namespace embedops {

// The kernels read rows with BLAS: the last dim must be contiguous and the token stride a valid
// leading dimension. Anything else (e.g. broadcast views) is copied once.
inline at::Tensor prepare(const at::Tensor& t, bool varlen) {
  at::Tensor c = t;
  const int64_t tok_dim = varlen ? 0 : 1;
  if (c.stride(-1) != 1 || c.stride(tok_dim) < c.size(-1)) c = c.contiguous();
  return c;
}

using CrossAttentionForwardKernel = void(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const SeqDesc& desc, double scale, bool varlen, at::Tensor& out,
                                         at::Tensor& lse);
using CrossAttentionBackwardKernel = void(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                          const at::Tensor& dlse, const SeqDesc& desc, double scale, bool varlen,
                                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
using CoAttentionForwardKernel = void(const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                                      const at::Tensor& vy, const CoDesc& cd, double scale, at::Tensor& ox,
                                      at::Tensor& oy, at::Tensor& lse_x, at::Tensor& lse_y);
using CoAttentionBackwardKernel = void(const at::Tensor& dox, const at::Tensor& doy, const at::Tensor& qx,
                                       const at::Tensor& ky, const at::Tensor& vx, const at::Tensor& vy,
                                       const at::Tensor& ox, const at::Tensor& oy, const at::Tensor& lse_x,
                                       const at::Tensor& lse_y, const at::Tensor& dlse_x, const at::Tensor& dlse_y,
                                       const CoDesc& cd, double scale, at::Tensor& dqx, at::Tensor& dky,
                                       at::Tensor& dvx, at::Tensor& dvy);
using MixtureAttentionForwardKernel = void(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& weights, const MixDesc& md, double scale,
                                           at::Tensor& out, at::Tensor& lse, at::Tensor& seg_out);
// dw4 (B, Lq, Hq, M): the per-head weight gradient (the host sums it over heads for shared weights)
using MixtureAttentionBackwardKernel = void(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& weights,
                                            const at::Tensor& seg_out, const at::Tensor& lse, const MixDesc& md,
                                            double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                            at::Tensor& dw4);

EMBEDOPS_DECLARE_STUB(cross_attention_forward_stub, CrossAttentionForwardKernel);
EMBEDOPS_DECLARE_STUB(cross_attention_backward_stub, CrossAttentionBackwardKernel);
EMBEDOPS_DECLARE_STUB(co_attention_forward_stub, CoAttentionForwardKernel);
EMBEDOPS_DECLARE_STUB(co_attention_backward_stub, CoAttentionBackwardKernel);
EMBEDOPS_DECLARE_STUB(mixture_attention_forward_stub, MixtureAttentionForwardKernel);
EMBEDOPS_DECLARE_STUB(mixture_attention_backward_stub, MixtureAttentionBackwardKernel);

}  // namespace embedops
