#pragma once
// CPU building blocks of the matryoshka kernels (per CPU level): segment dot products / sums of
// squares on register-wide vectors (common/vec.h), corpus row tiles in the compute type, and
// per-prefix inverse norms.

#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "common/vec.h"
#include "matryoshka/topk.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace mat {
using namespace ::embedops::mat;  // the shared math (topk.h)

// rows are read a prefix at a time with a large stride, which the hardware prefetchers follow
// poorly: vec::prefetch of the prefix
using vec::prefetch;

template <typename T>
using simd_t = vec::vec_t<T>;
template <typename T>
constexpr int kLanes = vec::kLanes<T>;
using vec::hsum;
using vec::loadu;

// sq += sum(x[a:e]^2)
template <typename T>
inline void seg_sq(const T* __restrict__ x, int64_t a, int64_t e, T& sq) {
  constexpr int L = kLanes<T>;
  simd_t<T> acc0 = {}, acc1 = {};
  int64_t j = a;
  for (; j + 2 * L <= e; j += 2 * L) {
    const simd_t<T> v0 = loadu(x + j), v1 = loadu(x + j + L);
    acc0 += v0 * v0;
    acc1 += v1 * v1;
  }
  for (; j + L <= e; j += L) {
    const simd_t<T> v0 = loadu(x + j);
    acc0 += v0 * v0;
  }
  T s = hsum(acc0 + acc1);
  for (; j < e; ++j) s += x[j] * x[j];
  sq += s;
}

// Vector accumulators of NB query dot products and one squared norm, kept across the pieces of
// a prefix (the horizontal sums once per prefix, not once per piece: a prefix over many narrow
// segment blocks would otherwise spend more on reductions than on products). Two independent
// chains per sum for NB <= 2 (the FMA latency, not the loads, bounds one chain); one for more
// rows (the accumulators must stay in the 16 ymm registers of the avx2 level). kSq = false: dot
// products only (no norm: the dot metric, or norms given).
template <typename T, int NB, bool kSq = true>
struct SegAcc {
  static constexpr int U = NB <= 2 ? 2 : 1;
  simd_t<T> q[NB][U];
  simd_t<T> n[U];
  SegAcc() { zero(); }
  void zero() {
    for (int u = 0; u < U; ++u) {
      n[u] = simd_t<T>{};
      for (int b = 0; b < NB; ++b) q[b][u] = simd_t<T>{};
    }
  }
  // dots[b] += the accumulated dot products, sq += the norm (kSq); then zero
  void flush(T* dots, T& sq) {
    if constexpr (kSq) {
      simd_t<T> nn = n[0];
      for (int u = 1; u < U; ++u) nn += n[u];
      sq += hsum(nn);
    }
    for (int b = 0; b < NB; ++b) {
      simd_t<T> d = q[b][0];
      for (int u = 1; u < U; ++u) d += q[b][u];
      dots[b] += hsum(d);
    }
    zero();
  }
  // column value(j) (a vector of kLanes<T> columns from j) against the queries
  template <typename F>
  void run(const T* const* qr, int64_t a, int64_t e, F&& value) {
    constexpr int L = kLanes<T>;
    int64_t j = a;
    if constexpr (U == 2) {
      for (; j + 2 * L <= e; j += 2 * L) {
        const simd_t<T> v0 = value(j), v1 = value(j + L);
        if constexpr (kSq) {
          n[0] += v0 * v0;
          n[1] += v1 * v1;
        }
        for (int b = 0; b < NB; ++b) {
          q[b][0] += loadu(qr[b] + j) * v0;
          q[b][1] += loadu(qr[b] + j + L) * v1;
        }
      }
    }
    for (; j + L <= e; j += L) {
      const simd_t<T> v = value(j);
      if constexpr (kSq) n[0] += v * v;
      for (int b = 0; b < NB; ++b) q[b][0] += loadu(qr[b] + j) * v;
    }
  }
};

// acc += the columns [a, e) of x against q[b] (vector part); the scalar tail straight into dots / sq.
template <typename T, int NB>
inline void seg_dot_sq_into(const T* __restrict__ x, const T* const* q, int64_t a, int64_t e, SegAcc<T, NB>& acc,
                            T* dots, T& sq) {
  constexpr int L = kLanes<T>;
  acc.run(q, a, e, [&](int64_t j) { return loadu(x + j); });
  for (int64_t j = a + (e - a) / L * L; j < e; ++j) {
    sq += x[j] * x[j];
    for (int b = 0; b < NB; ++b) dots[b] += q[b][j] * x[j];
  }
}

// dots[b] += sum(q[b][a:e] * x[a:e]) for NB query rows, and sq += sum(x[a:e]^2).
template <typename T, int NB>
inline void seg_dot_sq(const T* __restrict__ x, const T* const* q, int64_t a, int64_t e, T* dots, T& sq) {
  SegAcc<T, NB> acc;
  seg_dot_sq_into<T, NB>(x, q, a, e, acc, dots, sq);
  acc.flush(dots, sq);
}

using vec::load_codes;

// seg_dot_sq_into over int8 / uint8 codes dequantised in registers: the value of column j is
// base[j] + step[j] * x[j] (x, base, step and q[b] indexed by the same column j).
template <typename C, int NB>
inline void code_seg_dot_sq_into(const C* __restrict__ x, const float* const* q, const float* __restrict__ base,
                                 const float* __restrict__ step, int64_t a, int64_t e, SegAcc<float, NB>& acc,
                                 float* dots, float& sq) {
  constexpr int L = kLanes<float>;
  acc.run(q, a, e, [&](int64_t j) { return loadu(base + j) + loadu(step + j) * load_codes(x + j); });
  for (int64_t j = a + (e - a) / L * L; j < e; ++j) {
    const float v = base[j] + step[j] * static_cast<float>(x[j]);
    sq += v * v;
    for (int b = 0; b < NB; ++b) dots[b] += q[b][j] * v;
  }
}

