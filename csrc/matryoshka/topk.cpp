// matryoshka_topk and matryoshka_funnel (and their column-block forms: MatryoshkaIndex's storage on
// every device), the host side of both backends (compiled once): checks, outputs, and the kernels
// of the inputs' device (cpu/topk_kernel.cpp at the CPU level in use, cuda/topk.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(matryoshka_topk_stub, MatryoshkaTopkKernel);
EMBEDOPS_DEFINE_STUB(matryoshka_funnel_rerank_stub, MatryoshkaFunnelRerankKernel);

namespace {

// A plain corpus or a list of column blocks, validated, with unit column stride.
std::vector<at::Tensor> corpus_blocks(const char* op, const at::Tensor& queries, at::TensorList blocks,
                                      MatryoshkaShape& s) {
  TORCH_CHECK_VALUE(!blocks.empty(), op, ": blocks must be a non-empty list of (N, w) tensors");
  std::vector<at::Tensor> out;
  int64_t D = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const at::Tensor& b = blocks[i];
    TORCH_CHECK_VALUE(b.dim() == 2, op, ": blocks[", i, "] must have 2 dims (N, w), got ", b.dim());
    check_same_dtype(op, "blocks", b, "queries", queries);
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
                                             const std::optional<at::Tensor>& corpus_inv_norms) {
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  const int64_t P = static_cast<int64_t>(s.dims.size());
  at::Tensor values = at::empty({P, s.B, k}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({P, s.B, k}, queries.options().dtype(at::kLong));
  if (s.B == 0 || k == 0) return {values, indices};
  const at::Tensor q = queries.to(acc).contiguous();
  at::Tensor inv;
  if (corpus_inv_norms.has_value() && s.cosine) inv = corpus_inv_norms->contiguous();
  matryoshka_topk_stub(queries.device().type(), q, blocks, s, k, inv, values, indices);
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

void register_ops(torch::Library& m) {
  m.impl("matryoshka_topk", &matryoshka_topk_host);
  m.impl("matryoshka_funnel", &matryoshka_funnel_host);
  m.impl("matryoshka_topk_blocks", &matryoshka_topk_blocks_host);
  m.impl("matryoshka_funnel_blocks", &matryoshka_funnel_blocks_host);
}

}  // namespace

EMBEDOPS_HOST_OPS(register_ops)

}  // namespace embedops
