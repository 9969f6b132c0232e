#pragma once
// Attention family: the math the CPU and CUDA kernels share, and the host-side problem
// description both backends build from the same argument checks.
//
// Online softmax (flash-style), per query row, over key blocks:
//   m' = max(m, max_j s_j)                   running max of the scaled scores
//   alpha = exp(m - m')                      rescale of what was accumulated so far
//   l' = alpha * l + sum_j exp(s_j - m')     running denominator
//   acc' = alpha * acc + sum_j exp(s_j - m') v_j
// and at the end out = acc / l, lse = m + log(l). A row that has seen no valid key keeps
// m = -inf, l = 0: every helper below guards m == -inf so such a row yields out = 0, lse = -inf
// and (in the backward, P = exp(s - lse)) a zero gradient, never exp(-inf - -inf) = NaN.
//
// Everything is computed in acc_t = at::opmath_type<scalar_t> (float for half/bfloat16/float,
// double for double).

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <optional>

namespace embedops {
namespace attn {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// exp(m_old - m_new): the factor that rescales the state accumulated under the old max.
// m_old == -inf (nothing accumulated yet) gives 0, also when m_new is -inf.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_rescale(acc_t m_old, acc_t m_new) {
  return m_old == neg_inf<acc_t>() ? acc_t(0) : static_cast<acc_t>(std::exp(m_old - m_new));
}

// exp(s - m) for a score s under the running max m (or under lse in the backward). m == -inf
// means the row has no valid key: probability 0 instead of NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_prob(acc_t s, acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : static_cast<acc_t>(std::exp(s - m));
}

// The new running max after seeing a block whose largest scaled score is block_max.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_new_max(acc_t m_old, acc_t block_max) {
  return block_max > m_old ? block_max : m_old;
}

// log-sum-exp of the row at the end: -inf for a row without valid keys.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_lse(acc_t m, acc_t l) {
  return l > acc_t(0) ? static_cast<acc_t>(m + std::log(l)) : neg_inf<acc_t>();
}

// 1 / l, the final normaliser of the accumulator: 0 for a row without valid keys (out = 0).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_inv_denominator(acc_t l) {
  return l > acc_t(0) ? acc_t(1) / l : acc_t(0);
}

// Backward: dS = P * (dP - delta), delta = rowsum(dO * O) - dlse (the lse output's gradient).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_grad(acc_t p, acc_t dp, acc_t delta) {
  return p * (dp - delta);
}

}  // namespace attn

// ---- host side: one problem description for padded and varlen layouts ----------------------
//
// Every tensor is addressed as  base + b * stride_b + (start[b] + i) * stride_l + h * stride_h
// (+ d, the last dim is contiguous). The padded layout (B, L, H, D) has start = 0; the varlen
// layout (T, H, D) has stride_b = 0 and start = cu_seqlens[b]. lse is addressed the same way
// with stride_l = 1: (B, Hq, Lq) padded, (Hq, Tq) varlen.

struct SeqDesc {
  int64_t batch = 0;
  int64_t max_q_slot = 0;  // rows per sequence the kernels visit (Lq padded, max q length varlen)
  int64_t max_k = 0;       // longest key sequence
  // (5, B) int64 on the CPU: q_start, q_len (valid rows), q_slot (rows to write), k_start, k_len
  at::Tensor desc;
  // no lengths given: every sequence is (Lq, Lk); the same descriptor on every such call (CUDA
  // keeps its device copy instead of copying it again)
  bool uniform = false;
};

// A padded-layout SeqDesc (q_start = 0) with per-batch query lengths / slots and key ranges.
SeqDesc make_seq_desc(int64_t B, const int64_t* q_len, int64_t q_slot, const int64_t* k_start, const int64_t* k_len);

// Validates the padded op's arguments (ranks, sizes, dtypes, devices, lengths); returns the
// sequences. Raises with the op and argument named.
SeqDesc check_cross_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const std::optional<at::Tensor>& kv_lengths,
                                   const std::optional<at::Tensor>& q_lengths);

SeqDesc check_cross_attention_varlen_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k);

// Checks the backward's extra tensors (dout, out, lse, dlse) against q and v.
void check_cross_attention_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& dlse, bool varlen);

double resolve_scale(const char* op, std::optional<double> scale, int64_t head_dim);

// The lse dtype: float32, or float64 for float64 inputs.
at::ScalarType lse_dtype(at::ScalarType input);

}  // namespace embedops
