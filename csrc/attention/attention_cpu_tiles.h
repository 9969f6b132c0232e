#pragma once
// Attention family, CPU: the tile helpers every CPU attention kernel shares (cross_attention,
// co_attention, mixture_attention): BLAS GEMM on raw strided tiles, 16-lane exp/max for the
// softmax rows, tile conversion for float16/bfloat16, tile-size heuristics, row addressing.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>


#include "attention/attention.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace embedops {
namespace attn_cpu {

// ---- GEMM on raw tiles ---------------------------------------------------------------------
// Column-major BLAS convention (like ATen's cpublas): C (m x n, ldc) = alpha op(A) op(B) + beta C.
// x86 torch wheels export MKL's Fortran sgemm_/dgemm_ from libtorch_cpu; they are called
// directly (single-threaded inside our parallel region, no tensor wrapping). Where a torch build
// does not export them (weak symbols resolve to null), the same product goes through at::addmm
// on from_blob views.

enum class TransposeType { NoTranspose, Transpose };

template <typename T>
inline void gemm_aten(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const bool an = ta == TransposeType::NoTranspose, bn = tb == TransposeType::NoTranspose;
  // a stored column-major (rows x cols, ld) is the row-major (cols x rows, strides (ld, 1)) tensor of its transpose
  at::Tensor At = at::from_blob(const_cast<T*>(a), {an ? k : m, an ? m : k}, {lda, 1}, opts);
  at::Tensor Bt = at::from_blob(const_cast<T*>(b), {bn ? n : k, bn ? k : n}, {ldb, 1}, opts);
  at::Tensor Ct = at::from_blob(c, {n, m}, {ldc, 1}, opts);
  // C^T = op(B)^T op(A)^T
  const at::Tensor x = bn ? Bt : Bt.t(), y = an ? At : At.t();
  if (beta == T(0)) Ct.zero_();
  Ct.addmm_(x, y, beta == T(0) ? T(1) : beta, alpha);
}

template <typename T>
inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  auto fn = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_;
    else return dgemm_;
  }();
  if (fn == nullptr || m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax || ldc > kMax) {
    gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char tra = ta == TransposeType::NoTranspose ? 'N' : 'T', trb = tb == TransposeType::NoTranspose ? 'N' : 'T';
  // BLAS wants ld >= the stored row count even for a single column
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(std::max<int64_t>(lda, std::max<int64_t>(1, tra == 'N' ? m : k)));
  const int ib = static_cast<int>(std::max<int64_t>(ldb, std::max<int64_t>(1, trb == 'N' ? k : n)));
  const int ic = static_cast<int>(std::max<int64_t>(ldc, std::max<int64_t>(1, m)));
  fn(&tra, &trb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

constexpr int64_t kMinBlockK = 512;

// Keys per tile: 512, more for short query tiles (latent queries over long sequences: fewer
// online-softmax rescales, larger GEMMs). A multiple of 16.
inline int64_t block_k_for(int64_t block_q) { return std::clamp<int64_t>((32768 / block_q) / 16 * 16, kMinBlockK, 2048); }

// Score rows are stored with a stride rounded up to the 16-lane vector width; the padding holds
// -inf, so the row max / exp loops run without a scalar tail (exp(-inf) = 0 adds nothing).
inline int64_t padded_len(int64_t kn) { return (kn + 15) / 16 * 16; }

// Query rows per tile: about 32K scores per (BQ x BK) tile, so short key sequences (image->text,
// Lk ~ 77) get tall tiles instead of many tiny GEMMs.
// The height is then evened out over the tiles a sequence needs (Lq = 77: 40 + 37, not 64 + 13).
inline int64_t block_q_for(int64_t max_k, int64_t max_q) {
  const int64_t kn = std::clamp<int64_t>(max_k, 1, kMinBlockK);
  const int64_t bq = std::clamp<int64_t>((32768 / kn) / 16 * 16, 64, 512);
  const int64_t tiles = std::max<int64_t>(1, (max_q + bq - 1) / bq);
  return std::clamp<int64_t>(((max_q + tiles - 1) / tiles + 7) / 8 * 8, 8, bq);
}

// A (.., L, H, X) tensor with a contiguous last dim: element (b, token, h, 0).
template <typename T>
struct Rows {
  T* base;
  int64_t sb, sl, sh;
  T* at(int64_t b, int64_t tok, int64_t h) const { return base + b * sb + tok * sl + h * sh; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t, bool varlen) {
  T* p = const_cast<T*>(t.const_data_ptr<T>());
  if (varlen) return {p, 0, t.stride(0), t.stride(1)};
  return {p, t.stride(0), t.stride(1), t.stride(2)};
}

// The kernels read rows with BLAS: the last dim must be contiguous and the token stride a valid
// leading dimension. Anything else (e.g. broadcast views) is copied once.
inline at::Tensor prepare(const at::Tensor& t, bool varlen) {
  at::Tensor c = t;
  const int64_t tok_dim = varlen ? 0 : 1;
  if (c.stride(-1) != 1 || c.stride(tok_dim) < c.size(-1)) c = c.contiguous();
  return c;
}

struct Seqs {
  const int64_t *q_start, *q_len, *q_slot, *k_start, *k_len;
  explicit Seqs(const SeqDesc& d) {
    const int64_t* p = d.desc.const_data_ptr<int64_t>();
    const int64_t B = d.batch;
    q_start = p;
    q_len = p + B;
    q_slot = p + 2 * B;
    k_start = p + 3 * B;
    k_len = p + 4 * B;
  }
};

// exp(x) for float, branch-free so the loops below vectorise (-O3 -march=native): 2^n * p(r)
// with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (rel. error ~2e-7).
// x below -87 (2^-126) gives 0.
inline float exp_f32(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = std::bit_cast<float>(e);
  return x < -87.0f ? 0.0f : p * scale;
}

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp_f32(x); }

// 16-float vectors (GCC/Clang vector extensions: AVX-512, or two AVX2 registers) for the
// per-row softmax work; the compiler's auto-vectoriser kept the scalar loop inside the kernel.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }
// (not vf16{} + x: adding +0.0 is not an identity for -0.0, so that costs an add per broadcast)
inline vf16 splat16(float x) { return vf16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// The register-blocked product the short-key / short-query passes are made of:
// acc[r][c] += a(r, j) * b(j, c) for j < n, with one broadcast per (r, j) and one vector load per
// (j, c); R x C vector accumulators stay in registers (R * C + C + 1 <= 32 on AVX-512).
template <int R, int C>
inline void zero_acc(vf16 (&acc)[R][C]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = vf16{};
}

template <int R, int C, typename A, typename Bv>
inline void broadcast_fma(int64_t n, vf16 (&acc)[R][C], const A& a, const Bv& b) {
  for (int64_t j = 0; j < n; ++j) {
    vf16 bv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) bv[c] = b(j, c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf16 x = splat16(a(r, j));
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] += x * bv[c];
    }
  }
}

// exp_f32 on 16 lanes (same formula; round-to-nearest by the 1.5 * 2^23 trick).
inline vf16 exp16(vf16 x) {
  const vf16 lo = splat16(-87.0f), hi = splat16(88.0f), magic = splat16(12582912.0f);
  vf16 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf16 n = (xc * 1.44269504088896341f + magic) - magic;
  const vf16 r = xc - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  vf16 p = splat16(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  vf16 pow2n;
  std::memcpy(&pow2n, &e, sizeof(pow2n));
  const vf16 res = p * pow2n;
  return x < lo ? vf16{} : res;
}

// Horizontal sum / max of the 16 lanes: a shuffle tree (4 steps) instead of 15 scalar ops.
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
inline vf4 halves_max(vf16 v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vf8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf8 m8 = a > b ? a : b;
  const vf4 c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  return c > d ? c : d;
}
inline float hsum16(vf16 v) {
  const vf8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
inline float hmax16(vf16 v) {
  const vf4 m4 = halves_max(v);
  return std::max(std::max(m4[0], m4[2]), std::max(m4[1], m4[3]));
}

template <typename T>
T row_max(const T* x, int64_t n) {
  T mx = attn::neg_inf<T>();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kVec) {
      vf16 m = load16(x);
      for (j = kVec; j + kVec <= n; j += kVec) {
        const vf16 y = load16(x + j);
        m = y > m ? y : m;
      }
      mx = hmax16(m);
    }
  }
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// x[j] = exp(x[j] - m) (the softmax_prob of attention.h, vectorised); returns sum_j x[j].
template <typename T>
T exp_row(T* x, int64_t n, T m) {
  if (m == attn::neg_inf<T>()) {  // the row has no valid key: P = 0 (attn::softmax_prob)
    std::fill(x, x + n, T(0));
    return T(0);
  }
  T sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    vf16 acc{};
    const vf16 mv = splat16(m);
    for (; j + kVec <= n; j += kVec) {
      const vf16 e = exp16(load16(x + j) - mv);
      store16(x + j, e);
      acc += e;
    }
    sum = hsum16(acc);
  }
  for (; j < n; ++j) {
    const T e = exp_any(x[j] - m);
    x[j] = e;
    sum += e;
  }
  return sum;
}

// One forward step of the online softmax on a (qn x kn) score tile S (row-major, leading dim
// lds = padded_len(kn), scaled scores in columns [0, kn)): per row, the running max m and sum l
// are updated (attention.h), S becomes P = exp(S - m_new), acc (qn x Dv) is rescaled (unless this
// is the first key tile) and acc += P V. v is (kn x Dv) with leading dim ldv.
template <typename T>
void forward_tile_update(int64_t qn, int64_t kn, int64_t Dv, T* S, T* m, T* l, T* acc, const T* vptr, int64_t ldv,
                         bool first_tile) {
  const int64_t lds = padded_len(kn);
  for (int64_t r = 0; r < qn; ++r) {
    T* row = S + r * lds;
    std::fill(row + kn, row + lds, attn::neg_inf<T>());  // vector-width padding: exp -> 0
    const T m_new = attn::softmax_new_max(m[r], row_max(row, lds));
    const T alpha = attn::softmax_rescale(m[r], m_new);
    const T sum = exp_row(row, lds, m_new);
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    if (alpha != T(1) && !first_tile) {  // (before the first key tile acc is still 0)
      T* a = acc + r * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] *= alpha;
    }
  }
  // acc (qn x Dv) += P V
  gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, Dv, qn, kn, T(1), vptr, ldv, S, lds, T(1), acc, Dv);
}

