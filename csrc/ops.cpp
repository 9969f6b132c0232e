// Every embedops schema, in one place. Backends register their kernels in their own files with
// TORCH_LIBRARY_IMPL(embedops, CPU|CUDA, m); fake (meta) kernels and autograd are registered in
// python/embedops/_ops.py.

#include <torch/library.h>

TORCH_LIBRARY(embedops, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};

  // ---- embedding ------------------------------------------------------------------------------
  m.def("hash_ids(Tensor values, int feature, int probe, int num_rows, int seed=0) -> Tensor", pt2);

  // ---- matryoshka -----------------------------------------------------------------------------
  m.def("matryoshka_similarity(Tensor queries, Tensor corpus, int[] dims, str metric=\"cosine\") -> Tensor", pt2);
  m.def("matryoshka_topk(Tensor queries, Tensor corpus, int k, int[] dims, str metric=\"cosine\", "
        "Tensor? corpus_inv_norms=None) -> (Tensor, Tensor)", pt2);
  m.def("matryoshka_funnel(Tensor queries, Tensor corpus, int[] dims, int[] ks, str metric=\"cosine\", "
        "Tensor? corpus_inv_norms=None) -> (Tensor, Tensor)", pt2);
  m.def("matryoshka_inv_norms(Tensor corpus, int[] dims) -> Tensor", pt2);
  // the corpus as column blocks (N, w_i) side by side (MatryoshkaIndex's segment-major storage)
  m.def("matryoshka_topk_blocks(Tensor queries, Tensor[] blocks, int k, int[] dims, str metric=\"cosine\", "
        "Tensor? corpus_inv_norms=None) -> (Tensor, Tensor)", pt2);
  m.def("matryoshka_funnel_blocks(Tensor queries, Tensor[] blocks, int[] dims, int[] ks, "
        "str metric=\"cosine\", Tensor? corpus_inv_norms=None) -> (Tensor, Tensor)", pt2);

  // ---- attention ------------------------------------------------------------------------------
}
