// matryoshka_similarity and matryoshka_inv_norms, the host side of both backends (compiled once):
// checks, outputs, and the kernel of the inputs' device (cpu/similarity_kernel.cpp at the CPU level
// in use, cuda/similarity.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/memory.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(matryoshka_similarity_stub, MatryoshkaSimilarityKernel);
EMBEDOPS_DEFINE_STUB(matryoshka_inv_norms_stub, MatryoshkaInvNormsKernel);

namespace {

at::Tensor matryoshka_similarity_host(const at::Tensor& queries, const at::Tensor& corpus, at::IntArrayRef dims,
                                     c10::string_view metric) {
  const MatryoshkaShape s = check_matryoshka_args("matryoshka_similarity", queries, corpus, dims, metric);
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  const int64_t P = static_cast<int64_t>(s.dims.size());
  at::Tensor out = empty_output({P, s.B, s.N}, queries.options().dtype(acc));
  if (s.B == 0 || s.N == 0) return out;
  const at::Tensor q = queries.to(acc).contiguous();
  const at::Tensor x = rows_unit_stride(corpus);
  matryoshka_similarity_stub(queries.device().type(), q, x, s, out);
  return out;
}

at::Tensor matryoshka_inv_norms_host(const at::Tensor& corpus, at::IntArrayRef dims) {
  const char* op = "matryoshka_inv_norms";
  const MatryoshkaShape s = check_matryoshka_args(op, corpus.narrow(0, 0, 0), corpus, dims, "cosine");
  const at::ScalarType acc = acc_dtype_of(corpus.scalar_type());
  const int64_t P = static_cast<int64_t>(s.dims.size());
  at::Tensor out = at::empty({P, s.N}, corpus.options().dtype(acc));
  if (s.N == 0) return out;
  const at::Tensor x = rows_unit_stride(corpus);
  matryoshka_inv_norms_stub(corpus.device().type(), x, s, out);
  return out;
}

void register_similarity_ops(torch::Library& m) {
  m.impl("matryoshka_similarity", &matryoshka_similarity_host);
  m.impl("matryoshka_inv_norms", &matryoshka_inv_norms_host);
}

}  // namespace

EMBEDOPS_HOST_OPS(register_similarity_ops)

}  // namespace embedops