// One flash-style backward step on a (qn queries x kn keys) tile, shared by every attention
// backward: P = exp(scale Q K^T - lse) recomputed (padded columns to lds give 0), then
//   dV += P^T dO,  dP = dO V^T,  dS = attn::softmax_grad(P, dP, delta),
//   dQ += scale dS K,  dK += scale dS^T Q.
// dq is (qn x D); dk (kn x D) and dv (kn x Dv) point at the tile's first key; P, dP hold qn x lds.
template <typename T>
void backward_tile(int64_t qn, int64_t kn, int64_t D, int64_t Dv, T scale, const T* qptr, int64_t ldq,
                   const T* kptr, int64_t ldk, const T* vptr, int64_t ldv, const T* doptr, int64_t lddo,
                   const T* lrow, const T* delta, T* P, T* dP, T* dq, T* dk, T* dv) {
  const int64_t lds = padded_len(kn);
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, D, scale, kptr, ldk, qptr, ldq, T(0), P, lds);
  for (int64_t r = 0; r < qn; ++r) {  // P = exp(S - lse)
    T* row = P + r * lds;
    std::fill(row + kn, row + lds, attn::neg_inf<T>());
    exp_row(row, lds, lrow[r]);
  }
  // dV (kn x Dv) += P^T dO
  gemm(TransposeType::NoTranspose, TransposeType::Transpose, Dv, kn, qn, T(1), doptr, lddo, P, lds, T(1), dv, Dv);
  // dP (qn x kn) = dO V^T
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, Dv, T(1), vptr, ldv, doptr, lddo, T(0), dP, lds);
  for (int64_t r = 0; r < qn; ++r) {
    const T* p = P + r * lds;
    T* ds = dP + r * lds;
    const T dl = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < kn; ++j) ds[j] = attn::softmax_grad(p[j], ds[j], dl);
  }
  // dQ (qn x D) += scale dS K;  dK (kn x D) += scale dS^T Q
  gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, qn, kn, scale, kptr, ldk, dP, lds, T(1), dq, D);
  gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, kn, qn, scale, qptr, ldq, dP, lds, T(1), dk, D);
}

