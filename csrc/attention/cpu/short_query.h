#pragma once
// Attention family, CPU (per CPU level): the short-query pass (mixture_attention with a short query
// side), float32, on the register-wide vectors and broadcast-FMA product of tiles.h.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

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
// The pass is for the levels with FMA and >= 8 float lanes (avx2, avx512). At the default level
// (4-lane vectors; on x86-64 no FMA either) the BLAS tiles were faster in every case this pass
// takes on avx2: forced default on an AVX2 Zen 3, B4 H8 D64 float32, 2 threads, interleaved in one
// process, ms (pass -> tiles): mixture M=3 Lq 77 x 3 x 1024 68-74 -> 30-32 (3 SDPA + sum: 59);
// latents 32 x 4096 26 -> 17-19, 16 x 256 0.87-0.90 -> 0.53-0.58, 8 x 1024 2.5 -> 2.0;
// co_attention 32 x 1024 15-16 -> 9-10, 16 x 4096 42 -> 32-34. (There MKL's GEMM ran its AVX2
// path whatever MKL_ENABLE_INSTRUCTIONS said; a CPU without AVX has a BLAS of its own level, as
// an aarch64 host has its NEON BLAS, and the tiles go through the BLAS torch uses.) The callers
// take the pass only where this is true.
constexpr bool kShortQueryPass = kVec >= 8;
constexpr int kShortQMaxVec = vec::kRegisters >= 32 ? 8 : 12;
constexpr int64_t kShortQMax = kShortQMaxVec * kVec;
constexpr int64_t kShortQChunk = 64;  // keys per online-softmax step (S^T chunk: 64 x QP floats)

// the running (max, sum) of kVec * nqv queries (the first nqv vectors)
struct ShortQState {
  vf m[kShortQMaxVec], l[kShortQMaxVec];
};

inline void short_query_begin(ShortQState& s, int nqv, float* ot, int64_t Dv) {
  for (int q = 0; q < nqv; ++q) {
    s.m[q] = vec::splat(attn::neg_inf<float>());
    s.l[q] = vf{};
  }
  std::fill(ot, ot + Dv * nqv * kVec, 0.0f);
}

// Query vectors per register group: the products below keep a group's R x QW accumulators, its QW
// b vectors and one broadcast in registers (R * QW + QW + 1 <= kRegisters). avx2: 2 (10 vectors of a
// 77-token side in 5 groups of 6 x 2 blocks: 8 loads per 12 FMAs); avx512: 5 (one group of 5 for
// 77 tokens, 5 x 5 blocks). Before, avx2 ran all 10 vectors as ONE group of height 1 (11 loads per
// 10 FMAs over a 20 KB Q^T per key row): 47 GFLOP/s on two Zen 4 cores, now ~130 (avx512: 132).
// Measured in isolation (one core, 3072 keys x 8 heads in memory): ~75 GFLOP/s at avx2 with groups
// of 2, 3 or 5 alike (4: 56), ~85 at avx512 with any group width; the FMA peak is 113.
constexpr int kShortQGroup = vec::kRegisters >= 32 ? 5 : 2;

// rows per register group for QW query vectors (at most 8)
constexpr int short_query_rows(int qw) {
  const int r = (vec::kRegisters - 1 - qw) / qw;
  return r > 8 ? 8 : r < 1 ? 1 : r;
}

// the width of the next query group at vector q0 of NQV: groups of at most kShortQGroup, as even as
// possible (a 77-token side: 5 groups of 2 on avx2, one of 5 on avx512)
constexpr int short_query_width(int nqv, int q0) {
  const int groups_left = (nqv - q0 + kShortQGroup - 1) / kShortQGroup;
  return (nqv - q0 + groups_left - 1) / groups_left;
}

// How many register-block steps short_query_chunk takes for kn keys and nqv query vectors (the
// times it calls its prefetch hook): per group, the key blocks of S^T and the output-dim blocks of O^T.
inline int64_t short_query_steps(int nqv, int64_t kn, int64_t Dv) {
  int64_t steps = 0;
  for (int q0 = 0; q0 < nqv; q0 += short_query_width(nqv, q0)) {
    const int r = short_query_rows(short_query_width(nqv, q0));
    steps += (kn + r - 1) / r + (Dv + r - 1) / r;
  }
  return steps;
}

