// matryoshka_topk and matryoshka_funnel (and their column-block forms: MatryoshkaIndex's storage on
// every device), the host side of both backends (compiled once): checks, outputs, and the kernels
// of the inputs' device (cpu/topk_kernel.cpp at the CPU level in use, cuda/topk.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <ATen/ops/min.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(matryoshka_topk_stub, MatryoshkaTopkKernel);
EMBEDOPS_DEFINE_STUB(matryoshka_funnel_rerank_stub, MatryoshkaFunnelRerankKernel);
EMBEDOPS_DEFINE_STUB(matryoshka_rescore_stub, MatryoshkaRescoreKernel);

namespace {

bool is_code_dtype(at::ScalarType t) { return t == at::kChar || t == at::kByte; }

// A plain corpus or a list of column blocks, validated, with unit column stride: float blocks of
// the queries' dtype, or (codes) int8 / uint8 code blocks of one dtype.
std::vector<at::Tensor> corpus_blocks(const char* op, const at::Tensor& queries, at::TensorList blocks,
                                      MatryoshkaShape& s, bool codes = false) {
  TORCH_CHECK_VALUE(!blocks.empty(), op, ": blocks must be a non-empty list of (N, w) tensors");
  std::vector<at::Tensor> out;
  int64_t D = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const at::Tensor& b = blocks[i];
    TORCH_CHECK_VALUE(b.dim() == 2, op, ": blocks[", i, "] must have 2 dims (N, w), got ", b.dim());
    if (codes) {
      TORCH_CHECK_TYPE(is_code_dtype(b.scalar_type()), op, ": corpus codes must be int8 or uint8 (quantize_embeddings' "
                       "\"int8\" / \"uint8\"), got ", b.scalar_type());
      check_same_dtype(op, "blocks", b, "blocks[0]", blocks[0]);
    } else {
      check_same_dtype(op, "blocks", b, "queries", queries);
    }
    check_same_device(op, "blocks", b, "queries", queries);
    TORCH_CHECK_VALUE(b.size(0) == blocks[0].size(0), op, ": every block must have N=", blocks[0].size(0),
                      " rows, blocks[", i, "] has ", b.size(0));
    TORCH_CHECK_VALUE(b.size(1) >= 1, op, ": blocks[", i, "] has no columns");
    D += b.size(1);
    out.push_back(rows_unit_stride(b));
  }
  TORCH_CHECK_VALUE(D == s.D, op, ": the blocks' widths must add up to D=", s.D, ", got ", D);
  s.N = blocks[0].size(0);
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_impl(const at::Tensor& queries, const std::vector<at::Tensor>& blocks,
                                             int64_t k, const MatryoshkaShape& s,
                                             const std::optional<at::Tensor>& corpus_inv_norms,
                                             const at::Tensor& dequant = {}) {
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  const int64_t P = static_cast<int64_t>(s.dims.size());
  at::Tensor values = at::empty({P, s.B, k}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({P, s.B, k}, queries.options().dtype(at::kLong));
  if (s.B == 0 || k == 0) return {values, indices};
  const at::Tensor q = queries.to(acc).contiguous();
  at::Tensor inv;
  if (corpus_inv_norms.has_value() && s.cosine) inv = corpus_inv_norms->contiguous();
  matryoshka_topk_stub(queries.device().type(), q, blocks, s, k, inv, dequant, values, indices);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> matryoshka_topk_host(const at::Tensor& queries, const at::Tensor& corpus, int64_t k,
                                                       at::IntArrayRef dims, c10::string_view metric,
                                                       const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "matryoshka_topk";
  const MatryoshkaShape s = check_matryoshka_args(op, queries, corpus, dims, metric);
  check_topk_k(op, k, s.N);
  check_inv_norms(op, corpus_inv_norms, static_cast<int64_t>(s.dims.size()), s.N, corpus);
  return topk_impl(queries, {rows_unit_stride(corpus)}, k, s, corpus_inv_norms);
}

std::tuple<at::Tensor, at::Tensor> matryoshka_topk_blocks_host(const at::Tensor& queries, at::TensorList blocks,
                                                              int64_t k, at::IntArrayRef dims, c10::string_view metric,
                                                              const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "matryoshka_topk_blocks";
  MatryoshkaShape s = check_matryoshka_args(op, queries, queries, dims, metric);
  const auto bl = corpus_blocks(op, queries, blocks, s);
  check_topk_k(op, k, s.N);
  check_inv_norms(op, corpus_inv_norms, static_cast<int64_t>(s.dims.size()), s.N, bl[0]);
  return topk_impl(queries, bl, k, s, corpus_inv_norms);
}

std::tuple<at::Tensor, at::Tensor> funnel_impl(const char* op, const at::Tensor& queries,
                                               const std::vector<at::Tensor>& blocks, const MatryoshkaShape& s,
                                               at::IntArrayRef ks, const std::optional<at::Tensor>& corpus_inv_norms) {
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  const int64_t kl = ks.back();
  at::Tensor values = at::empty({s.B, kl}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({s.B, kl}, queries.options().dtype(at::kLong));
  if (s.B == 0 || kl == 0) return {values, indices};
  MatryoshkaShape s0 = s;
  s0.dims = {s.dims[0]};
  auto [v0, i0] = topk_impl(queries, blocks, ks[0], s0, corpus_inv_norms);
  const at::Tensor q = queries.to(acc).contiguous();
  matryoshka_funnel_rerank_stub(queries.device().type(), q, blocks, s, ks, v0, i0, values, indices);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> matryoshka_funnel_host(const at::Tensor& queries, const at::Tensor& corpus,
                                                         at::IntArrayRef dims, at::IntArrayRef ks,
                                                         c10::string_view metric,
                                                         const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "matryoshka_funnel";
  const MatryoshkaShape s = check_matryoshka_args(op, queries, corpus, dims, metric);
  check_funnel_ks(op, dims, ks, s.N);
  check_inv_norms(op, corpus_inv_norms, 1, s.N, corpus);
  return funnel_impl(op, queries, {rows_unit_stride(corpus)}, s, ks, corpus_inv_norms);
}

std::tuple<at::Tensor, at::Tensor> matryoshka_funnel_blocks_host(const at::Tensor& queries, at::TensorList blocks,
                                                                at::IntArrayRef dims, at::IntArrayRef ks,
                                                                c10::string_view metric,
                                                                const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "matryoshka_funnel_blocks";
  MatryoshkaShape s = check_matryoshka_args(op, queries, queries, dims, metric);
  const auto bl = corpus_blocks(op, queries, blocks, s);
  check_funnel_ks(op, dims, ks, s.N);
  check_inv_norms(op, corpus_inv_norms, 1, s.N, bl[0]);
  return funnel_impl(op, queries, bl, s, ks, corpus_inv_norms);
}

// int8_topk: float queries against int8 / uint8 codes, dequantised on the fly (asymmetric)
std::tuple<at::Tensor, at::Tensor> int8_topk_host(const at::Tensor& queries, at::TensorList blocks,
                                                  const at::Tensor& ranges, int64_t k, at::IntArrayRef dims,
                                                  c10::string_view metric,
                                                  const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "int8_topk";
  MatryoshkaShape s = check_matryoshka_args(op, queries, queries, dims, metric);
  const auto bl = corpus_blocks(op, queries, blocks, s, /*codes=*/true);
  check_topk_k(op, k, s.N);
  check_inv_norms(op, corpus_inv_norms, static_cast<int64_t>(s.dims.size()), s.N, queries);
  const at::Tensor dequant = code_dequant(op, ranges, s.D, bl[0].scalar_type(), queries);
  return topk_impl(queries, bl, k, s, corpus_inv_norms, dequant);
}

// matryoshka_rescore: the best k of each query's candidate rows at prefix `dim`, over a float
// corpus (blocks of the queries' dtype) or int8 / uint8 codes (with `ranges`).
std::tuple<at::Tensor, at::Tensor> matryoshka_rescore_host(const at::Tensor& queries, at::TensorList blocks,
                                                           const at::Tensor& candidates, int64_t k, int64_t dim,
                                                           c10::string_view metric,
                                                           const std::optional<at::Tensor>& ranges) {
  const char* op = "matryoshka_rescore";
  const int64_t dims[1] = {dim};
  MatryoshkaShape s = check_matryoshka_args(op, queries, queries, dims, metric);
  const bool codes = ranges.has_value();
  const auto bl = corpus_blocks(op, queries, blocks, s, codes);
  TORCH_CHECK_TYPE(codes || !is_code_dtype(bl[0].scalar_type()), op,
                   ": int8 / uint8 code blocks need ranges= (the (2, D) min/max they were quantised with)");
  check_dim(op, "candidates", candidates, 2, "(B, C)");
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kLong, op, ": candidates must be int64 row ids, got ",
                   candidates.scalar_type());
  check_same_device(op, "candidates", candidates, "queries", queries);
  TORCH_CHECK_VALUE(candidates.size(0) == s.B, op, ": candidates must have one row per query (B=", s.B, "), got ",
                    candidates.size(0));
  const int64_t C = candidates.size(1);
  TORCH_CHECK_VALUE(k >= 0 && k <= C, op, ": k must be in [0, C=", C, "] (the candidates per query), got ", k);
  const at::Tensor cand = candidates.contiguous();
  if (cand.numel() > 0) {
    TORCH_CHECK_VALUE(cand.min().item<int64_t>() >= 0 && cand.max().item<int64_t>() < s.N, op,
                      ": candidates must be row ids in [0, N=", s.N, "), got values in [", cand.min().item<int64_t>(),
                      ", ", cand.max().item<int64_t>(), "]");
  }
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  at::Tensor values = at::empty({s.B, k}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({s.B, k}, queries.options().dtype(at::kLong));
  if (s.B == 0 || k == 0) return {values, indices};
  const at::Tensor dequant = codes ? code_dequant(op, *ranges, s.D, bl[0].scalar_type(), queries) : at::Tensor();
  matryoshka_rescore_stub(queries.device().type(), queries.to(acc).contiguous(), bl, s, dequant, cand, k, values,
                          indices);
  return {values, indices};
}

void register_topk_ops(torch::Library& m) {
  m.impl("int8_topk", &int8_topk_host);
  m.impl("matryoshka_rescore", &matryoshka_rescore_host);
  m.impl("matryoshka_topk", &matryoshka_topk_host);
  m.impl("matryoshka_funnel", &matryoshka_funnel_host);
  m.impl("matryoshka_topk_blocks", &matryoshka_topk_blocks_host);
  m.impl("matryoshka_funnel_blocks", &matryoshka_funnel_blocks_host);
}

}  // namespace

EMBEDOPS_HOST_OPS(register_topk_ops)

}  // namespace embedops