// ---- short query side (text ~77 queries against long keys), float32 ---------------------------
// The scores are kept transposed, S^T (keys x queries, queries in the 16 lanes), so every softmax
// statistic is a vertical vector op (no horizontal reductions, no per-row scalar work), and both
// products are broadcast-FMA in registers: S^T[j] += K[j][d] * Q^T[d] with Q^T (D x QP, pre-scaled)
// prepared once per query tile, O^T[e] += V[j][e] * P^T[j]. No BLAS packing of key tiles that are
// used once, no score tile beyond one L1-sized chunk of keys. A caller runs several heads over the
// same chunk of keys (their rows are adjacent in a (B, L, H, D) tensor: one contiguous read).
constexpr int64_t kShortQMax = 128;   // queries per tile (8 vectors)
constexpr int64_t kShortQChunk = 64;  // keys per online-softmax step (S^T chunk: 64 x QP floats)

// the running (max, sum) of 16 NQV queries
template <int NQV>
struct ShortQState {
  vf16 m[NQV], l[NQV];
};

template <int NQV>
void short_query_begin(ShortQState<NQV>& s, float* ot, int64_t Dv) {
  for (int q = 0; q < NQV; ++q) {
    s.m[q] = splat16(attn::neg_inf<float>());
    s.l[q] = vf16{};
  }
  std::fill(ot, ot + Dv * NQV * kVec, 0.0f);
}

