// Cross attention on the CPU: flash-style tiles, forward and backward. Kernels, compiled once per
// CPU level (the host side, checks and outputs, is ../cross_attention.cpp).
//
// Forward: parallel over (batch, query head, query block). Per query block, key blocks are
// visited in order: S = scale * Q K^T (BLAS gemm on the strided tiles), the online-softmax
// update of attention.h per row (vectorised exp), then acc += P V (gemm). The Lq x Lk matrix is
// never stored; a query block holds one (BQ x BK) tile of it. Sequences with at most kMaxShortK
// valid keys (image->text) take a fused short-key pass instead (no BLAS, see below); a few latent
// queries against long keys take the short-query pass of short_query.h (forward_short_queries; not
// at the default level, see kShortQueryPass there).
// Backward: parallel over (batch, key/value head, key chunk); see backward_kernel. Every gradient
// is accumulated in a fixed order that depends on the shapes only (deterministic, no atomics).
// P is recomputed from lse.
// float16 / bfloat16 tiles are converted to float32 as they are loaded (the backward converts a
// task's keys/values once), computed in float32 and rounded on store; float64 runs in float64.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_kernels.h"
#include "attention/cpu/short_query.h"
#include "attention/cpu/tiles.h"
#include "common/dispatch.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

using namespace attn_cpu;  // the shared tile helpers (cpu/tiles.h)

// ---- short keys (image->text: Lk ~ 77): one fused pass per query block, float32 compute ----------
// When all of a sequence's keys fit in kMaxShortK, a query block needs no online softmax and no
// BLAS: per group of R query rows, S (R x NV*kVec scores) is accumulated in registers by
// broadcast-FMA against K^T (transposed and pre-scaled once per (batch, kv head)), the exact softmax
// of each row is taken in registers (key lanes >= kn masked to -inf), P goes to a small L1 buffer
// and O = P V is accumulated in registers from the (zero-padded) V rows. No score tile in memory,
// no per-row scalar loops; the GEMMs of the tiled path are too small here (m ~ 54, k = 64) to
// run near the machine's rate. avx512: up to 5 key vectors (80 keys); beyond, the register
// groups get too short (measured: slower than the tiled path from 96 keys on). avx2: the same 80
// keys in 10 ymm vectors (scores of 4 rows in column groups, below). default (4 lanes): 32 keys.
constexpr int kMaxShortKVec = vec::kFloats >= 16 ? 5 : vec::kFloats == 8 ? 10 : 8;
constexpr int64_t kMaxShortK = kMaxShortKVec * kVec;

// Query rows per register group for NV key vectors. avx512: R * NV score accumulators in registers,
// about 25 of 32 zmm (the heights measured there: 8 8 8 6 5). With 16 registers: up to 3 vectors
// the same way (8 6 4); beyond, R = 4 rows with the scores computed in column groups of
// short_key_cols vectors and kept in L1 (pbuf), so every K^T and V load serves 4 rows (one row
// per group streamed K^T and V, 40 KB at 80 keys, from L2 for every query row).
template <int NV>
constexpr int short_key_rows() {
  if constexpr (vec::kRegisters >= 32) return 25 / NV >= 8 ? 8 : 25 / NV;
  return NV <= 3 ? (12 / NV >= 8 ? 8 : 12 / NV) : 4;
}
// the score vectors of R rows computed at once: all NV when R * NV + NV + 1 fits the registers
template <int NV, int R>
constexpr int short_key_cols() {
  if constexpr (vec::kRegisters >= 32 || NV <= 3) return NV;
  return (vec::kRegisters - 1) / (R + 1);  // R x CG accumulators + CG loads + 1 broadcast
}
constexpr int kShortKMaxRows = 8;

// the output vectors a PV chunk of R rows holds in registers: 4 on avx512; R x CH <= 12 below
template <int R>
constexpr int short_pv_vectors() {
  if constexpr (vec::kRegisters >= 32) return 4;
  return 12 / R >= 4 ? 4 : 12 / R >= 1 ? 12 / R : 1;
}

// obuf rows [0, R) x [0, kVec CH) = P (R x kn, ld ldp) V (kn x kVec CH, ld ldv)
template <int R, int CH>
inline void short_pv_chunk(int64_t kn, const float* P, int64_t ldp, const float* vp, int64_t ldv, float* obuf,
                           int64_t ldo) {
  vf acc[R][CH];
  zero_acc(acc);
  broadcast_fma(
      kn, acc, [&](int r, int64_t j) { return P[r * ldp + j]; },
      [&](int64_t j, int c) { return vec::loadu(vp + j * ldv + c * kVec); });
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) vec::storeu(obuf + r * ldo + c * kVec, acc[r][c]);
}