// The three parts of one online-softmax step over kn <= kShortQChunk keys for the query vectors
// Q0 .. Q0 + QW (a register group): short_query_scores, short_query_softmax, short_query_pv. pf() is
// called once per register-block step (short_query_steps in all): the caller spreads its prefetches
// over them.

// S^T rows [0, kn) of the group's lanes: st[j][Q0 kVec ..] = K[j] . Q^T (kc: kn rows, stride ldk)
template <int NQV, int Q0, int QW, typename PF>
void short_query_scores(int64_t D, const float* qt, const float* kc, int64_t ldk, int64_t kn, float* st, PF& pf) {
  constexpr int64_t QP = NQV * kVec;
  constexpr int R = short_query_rows(QW);
  const float* qg = qt + Q0 * kVec;
  for (int64_t jb = 0; jb < kn; jb += R) {  // S^T rows jb..jb+R (a tail group repeats the last key)
    pf();
    const float* kr[R];
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t) kr[t] = kc + std::min<int64_t>(jb + t, kn - 1) * ldk;
    vf acc[R][QW];
    zero_acc(acc);
    broadcast_fma(
        D, acc, [&](int t, int64_t d) { return kr[t][d]; },
        [&](int64_t d, int q) { return vec::loadu(qg + d * QP + q * kVec); });
    const int64_t nt = std::min<int64_t>(R, kn - jb);
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t)
      if (t < nt)
#pragma GCC unroll 8
        for (int q = 0; q < QW; ++q) vec::storeu(st + (jb + t) * QP + (Q0 + q) * kVec, acc[t][q]);
  }
}

// The online-softmax step of attention.h on the group's lanes, kVec queries per vector: the new
// max, the exponent in place (st becomes P^T), the running sum; al[q]: the rescale of the group's
// running O^T.
template <int NQV, int Q0, int QW>
void short_query_softmax(ShortQState& s, int64_t kn, float* st, vf (&al)[QW]) {
  constexpr int64_t QP = NQV * kVec;
#pragma GCC unroll 8
  for (int q = 0; q < QW; ++q) {
    float* col = st + (Q0 + q) * kVec;
    vf mx = vec::loadu(col);
    for (int64_t j = 1; j < kn; ++j) {
      const vf x = vec::loadu(col + j * QP);
      mx = x > mx ? x : mx;
    }
    vf& m = s.m[Q0 + q];
    const vf mn = mx > m ? mx : m;
    al[q] = vec::exp(m - mn);  // m_old = -inf (first chunk): exp gives 0
    vf sum{};
    for (int64_t j = 0; j < kn; ++j) {
      const vf e = vec::exp(vec::loadu(col + j * QP) - mn);
      vec::storeu(col + j * QP, e);
      sum += e;
    }
    s.l[Q0 + q] = s.l[Q0 + q] * al[q] + sum;
    m = mn;
  }
}

// The group's O^T (Dv x its lanes) = O^T * al + V^T P^T (vc: kn rows, stride ldv; pt: P^T, kn x QP)
template <int NQV, int Q0, int QW, typename PF>
void short_query_pv(const vf (&al)[QW], int64_t Dv, const float* vc, int64_t ldv, int64_t kn, const float* pt,
                    float* ot, PF& pf) {
  constexpr int64_t QP = NQV * kVec;
  constexpr int R = short_query_rows(QW);
  const float* pg = pt + Q0 * kVec;
  float* og = ot + Q0 * kVec;
  for (int64_t e0 = 0; e0 < Dv; e0 += R) {  // O^T rows e0..e0+R: rescale, += V^T P^T
    pf();
    const float* vr[R];
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t) vr[t] = vc + std::min<int64_t>(e0 + t, Dv - 1);
    const int64_t ne = std::min<int64_t>(R, Dv - e0);
    vf o[R][QW];
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t)
#pragma GCC unroll 8
      for (int q = 0; q < QW; ++q) o[t][q] = t < ne ? vec::loadu(og + (e0 + t) * QP + q * kVec) * al[q] : vf{};
    broadcast_fma(
        kn, o, [&](int t, int64_t j) { return vr[t][j * ldv]; },
        [&](int64_t j, int q) { return vec::loadu(pg + j * QP + q * kVec); });
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t)
      if (t < ne)
