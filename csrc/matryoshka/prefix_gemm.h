#pragma once
// A register-blocked float32 GEMM for prefix scores: S = Q X^T accumulated over d in [0, dmax)
// with the accumulators checkpointed at every prefix boundary d = dims[p]. Every prefix's scores
// come out of ONE pass over a corpus tile and the partial sums never leave registers between
// prefixes (a per-segment BLAS call re-reads and re-writes the score tile once per segment, and
// runs at short, inefficient K).
//
// Layout (both operands d-major, so the inner loop is one broadcast and two vector loads per d):
//   queries: panels of kMR rows, qp[d * kMR + i] = q[b0 + i][d] (rows past B are zero);
//   corpus:  panels of kNR rows, xp[d * kNR + r] = x[n0 + r][d] (rows past N are zero), packed
//            with an in-register 16x16 transpose.
// A micro tile is kMR queries x kNR rows: 2 * kMR vector accumulators.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "matryoshka/cpu_kernels.h"
#include "matryoshka/topk.h"

namespace embedops {
namespace mat {

using vf = simd_t<float>;
constexpr int kVec = kLanes<float>;  // 16
constexpr int kNR = 2 * kVec;        // corpus rows per panel
#if defined(__AVX512F__)
constexpr int kMR = 12;  // 24 accumulators + 2 corpus vectors + 1 broadcast of 32 zmm registers
#else
constexpr int kMR = 2;  // a 64-byte vector is two ymm registers: keep within 16 of them
#endif

// --- 16 x 16 transpose, in four butterfly stages ------------------------------------------
// Stage b pairs rows i and i + b (i & b == 0) and swaps their off-diagonal b-wide blocks:
//   lo[t] = t % 2b < b ? v_i[t] : v_{i+b}[t - b]      hi[t] = t % 2b < b ? v_i[t + b] : v_{i+b}[t]
template <int b, int... T>
inline vf butterfly_lo(vf x, vf y, std::integer_sequence<int, T...>) {
  return __builtin_shufflevector(x, y, ((T % (2 * b)) < b ? T : kVec + T - b)...);
}
template <int b, int... T>
inline vf butterfly_hi(vf x, vf y, std::integer_sequence<int, T...>) {
  return __builtin_shufflevector(x, y, ((T % (2 * b)) < b ? T + b : kVec + T)...);
}
template <int b>
inline void butterfly_stage(vf* v) {
  using Seq = std::make_integer_sequence<int, kVec>;
#pragma GCC unroll 16
  for (int i = 0; i < kVec; ++i) {
    if (i & b) continue;
    const vf lo = butterfly_lo<b>(v[i], v[i + b], Seq{});
    const vf hi = butterfly_hi<b>(v[i], v[i + b], Seq{});
    v[i] = lo;
    v[i + b] = hi;
  }
}
// v[r][c] -> v[c][r]
inline void transpose16(vf* v) {
  butterfly_stage<8>(v);
  butterfly_stage<4>(v);
  butterfly_stage<2>(v);
  butterfly_stage<1>(v);
}

// Loads x[0:n] (n <= 16) into a vector, zeros past n; never reads past x[n - 1].
inline vf load_partial(const float* x, int64_t n) {
  if (n >= kVec) return loadu(x);
  vf v = {};
  if (n > 0) std::memcpy(&v, x, static_cast<size_t>(n) * sizeof(float));
  return v;
}

inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// A streaming (non-temporal) store of 16 floats to a 64-byte aligned p: a large output written
// once skips the read-for-ownership of every line. Pair with stream_fence() before the writes
// are published to other threads.
inline void store_stream(float* p, vf v) {
#if defined(__AVX512F__)
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  _mm512_stream_ps(p, r);
#elif defined(__AVX__)
  __m256 r[2];
  std::memcpy(r, &v, sizeof(r));
  _mm256_stream_ps(p, r[0]);
  _mm256_stream_ps(p + 8, r[1]);
#else
  storeu(p, v);
#endif
}

inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Packs columns [c_lo, c_hi) of rows [0, nr) (nr <= kNR) of `rows` (row stride ld) into rows
// d_off .. d_off + (c_hi - c_lo) of the corpus panel xp (d-major, kNR wide); rows nr..kNR-1 are
// zero. A corpus stored as column blocks packs block by block into one panel.
inline void pack_corpus_panel(const float* rows, int64_t ld, int64_t nr, int64_t c_lo, int64_t c_hi, int64_t d_off,
                              float* __restrict__ xp) {
  for (int half = 0; half < 2; ++half) {
    const int64_t r0 = half * kVec;
    for (int64_t c0 = c_lo; c0 < c_hi; c0 += kVec) {
      const int64_t w = std::min<int64_t>(kVec, c_hi - c0);
      vf v[kVec];
      for (int r = 0; r < kVec; ++r) v[r] = r0 + r < nr ? load_partial(rows + (r0 + r) * ld + c0, w) : vf{};
      transpose16(v);
      float* dst = xp + (d_off + c0 - c_lo) * kNR + r0;
      for (int64_t t = 0; t < w; ++t) storeu(dst + t * kNR, v[t]);
    }
  }
}

// Packs the B queries of q (B x ldq) into ceil(B / kMR) query panels of dmax x kMR each, d-major
// (qp[(i * dmax + d) * kMR + r] = q[i * kMR + r][d], zero past B).
inline std::vector<float> pack_query_panels(const float* q, int64_t ldq, int64_t B, int64_t dmax) {
  const int64_t npanels = (B + kMR - 1) / kMR;
  std::vector<float> qp(static_cast<size_t>(npanels * dmax * kMR));
  for (int64_t i = 0; i < npanels; ++i) {
    const int64_t mr = std::min<int64_t>(kMR, B - i * kMR);
    float* dst = qp.data() + i * dmax * kMR;
    for (int64_t d = 0; d < dmax; ++d) {
      for (int r = 0; r < kMR; ++r) dst[d * kMR + r] = r < mr ? q[(i * kMR + r) * ldq + d] : 0.f;
    }
  }
  return qp;
}

// inv_norm_from_sq (topk.h) on 16 lanes: 1/sqrt(sq) (correctly rounded, the same bits as the
// scalar rule), 0 where sq == 0, NaN where sq is not finite.
inline vf inv_norm16(vf sq) {
  vf r;
#if defined(__AVX512F__)
  __m512 s;
  std::memcpy(&s, &sq, sizeof(s));
  const __m512 v = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_sqrt_ps(s));
  std::memcpy(&r, &v, sizeof(r));
#else
  for (int i = 0; i < kVec; ++i) r[i] = inv_norm_from_sq(sq[i]);
#endif
  r = sq == 0.f ? vf{} : r;
  const vf nan = vf{} + std::numeric_limits<float>::quiet_NaN();
  return sq <= std::numeric_limits<float>::max() ? r : nan;
}

// Per-prefix inverse norms of a packed corpus panel: inv[p * kNR + r] = inv_norm(||x_r[:dims[p]]||).
inline void panel_inv_norms(const float* __restrict__ xp, const int64_t* dims, int64_t P, float* __restrict__ inv) {
  vf sq0 = {}, sq1 = {};
  int64_t d = 0;
  for (int64_t p = 0; p < P; ++p) {
    for (; d < dims[p]; ++d) {
      const vf a = loadu(xp + d * kNR), b = loadu(xp + d * kNR + kVec);
      sq0 += a * a;
      sq1 += b * b;
    }
    storeu(inv + p * kNR, inv_norm16(sq0));
    storeu(inv + p * kNR + kVec, inv_norm16(sq1));
  }
}

// The micro kernel: accumulates one query panel against one corpus panel over d in [0, dims[P-1])
// and calls store(p, acc) after each prefix boundary, acc[i][h] holding the dot products of query
// i with rows h*16 .. h*16+15 at prefix dims[p].
template <typename Store>
inline void prefix_micro_tile(const float* __restrict__ qp, const float* __restrict__ xp, const int64_t* dims,
                              int64_t P, Store&& store) {
  vf acc[kMR][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = vf{};
  int64_t d = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = dims[p];
#pragma GCC unroll 4
    for (; d < e; ++d) {
      const vf x0 = loadu(xp + d * kNR), x1 = loadu(xp + d * kNR + kVec);
      const float* qd = qp + d * kMR;
#pragma GCC unroll 12
      for (int i = 0; i < kMR; ++i) {
        const float s = qd[i];
        acc[i][0] += s * x0;
        acc[i][1] += s * x1;
      }
    }
    store(p, acc);
  }
}

// Cosine of 16 lanes at one prefix: dot * inv_q * inv_x, 0 where either prefix is zero
// (cosine_from_dot's rule, lane by lane).
inline vf cosine16(vf dot, float inv_q, vf inv_x) {
  if (inv_q == 0.f) return vf{};
  const vf r = dot * inv_q * inv_x;
  return inv_x != 0.f ? r : vf{};
}

// True if some lane is not below thr (v >= thr, or either is NaN): the lanes that threshold-first
// admission must look at. Almost always false once a top-k heap is full.
inline bool any_not_below(vf v, float thr) {
  typedef int32_t vi __attribute__((vector_size(64)));
  const vi m = ~(v < thr);
  int32_t lanes[kVec];
  std::memcpy(lanes, &m, sizeof(m));
  int32_t any = 0;
  for (int i = 0; i < kVec; ++i) any |= lanes[i];
  return any != 0;
}

}  // namespace mat
}  // namespace embedops
