#pragma once
// The CPU kernels of the embedding family (cpu/*.cpp, compiled once per CPU level) as dispatch
// stubs the host code calls (embedding_bag.cpp). Outputs are allocated by the host; the kernels
// fill them.

#include <ATen/core/Tensor.h>

#include "common/cpu_capability.h"
#include "embedding/embedding.h"

namespace embedops {

// psw: undefined without per_sample_weights; argmax: (B, Q*D) for max pooling, else empty.
using EmbeddingBagForwardKernel = void(const BagLayout& L, int64_t seed, const at::Tensor& weight,
                                       const at::Tensor& values, const at::Tensor& offsets64, const at::Tensor& psw,
                                       at::Tensor& out, at::Tensor& argmax);
// grad_weight (R, D) zeroed, or empty when not wanted; grad_psw (N,) zeroed, or empty.
using EmbeddingBagBackwardKernel = void(const BagLayout& L, int64_t seed, const BagBackwardInputs& in,
                                        const at::Tensor& weight, at::Tensor& grad_weight, at::Tensor& grad_psw);
// updates weight (and state for row-wise Adagrad) in place on the touched rows
using EmbeddingBagUpdateKernel = void(const BagLayout& L, int64_t seed, const BagBackwardInputs& in,
                                      at::Tensor& weight, at::Tensor& state, Optimizer opt, double lr, double eps);

EMBEDOPS_DECLARE_CPU_STUB(embedding_bag_forward_stub, EmbeddingBagForwardKernel);
EMBEDOPS_DECLARE_CPU_STUB(embedding_bag_backward_stub, EmbeddingBagBackwardKernel);
EMBEDOPS_DECLARE_CPU_STUB(embedding_bag_update_stub, EmbeddingBagUpdateKernel);

}  // namespace embedops
