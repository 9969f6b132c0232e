// Every embedops schema, in one place. Backends register their kernels in their own files with
// TORCH_LIBRARY_IMPL(embedops, CPU|CUDA, m); fake (meta) kernels and autograd are registered in
// python/embedops/_ops.py.

#include <torch/library.h>

TORCH_LIBRARY(embedops, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};

  // ---- embedding ------------------------------------------------------------------------------
  m.def("hash_ids(Tensor values, int feature, int probe, int num_rows, int seed=0) -> Tensor", pt2);
  // pooling: the bag reduction ("mode" in the Python API; a schema argument named "mode" clashes
  // with torch.library internals). -> (out (B, out_dim), argmax (B, Q*D) int64 for mode "max", else (0,))
  // weight: a float (R, D) table, or a uint8 int8-row-quantised (R, D + 8) table (embedding/quantized.h;
  // forward only: float32 out, argmax always (0,)).
  m.def(
      "multiplexed_embedding_bag(Tensor weight, Tensor values, Tensor offsets, int[] num_probes, "
      "str combine=\"concat\", str pooling=\"sum\", Tensor? per_sample_weights=None, int seed=0, "
      "bool validate=True) -> (Tensor, Tensor)",
      pt2);
  // -> (grad_weight (R, D) dense or (0,), grad_per_sample_weights (N,) or (0,))
  m.def(
      "multiplexed_embedding_bag_backward(Tensor grad_out, Tensor weight, Tensor values, Tensor offsets, "
      "Tensor argmax, int[] num_probes, str combine, str pooling, Tensor? per_sample_weights, int seed, "
      "bool weight_grad=True, bool psw_grad=False) -> (Tensor, Tensor)",
      pt2);
  // Fused optimizer step on the touched rows only: weight (and state, rowwise_adagrad) in place.
  m.def(
      "multiplexed_embedding_bag_update(Tensor(a!) weight, Tensor(b!) state, Tensor grad_out, Tensor values, "
      "Tensor offsets, Tensor argmax, int[] num_probes, str combine, str pooling, Tensor? per_sample_weights, "
      "int seed, str optimizer, float lr, float eps) -> ()",
      pt2);

  // ---- matryoshka -----------------------------------------------------------------------------
  m.def("matryoshka_similarity(Tensor queries, Tensor corpus, int[] dims, str metric=\"cosine\") -> Tensor", pt2);
  // Packed binary codes (uint8 "ubinary" or int8 "binary"), queries (B, nbytes), corpus (N, nbytes);
  // the k nearest corpus rows by Hamming distance over the first nbits bits (-1: all), nearest
  // first, ties to the lower index: distances (B, k) int32, indices (B, k) int64.
  m.def("hamming_topk(Tensor query_codes, Tensor corpus_codes, int k, int nbits=-1) -> (Tensor distances, "
        "Tensor indices)", pt2);
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
  // float queries (B, D) against int8 / uint8 codes (column blocks, widths adding up to D) made with
  // the (2, D) min/max `ranges`, dequantised on the fly: values / indices (P, B, k) like matryoshka_topk
  m.def("int8_topk(Tensor queries, Tensor[] blocks, Tensor ranges, int k, int[] dims, str metric=\"dot\", "
        "Tensor? corpus_inv_norms=None) -> (Tensor, Tensor)", pt2);
  // the best k of each query's candidate rows (B, C) at prefix dim, over float blocks or (ranges
  // given) int8 / uint8 code blocks: values / indices (B, k)
  m.def("matryoshka_rescore(Tensor queries, Tensor[] blocks, Tensor candidates, int k, int dim, "
        "str metric=\"cosine\", Tensor? ranges=None) -> (Tensor, Tensor)", pt2);

  // ---- attention ------------------------------------------------------------------------------
  // out (B, Lq, Hq, Dv) in q's dtype, lse (B, Hq, Lq) float32 (float64 for float64 inputs).
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lengths=None, Tensor? q_lengths=None, "
        "float? scale=None) -> (Tensor out, Tensor lse)", pt2);
  // varlen: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv); out (Tq, Hq, Dv), lse (Hq, Tq).
  m.def("cross_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float? scale=None) -> (Tensor out, Tensor lse)", pt2);
  // Backward (flash-style, recomputes P from lse); dlse is the gradient of the lse output; scale as
  // given to the forward (None: the same default, resolved in C++).
  m.def("cross_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? dlse, Tensor? kv_lengths, Tensor? q_lengths, float? scale) -> (Tensor dq, Tensor dk, Tensor dv)", pt2);
  m.def("cross_attention_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? dlse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float? scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv)", pt2);
  // co_attention: qx (B, Lx, H, D), ky (B, Ly, H, D), vx (B, Lx, H, Dvx), vy (B, Ly, H, Dvy);
  // ox (B, Lx, H, Dvy), oy (B, Ly, H, Dvx), lse_x (B, H, Lx), lse_y (B, H, Ly) (row / column lse).
  m.def("co_attention(Tensor qx, Tensor ky, Tensor vx, Tensor vy, Tensor? x_lengths=None, "
        "Tensor? y_lengths=None, float? scale=None) -> (Tensor ox, Tensor oy, Tensor lse_x, Tensor lse_y)", pt2);
  m.def("co_attention_backward(Tensor dox, Tensor doy, Tensor qx, Tensor ky, Tensor vx, Tensor vy, Tensor ox, "
        "Tensor oy, Tensor lse_x, Tensor lse_y, Tensor? dlse_x, Tensor? dlse_y, Tensor? x_lengths, "
        "Tensor? y_lengths, float? scale) -> (Tensor dqx, Tensor dky, Tensor dvx, Tensor dvy)", pt2);
  // mixture_attention: q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv), segment_lengths (B, M),
  // weights (B, Lq, M) or (B, Lq, Hq, M); out (B, Lq, Hq, Dv), lse (B, Hq, Lq, M),
  // seg_out (B, Lq, Hq, M, Dv) (each modality's normalised output, kept for the backward).
  m.def("mixture_attention(Tensor q, Tensor k, Tensor v, Tensor segment_lengths, Tensor weights, "
        "float? scale=None) -> (Tensor out, Tensor lse, Tensor seg_out)", pt2);
  m.def("mixture_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor segment_lengths, "
        "Tensor weights, Tensor seg_out, Tensor lse, float? scale) -> (Tensor dq, Tensor dk, Tensor dv, "
        "Tensor dweights)", pt2);
}