// Raw codes against scaled queries, no norm: dots[b] += sum(qs[b][j] * x[j]) over [a, e), where
// qs[b][j] = q[b][j] * step[j]. With the constant sum(q[b][j] * base[j]) added once per prefix this
// is q[b] . (base + step * x) (the dot metric, folded): one convert and one FMA per vector of codes.
template <typename C, int NB>
inline void code_seg_dot_into(const C* __restrict__ x, const float* const* qs, int64_t a, int64_t e,
                              SegAcc<float, NB, false>& acc, float* dots) {
  constexpr int L = kLanes<float>;
  acc.run(qs, a, e, [&](int64_t j) { return load_codes(x + j); });
  for (int64_t j = a + (e - a) / L * L; j < e; ++j) {
    for (int b = 0; b < NB; ++b) dots[b] += qs[b][j] * static_cast<float>(x[j]);
  }
}

// the same, summed: dots[b] += q[b] . values, sq += |values|^2
template <typename C, int NB>
inline void code_seg_dot_sq(const C* __restrict__ x, const float* const* q, const float* __restrict__ base,
                            const float* __restrict__ step, int64_t a, int64_t e, float* dots, float& sq) {
  SegAcc<float, NB> acc;
  code_seg_dot_sq_into<C, NB>(x, q, base, step, a, e, acc, dots, sq);
  acc.flush(dots, sq);
}

// out[r] (+)= <q[0:len], x[r][0:len]>, four rows at a time (GEMV over contiguous-ish rows).
template <typename T>
inline void rows_dot1(const T* __restrict__ x, int64_t ld, int64_t nrows, const T* __restrict__ q, int64_t len,
                      T* __restrict__ out, bool accumulate) {
  constexpr int L = kLanes<T>;
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) {
    simd_t<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const T* x0 = x + r * ld;
    int64_t j = 0;
    for (; j + L <= len; j += L) {
      const simd_t<T> qv = loadu(q + j);
      a0 += loadu(x0 + j) * qv;
      a1 += loadu(x0 + ld + j) * qv;
      a2 += loadu(x0 + 2 * ld + j) * qv;
      a3 += loadu(x0 + 3 * ld + j) * qv;
    }
    T d[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (; j < len; ++j) {
      for (int i = 0; i < 4; ++i) d[i] += x0[i * ld + j] * q[j];
    }
    for (int i = 0; i < 4; ++i) out[r + i] = accumulate ? out[r + i] + d[i] : d[i];
  }
  for (; r < nrows; ++r) {
    const T* xr = x + r * ld;
    simd_t<T> acc = {};
    int64_t j = 0;
    for (; j + L <= len; j += L) acc += loadu(xr + j) * loadu(q + j);
    T d = hsum(acc);
    for (; j < len; ++j) d += xr[j] * q[j];
    out[r] = accumulate ? out[r] + d : d;
  }
}



// Rows [n0, n0+nt) of a (N, ldx)-strided corpus as acc_t rows: the corpus itself when its dtype
// is acc_t, else the first `width` columns converted into a per-thread buffer.
template <typename scalar_t, typename acc_t>
struct TileRows {
  const scalar_t* x;
  int64_t ldx;
  int64_t width;
  std::vector<acc_t> buf;
  // int8 / uint8 codes: the value of column c is base[c] + step[c] * code (null: a plain cast)
  const acc_t* base = nullptr;
  const acc_t* step = nullptr;

  const acc_t* load(int64_t n0, int64_t nt, int64_t& ld) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      ld = ldx;
      return x + n0 * ldx;
    } else {
      buf.resize(static_cast<size_t>(nt * width));
      constexpr int64_t kAhead = 8;
      for (int64_t r = 0; r < nt; ++r) {
        const scalar_t* src = x + (n0 + r) * ldx;
        if (r + kAhead < nt) prefetch(src + kAhead * ldx, width * static_cast<int64_t>(sizeof(scalar_t)));
        acc_t* dst = buf.data() + r * width;
        if (base != nullptr) {
          for (int64_t c = 0; c < width; ++c) dst[c] = base[c] + step[c] * static_cast<acc_t>(src[c]);
        } else {
          for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<acc_t>(src[c]);
        }
      }
      ld = width;
      return buf.data();
    }
  }
};

// Per-prefix inverse norms of `rows` contiguous acc_t rows of length >= dims.back():
// out[p * out_stride + r] = inv_norm(||row_r[:dims[p]]||).
template <typename acc_t>
inline void prefix_inv_norms(const acc_t* rows, int64_t ld, int64_t nrows, const std::vector<int64_t>& dims,
                             acc_t* out, int64_t out_stride) {
  for (int64_t r = 0; r < nrows; ++r) {
    acc_t sq = 0;
    int64_t a = 0;
    for (size_t p = 0; p < dims.size(); ++p) {
      seg_sq(rows + r * ld, a, dims[p], sq);
      out[static_cast<int64_t>(p) * out_stride + r] = inv_norm_from_sq(sq);
      a = dims[p];
    }
  }
}

}  // namespace mat
}  // namespace CPU_CAPABILITY
}  // namespace embedops
