// hamming_topk: k nearest packed binary codes by Hamming distance over a bit prefix, the host side
// of both backends (compiled once): checks, contiguous codes, the outputs, and the kernel of the
// inputs' device (cpu/hamming_kernel.cpp at the CPU level in use, cuda/topk.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(hamming_topk_stub, HammingTopkKernel);

namespace {

std::tuple<at::Tensor, at::Tensor> hamming_topk_host(const at::Tensor& queries, const at::Tensor& corpus, int64_t k,
                                                     int64_t nbits) {
  // rows of unit byte stride (a blocked corpus may be a row slice of a larger store: pieces and
  // rows keep their strides)
  const bool strided_ok = corpus.dim() == 3 ? corpus.stride(2) == 1 && corpus.stride(1) >= corpus.size(2) &&
                                                  corpus.stride(0) >= corpus.size(1) * corpus.stride(1)
                                            : corpus.is_contiguous();
  const at::Tensor x = strided_ok ? corpus : corpus.contiguous();
  const HammingShape s = check_hamming_args("hamming_topk", queries, x, k, nbits);
  at::Tensor distances = at::empty({s.B, k}, queries.options().dtype(at::kInt));
  at::Tensor indices = at::empty({s.B, k}, queries.options().dtype(at::kLong));
  if (s.B == 0 || k == 0) return {distances, indices};
  hamming_topk_stub(queries.device().type(), queries.contiguous(), x, s, k, distances, indices);
  return {distances, indices};
}

void register_hamming_ops(torch::Library& m) { m.impl("hamming_topk", &hamming_topk_host); }

}  // namespace

EMBEDOPS_HOST_OPS(register_hamming_ops)

}  // namespace embedops