// the last nvec < CH + 1 output vectors of a row group, one chunk of exactly nvec
template <int R, int CH>
inline void short_pv_tail(int64_t nvec, int64_t kn, const float* P, int64_t ldp, const float* vp, int64_t ldv,
                          float* obuf, int64_t ldo) {
  if constexpr (CH > 0) {
    if (nvec == CH) return short_pv_chunk<R, CH>(kn, P, ldp, vp, ldv, obuf, ldo);
    short_pv_tail<R, CH - 1>(nvec, kn, P, ldp, vp, ldv, obuf, ldo);
  }
}

// S[r][v0 + c] for c < W of R query rows (tail rows repeat the last), stored to out (ld ldo)
template <int R, int W>
inline void short_key_score_cols(const float* const* qr, int64_t D, const float* kt, int64_t kp, int v0,
                                 float* out, int64_t ldo) {
  vf acc[R][W];
  zero_acc(acc);
  broadcast_fma(
      D, acc, [&](int r, int64_t d) { return qr[r][d]; },
      [&](int64_t d, int c) { return vec::loadu(kt + d * kp + (v0 + c) * kVec); });
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < W; ++c) vec::storeu(out + r * ldo + (v0 + c) * kVec, acc[r][c]);
}

template <int R, int W>
inline void short_key_score_tail(int w, const float* const* qr, int64_t D, const float* kt, int64_t kp, int v0,
                                 float* out, int64_t ldo) {
  if constexpr (W > 0) {
    if (w == W) return short_key_score_cols<R, W>(qr, D, kt, kp, v0, out, ldo);
    short_key_score_tail<R, W - 1>(w, qr, D, kt, kp, v0, out, ldo);
  }
}

// The exact softmax of one row of NV score vectors (attention.h with one key tile): key lanes past
// kn masked to -inf (valid: the last vector's lanes), P = exp(S - max) stored to prow, 1 / l to inv
// and, for a real row (not a repeated tail row), lse to lse_row[i].
template <int NV>
inline void short_key_softmax(vf (&s)[NV], vi valid, float* prow, float& inv, float* lse_row, int64_t i,
                              bool real_row) {
  s[NV - 1] = valid ? s[NV - 1] : vec::splat(attn::neg_inf<float>());
  vf mv = s[0];
#pragma GCC unroll 16
  for (int v = 1; v < NV; ++v) mv = vec::max(s[v], mv);
  const float m = vec::hmax(mv);
  const vf msplat = vec::splat(m);
  vf sum{};
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const vf e = vec::exp(s[v] - msplat);
    sum += e;
    vec::storeu(prow + v * kVec, e);
  }
  const float l = vec::hsum(sum);
  inv = attn::softmax_inv_denominator(l);
  if (real_row) lse_row[i] = attn::softmax_lse(m, l);
}

