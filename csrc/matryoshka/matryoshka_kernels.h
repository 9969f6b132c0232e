#pragma once
// The kernels of the matryoshka family as stubs the host code calls (similarity.cpp, topk.cpp):
// CPU (cpu/*.cpp, compiled once per CPU level) and CUDA (cuda/*.cu). The host checks the arguments, allocates
// the outputs and converts the queries to the compute type (q_acc); the kernels fill the outputs.

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/kernel_stub.h"
#include "matryoshka/matryoshka.h"

namespace embedops {

// out (P, B, N) in the compute type
using MatryoshkaSimilarityKernel = void(const at::Tensor& q_acc, const at::Tensor& corpus, const MatryoshkaShape& s,
                                        at::Tensor& out);
// out (P, N): 1 / ||x[:dims[p]]||
using MatryoshkaInvNormsKernel = void(const at::Tensor& corpus, const MatryoshkaShape& s, at::Tensor& out);
// blocks: the corpus as column blocks (one block for a plain corpus): float (the queries' dtype),
// or int8 / uint8 codes with `dequant` (2, D) in the compute type, row 0 base and row 1 step: the
// corpus value is base[j] + step[j] * code (undefined for a float corpus); inv: given per-prefix
// inverse norms (P, N) or undefined; values / indices (P, B, k)
using MatryoshkaTopkKernel = void(const at::Tensor& q_acc, const std::vector<at::Tensor>& blocks,
                                  const MatryoshkaShape& s, int64_t k, const at::Tensor& inv,
                                  const at::Tensor& dequant, at::Tensor& values, at::Tensor& indices);
// the best k of given candidate rows (B, C) int64 (checked in [0, N) by the host) at prefix
// s.dims[0]; blocks / dequant as for topk; values / indices (B, k)
using MatryoshkaRescoreKernel = void(const at::Tensor& q_acc, const std::vector<at::Tensor>& blocks,
                                     const MatryoshkaShape& s, const at::Tensor& dequant,
                                     const at::Tensor& candidates, int64_t k, at::Tensor& values,
                                     at::Tensor& indices);
// the funnel's later stages: v0 / i0 (B, ks[0]) the first stage's top-k; values / indices (B, ks.back())
using MatryoshkaFunnelRerankKernel = void(const at::Tensor& q_acc, const std::vector<at::Tensor>& blocks,
                                          const MatryoshkaShape& s, at::IntArrayRef ks, const at::Tensor& v0,
                                          const at::Tensor& i0, at::Tensor& values, at::Tensor& indices);

// codes in the layout of s (row_stride, piece_bytes, piece_stride: matryoshka.h); distances (B, k) int32, indices (B, k) int64, nearest first (ties
// to the lower index); 0 < k <= N
using HammingTopkKernel = void(const at::Tensor& queries, const at::Tensor& corpus, const HammingShape& s, int64_t k,
                               at::Tensor& distances, at::Tensor& indices);

EMBEDOPS_DECLARE_STUB(hamming_topk_stub, HammingTopkKernel);
EMBEDOPS_DECLARE_STUB(matryoshka_similarity_stub, MatryoshkaSimilarityKernel);
EMBEDOPS_DECLARE_STUB(matryoshka_inv_norms_stub, MatryoshkaInvNormsKernel);
EMBEDOPS_DECLARE_STUB(matryoshka_topk_stub, MatryoshkaTopkKernel);
EMBEDOPS_DECLARE_STUB(matryoshka_funnel_rerank_stub, MatryoshkaFunnelRerankKernel);
EMBEDOPS_DECLARE_STUB(matryoshka_rescore_stub, MatryoshkaRescoreKernel);

}  // namespace embedops
