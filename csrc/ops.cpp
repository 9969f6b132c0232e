// Every embedops schema, in one place. Backends register their kernels in their own files with
// TORCH_LIBRARY_IMPL(embedops, CPU|CUDA, m); fake (meta) kernels and autograd are registered in
// python/embedops/_ops.py.

#include <torch/library.h>

TORCH_LIBRARY(embedops, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};

  // ---- embedding ------------------------------------------------------------------------------
  m.def("hash_ids(Tensor values, int feature, int probe, int num_rows, int seed=0) -> Tensor", pt2);

  // ---- matryoshka -----------------------------------------------------------------------------

  // ---- attention ------------------------------------------------------------------------------
  // out (B, Lq, Hq, Dv) in q's dtype, lse (B, Hq, Lq) float32 (float64 for float64 inputs).
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lengths=None, Tensor? q_lengths=None, "
        "float? scale=None) -> (Tensor out, Tensor lse)", pt2);
  // varlen: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv); out (Tq, Hq, Dv), lse (Hq, Tq).
  m.def("cross_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float? scale=None) -> (Tensor out, Tensor lse)", pt2);
  // Backward (flash-style, recomputes P from lse); dlse is the gradient of the lse output.
  m.def("cross_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? dlse, Tensor? kv_lengths, Tensor? q_lengths, float scale) -> (Tensor dq, Tensor dk, Tensor dv)", pt2);
  m.def("cross_attention_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? dlse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv)", pt2);
  // co_attention: qx (B, Lx, H, D), ky (B, Ly, H, D), vx (B, Lx, H, Dvx), vy (B, Ly, H, Dvy);
  // ox (B, Lx, H, Dvy), oy (B, Ly, H, Dvx), lse_x (B, H, Lx), lse_y (B, H, Ly) (row / column lse).
  m.def("co_attention(Tensor qx, Tensor ky, Tensor vx, Tensor vy, Tensor? x_lengths=None, "
        "Tensor? y_lengths=None, float? scale=None) -> (Tensor ox, Tensor oy, Tensor lse_x, Tensor lse_y)", pt2);
  m.def("co_attention_backward(Tensor dox, Tensor doy, Tensor qx, Tensor ky, Tensor vx, Tensor vy, Tensor ox, "
        "Tensor oy, Tensor lse_x, Tensor lse_y, Tensor? dlse_x, Tensor? dlse_y, Tensor? x_lengths, "
        "Tensor? y_lengths, float scale) -> (Tensor dqx, Tensor dky, Tensor dvx, Tensor dvy)", pt2);
  // mixture_attention: q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv), segment_lengths (B, M),
  // weights (B, Lq, M) or (B, Lq, Hq, M); out (B, Lq, Hq, Dv), lse (B, Hq, Lq, M),
  // seg_out (B, Lq, Hq, M, Dv) (each modality's normalised output, kept for the backward).
  m.def("mixture_attention(Tensor q, Tensor k, Tensor v, Tensor segment_lengths, Tensor weights, "
        "float? scale=None) -> (Tensor out, Tensor lse, Tensor seg_out)", pt2);
  m.def("mixture_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor segment_lengths, "
        "Tensor weights, Tensor seg_out, Tensor lse, float scale) -> (Tensor dq, Tensor dk, Tensor dv, "
        "Tensor dweights)", pt2);
}