// One query block (qn rows at q, ld ldq; output rows at out, ld ldo) against kn <= kVec NV keys:
// kt (D x kVec NV, pre-scaled K^T), vp (kn x Dvp, Dv padded to a multiple of 16 with zeros).
// Writes O rows (multiplied by 1/l) and lse.
template <int NV, int R, typename in_t>
void short_key_block(int64_t qn, const float* q, int64_t ldq, int64_t D, const float* kt, int64_t kn,
                     const float* vp, int64_t Dv, int64_t Dvp, float* pbuf, float* obuf, in_t* out, int64_t ldo,
                     float* lse_row) {
  constexpr int64_t kp = NV * kVec;
  const vi lane = vec::lane_index();
  const vi valid = lane < static_cast<int32_t>(kn - (NV - 1) * kVec);  // lanes of the last key vector
  float inv[R];
  for (int64_t i0 = 0; i0 < qn; i0 += R) {
    const int64_t rows = std::min<int64_t>(R, qn - i0);
    const float* qr[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) qr[r] = q + (i0 + std::min<int64_t>(r, rows - 1)) * ldq;  // tail rows repeat the last
    constexpr int CG = short_key_cols<NV, R>();
    if constexpr (CG == NV) {
      vf s[R][NV];
      zero_acc(s);
      broadcast_fma(  // S = Q (scale K)^T
          D, s, [&](int r, int64_t d) { return qr[r][d]; },
          [&](int64_t d, int v) { return vec::loadu(kt + d * kp + v * kVec); });
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) short_key_softmax<NV>(s[r], valid, pbuf + r * kp, inv[r], lse_row, i0 + r, rows > r);
    } else {
      // the same scores (the same products in the same order), CG vectors at a time into pbuf,
      // then the same softmax from there
      int v0 = 0;
      for (; v0 + CG <= NV; v0 += CG) short_key_score_cols<R, CG>(qr, D, kt, kp, v0, pbuf, kp);
      short_key_score_tail<R, CG - 1>(NV - v0, qr, D, kt, kp, v0, pbuf, kp);
      for (int r = 0; r < R; ++r) {
        vf row[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) row[v] = vec::loadu(pbuf + r * kp + v * kVec);
        short_key_softmax<NV>(row, valid, pbuf + r * kp, inv[r], lse_row, i0 + r, rows > r);
      }
    }
    constexpr int CH = short_pv_vectors<R>();
    const int64_t nvec = Dvp / kVec;
    int64_t c0 = 0;
    for (; c0 + CH <= nvec; c0 += CH) short_pv_chunk<R, CH>(kn, pbuf, kp, vp + c0 * kVec, Dvp, obuf + c0 * kVec, Dvp);
    short_pv_tail<R, CH - 1>(nvec - c0, kn, pbuf, kp, vp + c0 * kVec, Dvp, obuf + c0 * kVec, Dvp);
    for (int64_t r = 0; r < rows; ++r) store_row(out + (i0 + r) * ldo, obuf + r * Dvp, Dv, inv[r]);
  }
}

// The short-key block for nv = ceil(kn / kVec) key vectors (1 <= nv <= kMaxShortKVec).
template <typename in_t, int NV = 1>
void short_key_dispatch(int64_t nv, int64_t qn, const float* q, int64_t ldq, int64_t D, const float* kt, int64_t kn,
                        const float* vp, int64_t Dv, int64_t Dvp, float* pbuf, float* obuf, in_t* out, int64_t ldo,
                        float* lse_row) {
  if constexpr (NV <= kMaxShortKVec) {
    if (nv == NV)
      return short_key_block<NV, short_key_rows<NV>(), in_t>(qn, q, ldq, D, kt, kn, vp, Dv, Dvp, pbuf, obuf, out,
                                                             ldo, lse_row);
    return short_key_dispatch<in_t, NV + 1>(nv, qn, q, ldq, D, kt, kn, vp, Dv, Dvp, pbuf, obuf, out, ldo, lse_row);
  } else {
    TORCH_INTERNAL_ASSERT(false, "short_key_dispatch: nv out of range");
  }
}

// ---- latent / pooling queries (a few query rows against long keys), float32 compute -------------
// The short-query pass of short_query.h (mixture_attention's): scores transposed, queries in the
// vector lanes, both products register-blocked broadcast-FMA, no BLAS. With few query rows a GEMM
// tile leaves MKL's packing of every K and V tile amortised over few rows. Measured at B4 H8 D64
// (avx2, Zen 3, 2 threads, interleaved A/B, ms, tiles -> this pass): Lq 8: 1.18 -> 0.96 at 1024
// keys, 8.8 -> 7.1 at 4096; Lq 16: 0.62 -> 0.57 at 256, 10.5 -> 6.9 at 4096; Lq 32: 2.87 -> 2.40 at
// 1024, 14.1 -> 11.2 at 4096; but Lq 32 at <= 512 keys and Lq 64 at <= 1024 keys were 2-12 %
// slower, so those keep the tiles. Used only when every sequence has more than kMaxShortK keys (or
// none): a sequence with a few keys keeps the short-key pass, whose scores the backward recomputes
// to the bit.
inline bool short_queries_pass(int64_t max_q, int64_t max_k) {
  return (max_q <= 16 && max_k >= 256) || (max_q <= 32 && max_k >= 1024);
}

