#pragma once
// Attention family, CPU (per CPU level): the tile helpers every CPU attention kernel shares
// (cross_attention, co_attention, mixture_attention): BLAS GEMM on raw strided tiles, vector
// exp/max for the softmax rows (common/vec.h: as wide as the level's registers), tile conversion
// for float16/bfloat16, tile-size heuristics, row addressing, the register-blocked short passes.

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
#include "attention/attention_cpu.h"
#include "common/vec.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace embedops {
namespace CPU_CAPABILITY {
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

// Score rows are stored with a stride rounded up to 16 floats (a multiple of every level's vector
// width); the padding holds -inf, so the row max / exp loops run without a scalar tail
// (exp(-inf) = 0 adds nothing).
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

using vec::exp_f32;
inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp_f32(x); }

// Register-wide float vectors (common/vec.h) for the per-row softmax work; the compiler's
// auto-vectoriser kept the scalar loop inside the kernel.
using vf = vec::vfloat;
using vi = vec::vint;
constexpr int64_t kVec = vec::kFloats;

// The register-blocked product the short-key / short-query passes are made of:
// acc[r][c] += a(r, j) * b(j, c) for j < n, with one broadcast per (r, j) and one vector load per
// (j, c); R x C vector accumulators stay in registers (R * C + C + 1 within vec::kRegisters; the
// b vectors may also be memory operands of the FMAs).
template <int R, int C>
inline void zero_acc(vf (&acc)[R][C]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
}

template <int R, int C, typename A, typename Bv>
inline void broadcast_fma(int64_t n, vf (&acc)[R][C], const A& a, const Bv& b) {
  if constexpr (R * C + C + 1 <= vec::kRegisters) {
    // the C b vectors of step j in registers, reused by the R rows
    for (int64_t j = 0; j < n; ++j) {
      vf bv[C];
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) bv[c] = b(j, c);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf x = vec::splat(a(r, j));
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[r][c] += x * bv[c];
      }
    }
  } else {
    // too many for the register file (e.g. one row of 10 key vectors on avx2): every b vector
    // is loaded where it is used (an FMA memory operand), so nothing is spilled
    for (int64_t j = 0; j < n; ++j) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf x = vec::splat(a(r, j));
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[r][c] += x * b(j, c);
      }
    }
  }
}

template <typename T>
T row_max(const T* x, int64_t n) {
  T mx = attn::neg_inf<T>();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kVec) {
      vf m = vec::loadu(x);
      for (j = kVec; j + kVec <= n; j += kVec) {
        const vf y = vec::loadu(x + j);
        m = y > m ? y : m;
      }
      mx = vec::hmax(m);
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
    vf acc{};
    const vf mv = vec::splat(m);
    for (; j + kVec <= n; j += kVec) {
      const vf e = vec::exp(vec::loadu(x + j) - mv);
      vec::storeu(x + j, e);
      acc += e;
    }
    sum = vec::hsum(acc);
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
// Options (cross_attention's backward; the defaults are the plain flash step):
//   scores_ready: P already holds the scaled scores, computed exactly as the forward computed them;
//   delta_from_tile: the tile holds every key of its rows, and delta (rowsum(dO O) - dlse on entry)
//     is replaced by sum_j P dP - dlse, as PyTorch's softmax backward computes it (with one key,
//     dS = P (dP - P dP) = 0 exactly, where rowsum(dO O) rounds differently from dP);
//   scratch (kn x max(D, Dv)): the tile's dK and dV are computed into it and added in one step, so
//     long query sides sum per tile (blocked summation) rather than in one chain.
template <typename T>
struct BackwardTileOptions {
  bool scores_ready = false;
  bool delta_from_tile = false;
  T* scratch = nullptr;
};

template <typename T>
void backward_tile(int64_t qn, int64_t kn, int64_t D, int64_t Dv, T scale, const T* qptr, int64_t ldq,
                   const T* kptr, int64_t ldk, const T* vptr, int64_t ldv, const T* doptr, int64_t lddo,
                   const T* lrow, T* delta, T* P, T* dP, T* dq, T* dk, T* dv,
                   const BackwardTileOptions<T>& opt = BackwardTileOptions<T>()) {
  const int64_t lds = padded_len(kn);
  if (!opt.scores_ready)
    gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, D, scale, kptr, ldk, qptr, ldq, T(0), P, lds);
  for (int64_t r = 0; r < qn; ++r) {  // P = exp(S - lse)
    T* row = P + r * lds;
    std::fill(row + kn, row + lds, attn::neg_inf<T>());
    exp_row(row, lds, lrow[r]);
  }
  // added to acc (n elements) from the scratch, or accumulated in place (beta = 1)
  auto add_scratch = [&](T* acc, int64_t n) {
    const T* sc = opt.scratch;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += sc[i];
  };
  // dV (kn x Dv) += P^T dO
  gemm(TransposeType::NoTranspose, TransposeType::Transpose, Dv, kn, qn, T(1), doptr, lddo, P, lds,
       opt.scratch ? T(0) : T(1), opt.scratch ? opt.scratch : dv, Dv);
  if (opt.scratch) add_scratch(dv, kn * Dv);
  // dP (qn x kn) = dO V^T
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, Dv, T(1), vptr, ldv, doptr, lddo, T(0), dP, lds);
  for (int64_t r = 0; r < qn; ++r) {
    const T* p = P + r * lds;
    T* ds = dP + r * lds;
    if (opt.delta_from_tile) {
      T pdp = 0;
      for (int64_t j = 0; j < kn; ++j) pdp += p[j] * ds[j];
      delta[r] += pdp;
    }
    const T dl = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < kn; ++j) ds[j] = attn::softmax_grad(p[j], ds[j], dl);
  }
  // dQ (qn x D) += scale dS K;  dK (kn x D) += scale dS^T Q
  gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, qn, kn, scale, kptr, ldk, dP, lds, T(1), dq, D);
  gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, kn, qn, scale, qptr, ldq, dP, lds,
       opt.scratch ? T(0) : T(1), opt.scratch ? opt.scratch : dk, D);
  if (opt.scratch) add_scratch(dk, kn * D);
}

// ---- short query side (text ~77 queries against long keys), float32 ---------------------------
// The scores are kept transposed, S^T (keys x queries, queries in the vector lanes), so every softmax
// statistic is a vertical vector op (no horizontal reductions, no per-row scalar work), and both
// products are broadcast-FMA in registers: S^T[j] += K[j][d] * Q^T[d] with Q^T (D x QP, pre-scaled)
// prepared once per query tile, O^T[e] += V[j][e] * P^T[j]. No BLAS packing of key tiles that are
// used once, no score tile beyond one L1-sized chunk of keys. A caller runs several heads over the
// same chunk of keys (their rows are adjacent in a (B, L, H, D) tensor: one contiguous read).
constexpr int64_t kShortQMax = 8 * kVec;  // queries per tile (8 vectors: 128 on avx512, 64 on avx2)
constexpr int64_t kShortQChunk = 64;  // keys per online-softmax step (S^T chunk: 64 x QP floats)

// the running (max, sum) of kVec * NQV queries
template <int NQV>
struct ShortQState {
  vf m[NQV], l[NQV];
};

template <int NQV>
void short_query_begin(ShortQState<NQV>& s, float* ot, int64_t Dv) {
  for (int q = 0; q < NQV; ++q) {
    s.m[q] = vec::splat(attn::neg_inf<float>());
    s.l[q] = vf{};
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
    vf acc[NB][NQV];
    zero_acc(acc);
    broadcast_fma(
        D, acc, [&](int t, int64_t d) { return kr[t][d]; },
        [&](int64_t d, int q) { return vec::loadu(qt + d * QP + q * kVec); });
    const int64_t nt = std::min<int64_t>(NB, kn - jb);
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t)
      if (t < nt)
#pragma GCC unroll 8
        for (int q = 0; q < NQV; ++q) vec::storeu(st + (jb + t) * QP + q * kVec, acc[t][q]);
  }
  vf al[NQV];
#pragma GCC unroll 8
  for (int q = 0; q < NQV; ++q) {  // the online-softmax step of attention.h, kVec queries per vector
    float* col = st + q * kVec;
    vf mx = vec::loadu(col);
    for (int64_t j = 1; j < kn; ++j) {
      const vf x = vec::loadu(col + j * QP);
      mx = x > mx ? x : mx;
    }
    const vf mn = mx > s.m[q] ? mx : s.m[q];
    al[q] = vec::exp(s.m[q] - mn);  // m_old = -inf (first chunk): exp gives 0
    vf sum{};
    for (int64_t j = 0; j < kn; ++j) {
      const vf e = vec::exp(vec::loadu(col + j * QP) - mn);
      vec::storeu(col + j * QP, e);
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
    vf o[NB][NQV];
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t)
#pragma GCC unroll 8
      for (int q = 0; q < NQV; ++q) o[t][q] = t < ne ? vec::loadu(ot + (e0 + t) * QP + q * kVec) * al[q] : vf{};
    broadcast_fma(
        kn, o, [&](int t, int64_t j) { return vr[t][j * Dv]; },
        [&](int64_t j, int q) { return vec::loadu(st + j * QP + q * kVec); });
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t)
      if (t < ne)
#pragma GCC unroll 8
        for (int q = 0; q < NQV; ++q) vec::storeu(ot + (e0 + t) * QP + q * kVec, o[t][q]);
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
    vec::storeu(mq + q * kVec, s.m[q]);
    vec::storeu(lq + q * kVec, s.l[q]);
  }
  for (int64_t i = 0; i < qn; ++i) {
    m[i] = mq[i];
    l[i] = lq[i];
    float* a = acc + i * Dv;
    for (int64_t e = 0; e < Dv; ++e) a[e] = ot[e * QP + i];
  }
}

// the register-group height for NQV query vectors: about 3/4 of the register file as
// accumulators (avx512: 24 of 32 zmm, the heights measured before: 8 8 8 6 4 4 3 3; avx2: 12 of 16)
template <int NQV>
constexpr int short_query_nb() {
  constexpr int acc = vec::kRegisters * 3 / 4;
  return acc / NQV >= 8 ? 8 : acc / NQV >= 1 ? acc / NQV : 1;
}

// f(std::integral_constant<int, NQV>) for NQV = ceil(qn / kVec), qn <= kShortQMax
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
    for (; i + kVec <= n; i += kVec) vec::storeu(dst + i, vec::loadu(src + i));
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
}  // namespace CPU_CAPABILITY
}  // namespace embedops