// One online-softmax step over kn <= kShortQChunk keys: kc (kn x D) and vc (kn x Dv) contiguous
// floats, qt (D x QP, scaled, lanes beyond the queries zero), ot (Dv x QP) the running O^T, st
// (kShortQChunk x QP) scratch. NB: key rows / output dims per register group (NB x NQV accumulators).
template <int NQV, int NB>
void short_query_chunk(ShortQState<NQV>& s, int64_t D, int64_t Dv, const float* qt, const float* kc, const float* vc,
                       int64_t kn, float* st, float* ot) {
  constexpr int64_t QP = NQV * kVec;
  for (int64_t jb = 0; jb < kn; jb += NB) {  // S^T rows jb..jb+NB (a tail group repeats the last key)
    const float* kr[NB];
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t) kr[t] = kc + std::min<int64_t>(jb + t, kn - 1) * D;
    vf16 acc[NB][NQV];
    zero_acc(acc);
    broadcast_fma(
        D, acc, [&](int t, int64_t d) { return kr[t][d]; },
        [&](int64_t d, int q) { return load16(qt + d * QP + q * kVec); });
    const int64_t nt = std::min<int64_t>(NB, kn - jb);
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t)
      if (t < nt)
#pragma GCC unroll 8
        for (int q = 0; q < NQV; ++q) store16(st + (jb + t) * QP + q * kVec, acc[t][q]);
  }
  vf16 al[NQV];
#pragma GCC unroll 8
  for (int q = 0; q < NQV; ++q) {  // the online-softmax step of attention.h, 16 queries per vector
    float* col = st + q * kVec;
    vf16 mx = load16(col);
    for (int64_t j = 1; j < kn; ++j) {
      const vf16 x = load16(col + j * QP);
      mx = x > mx ? x : mx;
    }
    const vf16 mn = mx > s.m[q] ? mx : s.m[q];
    al[q] = exp16(s.m[q] - mn);  // m_old = -inf (first chunk): exp16 gives 0
    vf16 sum{};
    for (int64_t j = 0; j < kn; ++j) {
      const vf16 e = exp16(load16(col + j * QP) - mn);
      store16(col + j * QP, e);
      sum += e;
    }
    s.l[q] = s.l[q] * al[q] + sum;
    s.m[q] = mn;
  }
  for (int64_t e0 = 0; e0 < Dv; e0 += NB) {  // O^T rows e0..e0+NB: rescale, += V^T P^T
    const float* vr[NB];
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t) vr[t] = vc + std::min<int64_t>(e0 + t, Dv - 1);
    const int64_t ne = std::min<int64_t>(NB, Dv - e0);
    vf16 o[NB][NQV];
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t)
#pragma GCC unroll 8
      for (int q = 0; q < NQV; ++q) o[t][q] = t < ne ? load16(ot + (e0 + t) * QP + q * kVec) * al[q] : vf16{};
    broadcast_fma(
        kn, o, [&](int t, int64_t j) { return vr[t][j * Dv]; },
        [&](int64_t j, int q) { return load16(st + j * QP + q * kVec); });
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t)
      if (t < ne)