template <typename in_t>
void forward_short_queries(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V,
                           const Rows<in_t>& O, float* lse, int64_t lse_sb, int64_t lse_sh, const Seqs& s, int64_t B,
                           int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t max_q_slot, float scale) {
  for (int64_t b = 0; b < B; ++b)  // rows i >= q_lengths[b] of a slot: output 0, lse = -inf
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = s.q_len[b]; i < s.q_slot[b]; ++i) {
        std::fill(O.at(b, s.q_start[b] + i, h), O.at(b, s.q_start[b] + i, h) + Dv, in_t(0));
        lse[b * lse_sb + h * lse_sh + s.q_start[b] + i] = attn::neg_inf<float>();
      }
  short_query_forward(
      Q, K, V, B, max_q_slot, Hq, Hkv, D, Dv, scale, 1, [&](int64_t b) { return s.q_start[b]; },
      [&](int64_t b) { return s.q_len[b]; }, [&](int64_t b, int64_t) { return std::make_pair(s.k_start[b], s.k_len[b]); },
      [&](int64_t b, int64_t i0, int64_t qn, int64_t h, int64_t, const float* mx, const float* l, const float* acc,
          float*) {
        const int64_t tok0 = s.q_start[b] + i0;
        float* lse_row = lse + b * lse_sb + h * lse_sh + tok0;
        for (int64_t r = 0; r < qn; ++r) {
          store_row(O.at(b, tok0 + r, h), acc + r * Dv, Dv, attn::softmax_inv_denominator(l[r]));
          lse_row[r] = attn::softmax_lse(mx[r], l[r]);
        }
      },
      [](int64_t, int64_t, int64_t, int64_t, const float*) {});
}