#pragma GCC unroll 8
        for (int q = 0; q < QW; ++q) vec::storeu(og + (e0 + t) * QP + q * kVec, o[t][q]);
  }
}

// f(integral_constant<Q0>, integral_constant<QW>) for the register groups of NQV query vectors, in
// order (short_query_width)
template <int NQV, int Q0 = 0, typename F>
void short_query_groups(const F& f) {
  if constexpr (Q0 < NQV) {
    constexpr int QW = short_query_width(NQV, Q0);
    f(std::integral_constant<int, Q0>(), std::integral_constant<int, QW>());
    short_query_groups<NQV, Q0 + QW>(f);
  }
}

// The prefetch hook of the chunk kernels: rows [pj, end) of a key and a value stream (row j at
// byte address base + j * stride), `per` rows per call, so that the next chunk's rows arrive while
// this one computes. One type for every input dtype and caller: the NQV-specialised chunk kernels
// below are then compiled once per NQV (not once per dtype x caller x NQV: that was ~2/3 of the
// attention kernels' object code).
struct ShortQPrefetch {
  const char *k, *v;
  int64_t k_stride, v_stride, k_bytes, v_bytes, pj, end, per;
  // k0, v0: row 0 of the streams (ldk, ldv elements apart, kd, vd elements each); the rows
  // [first, last) spread over `steps` calls
  template <typename in_t>
  ShortQPrefetch(const in_t* k0, int64_t ldk, int64_t kd, const in_t* v0, int64_t ldv, int64_t vd, int64_t first,
                 int64_t last, int64_t steps)
      : k(reinterpret_cast<const char*>(k0)),
        v(reinterpret_cast<const char*>(v0)),
        k_stride(ldk * static_cast<int64_t>(sizeof(in_t))),
        v_stride(ldv * static_cast<int64_t>(sizeof(in_t))),
        k_bytes(kd * static_cast<int64_t>(sizeof(in_t))),
        v_bytes(vd * static_cast<int64_t>(sizeof(in_t))),
        pj(first),
        end(last),
        per((last - first + steps - 1) / std::max<int64_t>(steps, 1)) {}
  void operator()() {
    for (const int64_t e = std::min(pj + per, end); pj < e; ++pj) {
      vec::prefetch(k + pj * k_stride, k_bytes);
      vec::prefetch(v + pj * v_stride, v_bytes);
    }
  }
};

// One online-softmax step over kn <= kShortQChunk keys: kc (kn x D) and vc (kn x Dv) float rows
// (row strides ldk, ldv), qt (D x QP, scaled, lanes beyond the queries zero), ot (Dv x QP) the running O^T, st
// (kShortQChunk x QP) scratch. A whole group's step runs before the next group's, so its slice of st
// stays in L1. pf: called short_query_steps(NQV, kn, Dv) times. Not inlined: one copy per NQV serves
// every caller (the call costs nothing next to a chunk's 2 x 64 x QP x (D + Dv) flops).
template <int NQV>
[[gnu::noinline]] void short_query_chunk(ShortQState& s, int64_t D, int64_t Dv, const float* qt, const float* kc,
                                         int64_t ldk, const float* vc, int64_t ldv, int64_t kn, float* st, float* ot,
                                         ShortQPrefetch& pf) {
  short_query_groups<NQV>([&](auto q0, auto qw) {
    constexpr int Q0 = decltype(q0)::value, QW = decltype(qw)::value;
    short_query_scores<NQV, Q0, QW>(D, qt, kc, ldk, kn, st, pf);
    vf al[QW];
    short_query_softmax<NQV, Q0, QW>(s, kn, st, al);
    short_query_pv<NQV, Q0, QW>(al, Dv, vc, ldv, kn, st, ot, pf);
  });
}

// short_query_chunk<NQV>'s type, and the instance for qn <= kShortQMax queries (NQV = ceil(qn / kVec))
using ShortQChunkFn = void (*)(ShortQState&, int64_t, int64_t, const float*, const float*, int64_t, const float*,
                               int64_t, int64_t, float*, float*, ShortQPrefetch&);