#pragma GCC unroll 8
        for (int q = 0; q < NQV; ++q) store16(ot + (e0 + t) * QP + q * kVec, o[t][q]);
  }
}

// The state as forward_tile_update leaves it: per query row the max m[i], the sum l[i] and the
// un-normalised acc (qn x Dv, row-major). A segment without keys: m = -inf, l = 0, acc = 0.
template <int NQV>
void short_query_end(const ShortQState<NQV>& s, int64_t qn, int64_t Dv, const float* ot, float* m, float* l,
                     float* acc) {
  constexpr int64_t QP = NQV * kVec;
  float mq[QP], lq[QP];
  for (int q = 0; q < NQV; ++q) {
    store16(mq + q * kVec, s.m[q]);
    store16(lq + q * kVec, s.l[q]);
  }
  for (int64_t i = 0; i < qn; ++i) {
    m[i] = mq[i];
    l[i] = lq[i];
    float* a = acc + i * Dv;
    for (int64_t e = 0; e < Dv; ++e) a[e] = ot[e * QP + i];
  }
}

// the register-group height for NQV query vectors: about 24 accumulators
template <int NQV>
constexpr int short_query_nb() {
  return NQV <= 3 ? 8 : NQV == 4 ? 6 : NQV <= 6 ? 4 : 3;
}

// f(std::integral_constant<int, NQV>) for NQV = ceil(qn / 16), qn <= kShortQMax
template <typename F>
void short_query_dispatch(int64_t qn, F&& f) {
  switch ((qn + kVec - 1) / kVec) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    case 8: return f(std::integral_constant<int, 8>());
    default: TORCH_INTERNAL_ASSERT(false, "short_query_dispatch: more than kShortQMax queries");
  }
}

// Q^T for short_query_chunk: qt (D x QP) = scale * rows of q (qn x D, ld ldq), lanes >= qn zero.
template <typename in_t>
void short_query_qt(const in_t* q, int64_t ldq, int64_t qn, int64_t D, float scale, float* qt) {
  const int64_t QP = (qn + kVec - 1) / kVec * kVec;
  std::fill(qt, qt + D * QP, 0.0f);
  for (int64_t i = 0; i < qn; ++i)
    for (int64_t d = 0; d < D; ++d) qt[d * QP + i] = scale * static_cast<float>(q[i * ldq + d]);
}

// dst[0, n) = float(src[0, n)), inline (a memcpy call per 256-byte row costs more than the copy)
template <typename in_t>
inline void copy_row_f32(float* dst, const in_t* src, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<in_t, float>) {
    for (; i + kVec <= n; i += kVec) store16(dst + i, load16(src + i));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Rows of a (.., L, H, X) tensor as a GEMM operand in the compute type T: the rows themselves
// (stride ld) when in_t == T, else converted into `buf` (contiguous, ld = cols).
template <typename T, typename in_t>
const T* tile(const in_t* src, int64_t ld, int64_t rows, int64_t cols, T* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<in_t, T>) {
    *ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const in_t* s = src + r * ld;
      T* d = buf + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<T>(s[c]);
    }
    *ld_out = cols;
    return buf;
  }
}

template <typename T, typename in_t>
void store_row(in_t* dst, const T* src, int64_t n, T mul) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<in_t>(src[d] * mul);
}


}  // namespace attn_cpu
}  // namespace embedops