// in_t: the tensors' dtype; T: the compute type (float, or double for double inputs).
template <typename in_t, typename T>
void forward_kernel(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V,
                    const Rows<in_t>& O, T* lse, int64_t lse_sb, int64_t lse_sh, const Seqs& s, int64_t B, int64_t Hq,
                    int64_t Hkv, int64_t D, int64_t Dv, int64_t max_q_slot, int64_t max_k, T scale) {
  constexpr bool kConvert = !std::is_same_v<in_t, T>;
  if constexpr (kShortQueryPass && std::is_same_v<T, float>) {
    bool long_keys = short_queries_pass(max_q_slot, max_k);
    for (int64_t b = 0; b < B && long_keys; ++b) long_keys = s.k_len[b] == 0 || s.k_len[b] > kMaxShortK;
    if (long_keys) return forward_short_queries(Q, K, V, O, lse, lse_sb, lse_sh, s, B, Hq, Hkv, D, Dv, max_q_slot, scale);
  }
  const int64_t kBlockQ = forward_block_q(max_k, max_q_slot, B * Hq);
  const int64_t kBlockK = block_k_for(kBlockQ);
  const int64_t nqb = (max_q_slot + kBlockQ - 1) / kBlockQ;
  const int64_t group = Hq / Hkv;
  const int64_t ntasks = B * Hq * nqb;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    // the tiled path's buffers (not needed when every sequence takes the short-key pass)
    const bool all_short = std::is_same_v<T, float> && max_k <= kMaxShortK;
    std::vector<T> S(all_short ? 0 : kBlockQ * kBlockK), acc(kBlockQ * Dv), m(kBlockQ), l(kBlockQ);
    std::vector<T> qbuf(kConvert ? kBlockQ * D : 0), kbuf(kConvert ? kBlockK * D : 0),
        vbuf(kConvert ? kBlockK * Dv : 0);
    // the short-key pass's buffers (float compute, keys <= kMaxShortK)
    constexpr bool short_k = std::is_same_v<T, float>;
    const int64_t Dvp = padded_len(Dv);
    std::vector<float> kt(short_k ? D * kMaxShortK : 0), vp(short_k ? kMaxShortK * Dvp : 0),
        pbuf(short_k ? kShortKMaxRows * kMaxShortK : 0), obuf(short_k ? kShortKMaxRows * Dvp : 0);
    int64_t prep_b = -1, prep_hk = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % nqb, h = (t / nqb) % Hq, b = t / (nqb * Hq);
      const int64_t i0 = qb * kBlockQ;
      if (i0 >= s.q_slot[b]) continue;
      const int64_t rows = std::min(kBlockQ, s.q_slot[b] - i0);
      const int64_t qn = std::clamp<int64_t>(s.q_len[b] - i0, 0, rows);
      const int64_t tok0 = s.q_start[b] + i0;
      T* lse_row = lse + b * lse_sb + h * lse_sh + tok0;
      for (int64_t r = qn; r < rows; ++r) {  // rows i >= q_lengths[b]: output 0, lse = -inf
        std::fill(O.at(b, tok0 + r, h), O.at(b, tok0 + r, h) + Dv, in_t(0));
        lse_row[r] = attn::neg_inf<T>();
      }
      if (qn == 0) continue;
      const int64_t hk = h / group;
      int64_t ldq, ldk, ldv;
      const T* qptr = tile(Q.at(b, tok0, h), Q.sl, qn, D, qbuf.data(), &ldq);
      const int64_t klen = s.k_len[b];
      if constexpr (std::is_same_v<T, float>) {
        if (klen > 0 && klen <= kMaxShortK) {  // the fused short-key pass
          const int64_t nv = (klen + kVec - 1) / kVec, kp = nv * kVec;
          if (b != prep_b || hk != prep_hk) {  // K^T (pre-scaled) and V of this (batch, kv head), once
            prep_b = b;
            prep_hk = hk;
            for (int64_t j = 0; j < klen; ++j) {
              const in_t* kr = K.at(b, s.k_start[b] + j, hk);
              for (int64_t d = 0; d < D; ++d) kt[d * kp + j] = scale * static_cast<float>(kr[d]);
              const in_t* vr = V.at(b, s.k_start[b] + j, hk);
              float* vd = vp.data() + j * Dvp;
              for (int64_t d = 0; d < Dv; ++d) vd[d] = static_cast<float>(vr[d]);
              std::fill(vd + Dv, vd + Dvp, 0.0f);
            }
            for (int64_t d = 0; d < D; ++d) std::fill(kt.data() + d * kp + klen, kt.data() + (d + 1) * kp, 0.0f);
          }
          short_key_dispatch<in_t>(nv, qn, qptr, ldq, D, kt.data(), klen, vp.data(), Dv, Dvp, pbuf.data(), obuf.data(),
                                   O.at(b, tok0, h), O.sl, lse_row);
          continue;
        }
      }
      std::fill(m.begin(), m.begin() + qn, attn::neg_inf<T>());
      std::fill(l.begin(), l.begin() + qn, T(0));
      std::fill(acc.begin(), acc.begin() + qn * Dv, T(0));
      for (int64_t j0 = 0; j0 < klen; j0 += kBlockK) {
        const int64_t kn = std::min(kBlockK, klen - j0);
        const int64_t lds = padded_len(kn);
        const T* kptr = tile(K.at(b, s.k_start[b] + j0, hk), K.sl, kn, D, kbuf.data(), &ldk);
        const T* vptr = tile(V.at(b, s.k_start[b] + j0, hk), V.sl, kn, Dv, vbuf.data(), &ldv);
        // S (qn x kn, row-major) = scale * Q K^T
        gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, D, scale, kptr, ldk, qptr, ldq, T(0),
             S.data(), lds);
        forward_tile_update(qn, kn, Dv, S.data(), m.data(), l.data(), acc.data(), vptr, ldv, j0 == 0);
      }
      for (int64_t r = 0; r < qn; ++r) {
        store_row(O.at(b, tok0 + r, h), acc.data() + r * Dv, Dv, attn::softmax_inv_denominator(l[r]));
        lse_row[r] = attn::softmax_lse(m[r], l[r]);
      }
    }
  });
}

// S (qn x lds, row-major) = Q (scale K)^T against the short-key pass's kt, computed exactly as
// short_key_block computes its scores (the same products, the same order, the same register
// groups), so that the backward's P = exp(S - lse) is consistent with the forward's lse to the
// last bit (one key: P = 1 exactly, not 1 - 2^-23 on every row, a bias that dV summed Lq times).
template <int NV = 1>
void short_key_scores(int64_t nv, int64_t qn, const float* q, int64_t ldq, int64_t D, const float* kt, float* S,
                      int64_t lds) {
  if constexpr (NV <= kMaxShortKVec) {
    if (nv != NV) return short_key_scores<NV + 1>(nv, qn, q, ldq, D, kt, S, lds);
    constexpr int R = short_key_rows<NV>();
    constexpr int CG = short_key_cols<NV, R>();
    constexpr int64_t kp = NV * kVec;
    float tail[R * kp];  // the last group's rows (R > rows: its repeated rows are not stored)
    for (int64_t i0 = 0; i0 < qn; i0 += R) {
      const int64_t rows = std::min<int64_t>(R, qn - i0);
      const float* qr[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) qr[r] = q + (i0 + std::min<int64_t>(r, rows - 1)) * ldq;
      float* dst = rows == R ? S + i0 * lds : tail;
      const int64_t ldd = rows == R ? lds : kp;
      int v0 = 0;
      for (; v0 + CG <= NV; v0 += CG) short_key_score_cols<R, CG>(qr, D, kt, kp, v0, dst, ldd);
      short_key_score_tail<R, CG - 1>(NV - v0, qr, D, kt, kp, v0, dst, ldd);
      if (rows < R)
        for (int64_t r = 0; r < rows; ++r) std::copy(tail + r * kp, tail + (r + 1) * kp, S + (i0 + r) * lds);
    }
  } else {
    TORCH_INTERNAL_ASSERT(false, "short_key_scores: nv out of range");
  }
}

