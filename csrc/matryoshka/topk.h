#pragma once
// Math the matryoshka family's CPU and CUDA kernels must agree on: per-prefix inverse norms,
// the cosine rule for zero / non-finite prefixes, THE ranking order of (score, index) pairs
// (best first, NaN last, ties to the lower index), and the bounded top-k heap.
//
// Scores are computed in `acc_t` = at::opmath_type<scalar_t> (float for float32/float16/bfloat16,
// double for float64).

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace embedops {
namespace mat {

// 1/||v|| from ||v||^2: 0 for a zero vector (so its cosine is 0), NaN for a non-finite norm
// (an inf or NaN in the prefix), else 1/sqrt(sq).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_norm_from_sq(acc_t sq) {
  if (sq == acc_t(0)) return acc_t(0);
  if (!(sq <= std::numeric_limits<acc_t>::max())) return std::numeric_limits<acc_t>::quiet_NaN();
  return acc_t(1) / ::sqrt(sq);
}

// Cosine at one prefix from the raw dot product and both inverse norms: 0 when either prefix is
// zero (never NaN), NaN when either prefix holds inf/NaN, else dot / (||q|| ||x||).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cosine_from_dot(acc_t dot, acc_t inv_q, acc_t inv_x) {
  return (inv_q == acc_t(0) || inv_x == acc_t(0)) ? acc_t(0) : dot * inv_q * inv_x;
}

// The total order of top-k results: a ranks before b if its score is larger, or equal with a
// lower index. NaN scores rank after every number (and among themselves by index).
template <typename acc_t>
C10_HOST_DEVICE inline bool ranks_before(acc_t sa, int64_t ia, acc_t sb, int64_t ib) {
  const bool na = sa != sa;
  const bool nb = sb != sb;
  if (na || nb) return !na || (nb && ia < ib);
  return sa > sb || (sa == sb && ia < ib);
}

// The empty slot of a top-k buffer: ranks after every real candidate (NaN, largest index).
constexpr int64_t kSentinelIndex = std::numeric_limits<int64_t>::max();
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sentinel_score() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// A bounded top-k kept as a binary heap whose root is the WORST kept entry (so a candidate is
// rejected with one comparison against the root). `s`/`id` have k slots, filled with sentinels
// initially. Returns true if (score, index) was admitted.
template <typename acc_t>
C10_HOST_DEVICE inline bool heap_push(acc_t* s, int64_t* id, int64_t k, acc_t score, int64_t index) {
  if (!ranks_before(score, index, s[0], id[0])) return false;
  int64_t i = 0;
  while (true) {
    const int64_t l = 2 * i + 1;
    if (l >= k) break;
    const int64_t r = l + 1;
    int64_t w = l;  // the worse child
    if (r < k && ranks_before(s[l], id[l], s[r], id[r])) w = r;
    if (ranks_before(s[w], id[w], score, index)) break;  // new entry is worse than both children
    s[i] = s[w];
    id[i] = id[w];
    i = w;
  }
  s[i] = score;
  id[i] = index;
  return true;
}

}  // namespace mat
}  // namespace embedops
