#pragma once
// co_attention / mixture_attention (issue 6): the argument checks and problem descriptions the
// CPU (co_mixture_attention.cpp, cpu/co_mixture_attention_kernel.cpp) and CUDA
// (cuda/co_mixture_attention.cu) backends share.

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention/attention.h"

namespace embedops {

// Valid rows of x and columns of y per batch (host).
struct CoDesc {
  std::vector<int64_t> xlen, ylen;
};

CoDesc check_co_attention_args(const char* op, const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                               const at::Tensor& vy, const std::optional<at::Tensor>& x_lengths,
                               const std::optional<at::Tensor>& y_lengths);

// Segment m of batch b is keys [start[b * M + m], start + len[b * M + m]) (host).
struct MixDesc {
  int64_t M = 0;
  std::vector<int64_t> start, len;
};

MixDesc check_mixture_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& seg, const at::Tensor& w);

// co_attention_backward: the forward's arguments, plus gradients / outputs / lse consistent with them.
CoDesc check_co_attention_backward_args(const char* op, const at::Tensor& dox, const at::Tensor& doy,
                                        const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                                        const at::Tensor& vy, const at::Tensor& ox, const at::Tensor& oy,
                                        const at::Tensor& lse_x, const at::Tensor& lse_y,
                                        const std::optional<at::Tensor>& dlse_x,
                                        const std::optional<at::Tensor>& dlse_y,
                                        const std::optional<at::Tensor>& x_lengths,
                                        const std::optional<at::Tensor>& y_lengths);

// mixture_attention_backward: the forward's arguments, plus dout / seg_out / lse consistent with them.
MixDesc check_mixture_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& seg, const at::Tensor& w,
                                    const at::Tensor& seg_out, const at::Tensor& lse);


}  // namespace embedops