// Keys per backward task when the key side is split (see backward_kernel).
constexpr int64_t kBackwardKeyChunk = 128;

// Backward. A task owns dK, dV of a chunk of keys of one (batch, kv head) and the dQ
// contributions of those keys to the query heads of its group, so every gradient element is
// accumulated by one thread in a fixed order (deterministic, no atomics). Normally a chunk is all
// the keys (tasks = B * Hkv, dQ written directly). When B * Hkv is too small to occupy the
// threads (MQA / GQA at batch 1), the keys are split into chunks of kBackwardKeyChunk: each task
// writes its dQ contribution to its own slice of a buffer, and a second pass sums the slices in
// chunk order. The split depends on the shapes only, never on the thread count, so the bits are
// the same for any number of threads.
template <typename in_t, typename T>
void backward_kernel(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V,
                     const Rows<const in_t>& O, const Rows<const in_t>& dO, const T* lse, const T* dlse,
                     int64_t lse_sb, int64_t lse_sh, const Rows<in_t>& dQ, const Rows<in_t>& dK, const Rows<in_t>& dV,
                     const Seqs& s, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t max_q,
                     int64_t max_k, T scale) {
  constexpr bool kConvert = !std::is_same_v<in_t, T>;
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t group = Hq / Hkv;
  // query tiles of at most 256 rows: dK / dV are summed per tile (blocked summation), so a long
  // query side against a few keys does not sum thousands of terms in one chain
  const int64_t kBlockQ = backward_block_q(max_k, max_q);
  const int64_t kBlockK = backward_block_k(max_k, kBlockQ);
  // the split: up to ~16 tasks in all, chunks of kBackwardKeyChunk keys (short keys: no split)
  // The split's dQ slices, [b][hk][chunk][head in group][query][D], are held to kSplitBytes
  // (fewer chunks for long, many-headed query sides; one chunk is no split).
  constexpr int64_t kSplitBytes = int64_t(256) << 20;
  const int64_t part_stride = group * max_q * D;
  const int64_t want = std::max<int64_t>(1, 16 / std::max<int64_t>(1, B * Hkv));
  const int64_t fit = kSplitBytes / std::max<int64_t>(1, B * Hkv * part_stride * static_cast<int64_t>(sizeof(T)));
  const int64_t nkc = (kFloat && max_k <= kMaxShortK) || fit < 2
                          ? 1
                          : std::clamp<int64_t>(std::min({want, fit, (max_k + kBackwardKeyChunk - 1) / kBackwardKeyChunk}),
                                                1, std::numeric_limits<int32_t>::max());
  const int64_t chunk = nkc == 1 ? std::max<int64_t>(max_k, 1) : (max_k + nkc - 1) / nkc;
  const bool split = nkc > 1;
  std::unique_ptr<T[]> dq_part(split ? new T[B * Hkv * nkc * part_stride] : nullptr);  // zeroed by its task
  at::parallel_for(0, B * Hkv * nkc, 1, [&](int64_t begin, int64_t end) {
    const int64_t ck = std::min(chunk, std::max<int64_t>(max_k, 1));
    std::vector<T> P(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), dq(kBlockQ * D), delta(kBlockQ), lrow(kBlockQ);
    std::vector<T> dk(ck * D), dv(ck * Dv), scratch(kBlockK * std::max(D, Dv));
    std::vector<T> kall(kConvert ? ck * D : 0), vall(kConvert ? ck * Dv : 0);
    std::vector<T> qbuf(kConvert ? kBlockQ * D : 0), dobuf(kConvert ? kBlockQ * Dv : 0);
    std::vector<float> kt(kFloat ? D * kMaxShortK : 0);  // short keys: K^T pre-scaled, as the forward
    for (int64_t t = begin; t < end; ++t) {
      const int64_t kc = t % nkc, hk = (t / nkc) % Hkv, b = t / (nkc * Hkv);
      const int64_t klen_all = s.k_len[b], qlen = s.q_len[b];
      const int64_t j_lo = kc * chunk, klen = std::min(chunk, klen_all - j_lo);
      T* parts = split ? dq_part.get() + ((b * Hkv + hk) * nkc + kc) * part_stride : nullptr;
      if (split) std::fill(parts, parts + part_stride, T(0));
      if (klen <= 0) continue;  // no valid key in this chunk: its gradients are 0
      std::fill(dk.begin(), dk.begin() + klen * D, T(0));
      std::fill(dv.begin(), dv.begin() + klen * Dv, T(0));
      int64_t ldk, ldv, ldq, lddo;
      // this chunk's keys and values, converted once for all its query heads
      const int64_t kstart = s.k_start[b] + j_lo;
      const T* k_all = tile(K.at(b, kstart, hk), K.sl, klen, D, kall.data(), &ldk);
      const T* v_all = tile(V.at(b, kstart, hk), V.sl, klen, Dv, vall.data(), &ldv);
      // short keys (one key tile, float): the scores as the forward's short-key pass computed them
      // (such a sequence lies in chunk 0 whole: a split's chunks hold more than kMaxShortK keys)
      const bool short_k = kFloat && klen_all <= kMaxShortK;
      // every key of the sequence in one tile (and one chunk): delta from that tile's P and dP
      const bool one_key_tile = !split && klen_all <= kBlockK;
      const int64_t nv = (klen + kVec - 1) / kVec, kp = nv * kVec;
      if (short_k) {
        for (int64_t j = 0; j < klen; ++j) {
          const in_t* kr = K.at(b, kstart + j, hk);
          for (int64_t d = 0; d < D; ++d) kt[d * kp + j] = static_cast<float>(scale) * static_cast<float>(kr[d]);
        }
        for (int64_t d = 0; d < D; ++d) std::fill(kt.data() + d * kp + klen, kt.data() + (d + 1) * kp, 0.0f);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        T* part = split ? parts + (h - hk * group) * max_q * D : nullptr;
        for (int64_t i0 = 0; i0 < qlen; i0 += kBlockQ) {
          const int64_t qn = std::min(kBlockQ, qlen - i0);
          const int64_t tok0 = s.q_start[b] + i0;
          const T* qptr = tile(Q.at(b, tok0, h), Q.sl, qn, D, qbuf.data(), &ldq);
          const T* doptr = tile(dO.at(b, tok0, h), dO.sl, qn, Dv, dobuf.data(), &lddo);
          const int64_t lse_off = b * lse_sb + h * lse_sh + tok0;
          for (int64_t r = 0; r < qn; ++r) {
            const in_t* o = O.at(b, tok0 + r, h);
            const T* g = doptr + r * lddo;
            T dot = 0;
            if (!one_key_tile) {
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < Dv; ++d) dot += static_cast<T>(o[d]) * g[d];
            }
            // (a tile holding every key recomputes delta from P and dP: BackwardTileOptions)
            delta[r] = (one_key_tile ? T(0) : dot) - (dlse ? dlse[lse_off + r] : T(0));
            lrow[r] = lse[lse_off + r];
          }
          T* dqt = split ? part + i0 * D : dq.data();  // (a split's slice starts zeroed)
          if (!split) std::fill(dq.begin(), dq.begin() + qn * D, T(0));
          for (int64_t j0 = 0; j0 < klen; j0 += kBlockK) {
            const int64_t kn = std::min(kBlockK, klen - j0);
            if constexpr (kFloat) {
              if (short_k)
                short_key_scores(nv, qn, reinterpret_cast<const float*>(qptr), ldq, D, kt.data(),
                                 reinterpret_cast<float*>(P.data()), padded_len(kn));
            }
            BackwardTileOptions<T> opt;
            opt.scores_ready = short_k;
            opt.delta_from_tile = one_key_tile;
            opt.scratch = scratch.data();
            backward_tile(qn, kn, D, Dv, scale, qptr, ldq, k_all + j0 * ldk, ldk, v_all + j0 * ldv, ldv, doptr, lddo,
                          lrow.data(), delta.data(), P.data(), dP.data(), dqt, dk.data() + j0 * D, dv.data() + j0 * Dv,
                          opt);
          }
          if (!split)
            for (int64_t r = 0; r < qn; ++r) store_row(dQ.at(b, tok0 + r, h), dq.data() + r * D, D, T(1));
        }
      }
      for (int64_t j = 0; j < klen; ++j) {
        store_row(dK.at(b, kstart + j, hk), dk.data() + j * D, D, T(1));
        store_row(dV.at(b, kstart + j, hk), dv.data() + j * Dv, Dv, T(1));
      }
    }
  });
  if (!split) return;
  // dQ = the chunks' slices summed in chunk order, parallel over (batch, head, 64-row blocks)
  constexpr int64_t kRows = 64;
  const int64_t nrb = (max_q + kRows - 1) / kRows;
  at::parallel_for(0, B * Hq * nrb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t % nrb, h = (t / nrb) % Hq, b = t / (nrb * Hq), hk = h / group;
      if (s.k_len[b] == 0) continue;  // dQ stays 0
      for (int64_t i = rb * kRows; i < std::min(s.q_len[b], (rb + 1) * kRows); ++i) {
        const T* src = dq_part.get() + (b * Hkv + hk) * nkc * part_stride + (h - hk * group) * max_q * D + i * D;
        std::copy(src, src + D, acc.begin());
        for (int64_t kc = 1; kc < nkc; ++kc) {
          const T* p = src + kc * part_stride;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += p[d];
        }
        store_row(dQ.at(b, s.q_start[b] + i, h), acc.data(), D, T(1));
      }
    }
  });
}

