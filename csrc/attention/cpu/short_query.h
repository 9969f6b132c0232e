#pragma once
// Attention family, CPU (per CPU level): the short-query pass (mixture_attention with a short query
// side), float32, on the register-wide vectors and broadcast-FMA product of tiles.h.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention/attention.h"
#include "attention/cpu/tiles.h"
#include "common/vec.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace attn_cpu {

// ---- short query side (text ~77 queries against long keys), float32 ---------------------------
// The scores are kept transposed, S^T (keys x queries, queries in the vector lanes), so every softmax
// statistic is a vertical vector op (no horizontal reductions, no per-row scalar work), and both
// products are broadcast-FMA in registers: S^T[j] += K[j][d] * Q^T[d] with Q^T (D x QP, pre-scaled)
// prepared once per query tile, O^T[e] += V[j][e] * P^T[j]. No BLAS packing of key tiles that are
// used once, no score tile beyond one L1-sized chunk of keys. A caller runs several heads over the
// same chunk of keys (their rows are adjacent in a (B, L, H, D) tensor: one contiguous read).
// queries per tile: 8 vectors on avx512 (128), 12 on avx2 (96: a 77-token text side in one tile,
// each key chunk copied and scored once)
constexpr int kShortQMaxVec = vec::kRegisters >= 32 ? 8 : 12;
constexpr int64_t kShortQMax = kShortQMaxVec * kVec;
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
template <typename F, int NQV = 1>
void short_query_dispatch(int64_t qn, F&& f) {
  if constexpr (NQV <= kShortQMaxVec) {
    if ((qn + kVec - 1) / kVec == NQV) return f(std::integral_constant<int, NQV>());
    return short_query_dispatch<F, NQV + 1>(qn, std::forward<F>(f));
  } else {
    TORCH_INTERNAL_ASSERT(false, "short_query_dispatch: more than kShortQMax queries");
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

}  // namespace attn_cpu
}  // namespace CPU_CAPABILITY
}  // namespace embedops