// pick(std::integral_constant<int, NQV>()) for NQV = ceil(qn / kVec), qn <= kShortQMax: the caller
// picks its NQV-specialised kernel with it (one instance per NQV for every dtype and caller)
template <typename Pick, int NQV = 1>
auto short_query_pick(int64_t qn, const Pick& pick) {
  if constexpr (NQV < kShortQMaxVec) {
    if ((qn + kVec - 1) / kVec > NQV) return short_query_pick<Pick, NQV + 1>(qn, pick);
  }
  TORCH_INTERNAL_ASSERT(qn > 0 && qn <= kShortQMax, "short_query_pick: ", qn, " queries");
  return pick(std::integral_constant<int, NQV>());
}

inline ShortQChunkFn short_query_chunk_for(int64_t qn) {
  return short_query_pick(qn, [](auto nqv) -> ShortQChunkFn { return &short_query_chunk<decltype(nqv)::value>; });
}

// The state as forward_tile_update leaves it: per query row the max m[i], the sum l[i] and the
// un-normalised acc (qn x Dv, row-major; ot: Dv x QP, QP = qn rounded up to whole vectors). A
// segment without keys: m = -inf, l = 0, acc = 0.
inline void short_query_end(const ShortQState& s, int64_t qn, int64_t Dv, const float* ot, float* m, float* l,
                            float* acc) {
  const int nqv = static_cast<int>((qn + kVec - 1) / kVec);
  const int64_t QP = nqv * kVec;
  float mq[kShortQMax], lq[kShortQMax];
  for (int q = 0; q < nqv; ++q) {
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

// Q^T for short_query_chunk: qt (D x QP) = scale * rows of q (qn x D, ld ldq), lanes >= qn zero.
template <typename in_t>
void short_query_qt(const in_t* q, int64_t ldq, int64_t qn, int64_t D, float scale, float* qt) {
  const int64_t QP = (qn + kVec - 1) / kVec * kVec;
  std::fill(qt, qt + D * QP, 0.0f);
  for (int64_t i = 0; i < qn; ++i)
    for (int64_t d = 0; d < D; ++d) qt[d * QP + i] = scale * static_cast<float>(q[i * ldq + d]);
}

// The short-query forward pass, float compute, for every caller (mixture_attention's short query
// side, cross_attention's latent / pooling queries): one task per (batch, group of G heads, query
// tile of <= kShortQMax rows). Per task and segment m of the batch's keys, the keys are visited in
// chunks of kShortQChunk; a chunk's rows of the G heads (adjacent in a (B, L, H, D) tensor: one
// contiguous read instead of G reads of 256 bytes 2 KiB apart) are read (float: in place;
// float16 / bfloat16: converted once), then each head takes its online-softmax step over them.
//   q_start(b), q_len(b): the batch's first query token (as Q.at takes it) and its query count
//     (tiles from max_q_rows; rows >= q_len(b) are not computed: the caller owns them);
//   seg(b, m) -> (first key token, key count) of segment m of batch b (segments in key order);
//   finish(b, i0, qn, h, m, mx, l, acc, out): the segment's state for head h, rows i0 .. i0 + qn
//     (max, sum, un-normalised acc (qn x Dv), as forward_tile_update leaves them); out: the head's
//     (qn x Dv) scratch, zeroed at the task's start;
//   done(b, i0, qn, h, out): after the last segment, per head.
template <typename in_t, typename QStart, typename QLen, typename Seg, typename Finish, typename Done>
void short_query_forward(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V, int64_t B,
                         int64_t max_q_rows, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, float scale, int64_t M,
                         const QStart& q_start, const QLen& q_len, const Seg& seg, const Finish& finish,
                         const Done& done) {
  const int64_t nqb = std::max<int64_t>(1, (max_q_rows + kShortQMax - 1) / kShortQMax);
  const int64_t kBlockQ = std::max<int64_t>(1, (max_q_rows + nqb - 1) / nqb);
  const int64_t group = Hq / Hkv;
  // heads per task: as many as still leave >= 2 tasks per thread, at most 8 (measured: fewer,
  // more contiguous row reads beat finer load balancing here)
  int64_t G = 8;
  while (G > 1 && B * ((Hq + G - 1) / G) * nqb < 2 * at::get_num_threads()) G /= 2;
  G = std::min(G, Hq);
  const int64_t ng = (Hq + G - 1) / G;
  const int64_t QP = (kBlockQ + kVec - 1) / kVec * kVec, C = kShortQChunk;
  constexpr bool kFloatIn = std::is_same_v<in_t, float>;
  at::parallel_for(0, B * ng * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(G * D * QP), ot(G * Dv * QP), kv(kFloatIn ? 0 : G * C * (D + Dv)), st(C * QP), acc(kBlockQ * Dv),
        out(G * kBlockQ * Dv), mx(kBlockQ), l(kBlockQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % nqb, hg = (t / nqb) % ng, b = t / (nqb * ng);
      const int64_t i0 = qb * kBlockQ, qn = std::min(kBlockQ, q_len(b) - i0);
      if (qn <= 0) continue;
      const int64_t h0 = hg * G, gn = std::min(G, Hq - h0), q0 = q_start(b) + i0;
      const int nqv = static_cast<int>((qn + kVec - 1) / kVec);
      const int64_t qp = nqv * kVec;
      const ShortQChunkFn chunk = short_query_chunk_for(qn);
      for (int64_t g = 0; g < gn; ++g) short_query_qt(Q.at(b, q0, h0 + g), Q.sl, qn, D, scale, qt.data() + g * D * qp);
      std::fill(out.begin(), out.begin() + gn * qn * Dv, 0.0f);
      ShortQState state[8];
      const auto last = seg(b, M - 1);
      const int64_t kend = last.first + last.second;
      for (int64_t m = 0; m < M; ++m) {
        const auto sg = seg(b, m);
        const int64_t ks = sg.first, klen = sg.second;
        for (int64_t g = 0; g < gn; ++g) short_query_begin(state[g], nqv, ot.data() + g * Dv * qp, Dv);
        for (int64_t j0 = 0; j0 < klen; j0 += C) {
          const int64_t kn = std::min(C, klen - j0);
          if constexpr (!kFloatIn) {
            for (int64_t j = 0; j < kn; ++j) {  // the chunk's rows of the group's heads, as float
              for (int64_t g = 0; g < gn; ++g) {
                const int64_t hk = (h0 + g) / group;
                float* kc = kv.data() + g * C * (D + Dv);
                copy_row_f32(kc + j * D, K.at(b, ks + j0 + j, hk), D);
                copy_row_f32(kc + C * D + j * Dv, V.at(b, ks + j0 + j, hk), Dv);
              }
            }
          }
          // The next chunk's rows (this segment's or the next one's: segments are packed) are
          // prefetched while this one computes, spread over its register-block steps. Float
          // inputs are then read in place (a copy of the chunk, as for fp16/bf16, was measured
          // slower: it waited on memory for ~1/5 of the pass, the K/V stream read in bursts
          // between long computations); the prefetches, issued all at once, stalled on the miss
          // buffers.
          const int64_t nx0 = ks + j0 + kn, nx1 = std::min(nx0 + C, kend);
          const int64_t steps = short_query_steps(nqv, kn, Dv);
          for (int64_t g = 0; g < gn; ++g) {
            const int64_t hk = (h0 + g) / group;
            ShortQPrefetch pf(K.at(b, 0, hk), K.sl, D, V.at(b, 0, hk), V.sl, Dv, nx0, nx1, steps);
            const float *kp, *vp;
            int64_t ldk, ldv;
            if constexpr (kFloatIn) {  // in place (kv is empty: no offset from its null data())
              kp = K.at(b, ks + j0, hk);
              vp = V.at(b, ks + j0, hk);
              ldk = K.sl;
              ldv = V.sl;
            } else {
              kp = kv.data() + g * C * (D + Dv);
              vp = kp + C * D;
              ldk = D;
              ldv = Dv;
            }
            chunk(state[g], D, Dv, qt.data() + g * D * qp, kp, ldk, vp, ldv, kn, st.data(), ot.data() + g * Dv * qp,
                  pf);
          }
        }
        for (int64_t g = 0; g < gn; ++g) {
          short_query_end(state[g], qn, Dv, ot.data() + g * Dv * qp, mx.data(), l.data(), acc.data());
          finish(b, i0, qn, h0 + g, m, mx.data(), l.data(), acc.data(), out.data() + g * qn * Dv);
        }
      }
      for (int64_t g = 0; g < gn; ++g) done(b, i0, qn, h0 + g, out.data() + g * qn * Dv);
    }
  });
}

}  // namespace attn_cpu
}  // namespace CPU_CAPABILITY
}  // namespace embedops