void cross_attention_forward_cpu_kernel(const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vc,
                                        const SeqDesc& desc, double scale, bool varlen, at::Tensor& out,
                                        at::Tensor& lse) {
  const int64_t Hq = qc.size(-2), Hkv = kc.size(-2), D = qc.size(-1), Dv = vc.size(-1);
  const Seqs s(desc);
  const int64_t lse_sb = varlen ? 0 : lse.stride(0), lse_sh = varlen ? lse.stride(0) : lse.stride(1);
  EMBEDOPS_DISPATCH_FLOATING(qc.scalar_type(), "cross_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, T>(rows_of<const scalar_t>(qc, varlen), rows_of<const scalar_t>(kc, varlen),
                                rows_of<const scalar_t>(vc, varlen), rows_of<scalar_t>(out, varlen),
                                lse.data_ptr<T>(), lse_sb, lse_sh, s, desc.batch, Hq, Hkv, D, Dv, desc.max_q_slot,
                                desc.max_k, static_cast<T>(scale));
  });
}

void cross_attention_backward_cpu_kernel(const at::Tensor& doc, const at::Tensor& qc, const at::Tensor& kc,
                                         const at::Tensor& vc, const at::Tensor& oc, const at::Tensor& lc,
                                         const at::Tensor& dlc, const SeqDesc& desc, double scale, bool varlen,
                                         at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t Hq = qc.size(-2), Hkv = kc.size(-2), D = qc.size(-1), Dv = vc.size(-1);
  const Seqs s(desc);
  const int64_t lse_sb = varlen ? 0 : lc.stride(0), lse_sh = varlen ? lc.stride(0) : lc.stride(1);
  EMBEDOPS_DISPATCH_FLOATING(qc.scalar_type(), "cross_attention_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, T>(
        rows_of<const scalar_t>(qc, varlen), rows_of<const scalar_t>(kc, varlen), rows_of<const scalar_t>(vc, varlen),
        rows_of<const scalar_t>(oc, varlen), rows_of<const scalar_t>(doc, varlen), lc.const_data_ptr<T>(),
        dlc.defined() ? dlc.const_data_ptr<T>() : nullptr, lse_sb, lse_sh, rows_of<scalar_t>(dq, varlen),
        rows_of<scalar_t>(dk, varlen), rows_of<scalar_t>(dv, varlen), s, desc.batch, Hq, Hkv, D, Dv, desc.max_q_slot,
        desc.max_k, static_cast<T>(scale));
  });
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(cross_attention_forward_stub, &cross_attention_forward_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(cross_attention_backward_stub, &cross_attention_backward_cpu_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops
