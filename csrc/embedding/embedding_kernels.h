#pragma once
// The kernels of the embedding family as stubs the host code calls (embedding_bag.cpp): CPU
// (cpu/*.cpp, compiled once per CPU level) and CUDA (cuda/*.cu). Outputs are allocated by the
// host; the kernels validate the offsets their backend's way and fill the outputs (any batch size,
// 0 included).

#include <ATen/core/Tensor.h>

#include "common/kernel_stub.h"
#include "embedding/embedding.h"

namespace embedops {

// psw: undefined without per_sample_weights; argmax: (B, Q*D) for max pooling, else empty;
// validate: the op's flag (the CUDA kernel's device-side offsets check; the CPU always checks).
using EmbeddingBagForwardKernel = void(const BagLayout& L, int64_t seed, const at::Tensor& weight,
                                       const at::Tensor& values, const at::Tensor& offsets64, const at::Tensor& psw,
                                       bool validate, at::Tensor& out, at::Tensor& argmax);
// grad_weight (R, D) zeroed, or empty when not wanted; grad_psw (N,) zeroed, or empty.
using EmbeddingBagBackwardKernel = void(const BagLayout& L, int64_t seed, const BagBackwardInputs& in,
                                        const at::Tensor& weight, at::Tensor& grad_weight, at::Tensor& grad_psw);
// updates weight (and state for row-wise Adagrad) in place on the touched rows
using EmbeddingBagUpdateKernel = void(const BagLayout& L, int64_t seed, const BagBackwardInputs& in,
                                      at::Tensor& weight, at::Tensor& state, Optimizer opt, double lr, double eps);

// rows (same shape as v) = hash_row(v, salt, num_rows); v non-empty, contiguous
using HashIdsKernel = void(const at::Tensor& v, uint64_t salt, uint64_t num_rows, at::Tensor& rows);

EMBEDOPS_DECLARE_STUB(hash_ids_stub, HashIdsKernel);
EMBEDOPS_DECLARE_STUB(embedding_bag_forward_stub, EmbeddingBagForwardKernel);
// The same forward over a uint8 row-quantised table (quantized.h: weight (R, D + 8), D codes then
// the row's float32 scale and bias): out float32 (B, out_dim), psw float32 or undefined; argmax
// is unused (empty: quantised tables have no backward).
EMBEDOPS_DECLARE_STUB(embedding_bag_forward_int8_stub, EmbeddingBagForwardKernel);
EMBEDOPS_DECLARE_STUB(embedding_bag_backward_stub, EmbeddingBagBackwardKernel);
EMBEDOPS_DECLARE_STUB(embedding_bag_update_stub, EmbeddingBagUpdateKernel);

}  // namespace embedops
