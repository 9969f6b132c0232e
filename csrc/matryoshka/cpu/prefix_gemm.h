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
//            with an in-register kVec x kVec transpose.
// A micro tile is kMR queries x kNR rows: 2 * kMR vector accumulators.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common/vec.h"
#include "matryoshka/cpu/segments.h"
#include "matryoshka/topk.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace mat {

using vf = vec::vfloat;
constexpr int kVec = vec::kFloats;  // 16 (avx512), 8 (avx2), 4 (default)
constexpr int kNR = 2 * kVec;       // corpus rows per panel
// queries per micro tile: 2 kMR accumulators + 2 corpus vectors + 1 broadcast within the
// register file (avx512: 24 + 3 of 32 zmm; avx2 / default: 12 + 3 of 16 ymm / xmm). objdump of
// the d loop at each level: vbroadcastss/vfmadd231ps (mulps/addps at default) on registers only,
// no stack traffic.
constexpr int kMR = (vec::kRegisters - 3) / 2 > 12 ? 12 : (vec::kRegisters - 3) / 2;

// Whether a call of B queries over prefixes up to dmax takes the micro kernel (else: ATen BLAS,
// one GEMM per prefix segment). At avx2 / avx512 always. At the default level (4 lanes; on x86-64
// SSE2 without FMA) only for small calls: past B >= 32 and B * dmax >= 4096, or B >= 16 and
// B * dmax >= 8192, the BLAS torch uses was faster. Forced default on an AVX2 Zen 3, float32,
// 2 threads, alternating processes, ms (micro kernel -> BLAS):
//   top-k N = 100k: B64 d'64 20-37 -> 18.5-19, B256 d'64 67-69 -> 49-52, B16 d'768 64-71 -> 49-52;
//   top-k N = 20k: B64 dims 64..768 42-50 -> 24-26, B16 dims 64..768 k=100 21-23 -> 17-19,
//   B32 d'128 5.7-6.8 -> 4.9-5.6; but B16 d'256 5.9-7.0 -> 6.8-7.9, B32 d'64 13 -> 14-17 (N = 100k),
//   B8 d'64 6.6-8.3 -> 10.5-11.5 (N = 100k);
//   similarity N = 20k: B64 dims 64..768 57-78 -> 23-26 (one full-D q @ x.T: 28-39), but
//   B4 8.4-12 -> 12-13.5.
// (MKL ran its AVX2 GEMM there whatever MKL_ENABLE_INSTRUCTIONS said; an x86-64 CPU without AVX2
// still has a BLAS of its own level, e.g. AVX on Sandy Bridge, twice this level's SSE2 lanes.)
constexpr bool kMicroAlways = kVec >= 8;
inline bool use_prefix_micro(int64_t B, int64_t dmax) {
  if (kMicroAlways || B < 16) return true;
  return B * dmax < (B >= 32 ? 4096 : 8192);
}

using vec::load_partial;
using vec::store_stream;
using vec::stream_fence;
using vec::storeu;

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
      vec::transpose(v);
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

// inv_norm_from_sq (topk.h) on a vector: 1/sqrt(sq) (correctly rounded, the same bits as the
// scalar rule), 0 where sq == 0, NaN where sq is not finite.
inline vf inv_norm_lanes(vf sq) {
  const vf r = sq == 0.f ? vf{} : vec::inv_sqrt(sq);
  const vf nan = vec::splat(std::numeric_limits<float>::quiet_NaN());
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
    storeu(inv + p * kNR, inv_norm_lanes(sq0));
    storeu(inv + p * kNR + kVec, inv_norm_lanes(sq1));
  }
}

// The micro kernel: accumulates one query panel against one corpus panel over d in [0, dims[P-1])
// and calls store(p, acc) after each prefix boundary, acc[i][h] holding the dot products of query
// i with rows h*kVec .. h*kVec+kVec-1 at prefix dims[p].
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

// Cosine of the lanes at one prefix: dot * inv_q * inv_x, 0 where either prefix is zero
// (cosine_from_dot's rule, lane by lane).
inline vf cosine_lanes(vf dot, float inv_q, vf inv_x) {
  if (inv_q == 0.f) return vf{};
  const vf r = dot * inv_q * inv_x;
  return inv_x != 0.f ? r : vf{};
}

// True if some lane is not below thr (v >= thr, or either is NaN): the lanes that threshold-first
// admission must look at. Almost always false once a top-k heap is full.
inline bool any_not_below(vf v, float thr) { return vec::any(~(v < thr)); }

}  // namespace mat
}  // namespace CPU_CAPABILITY
}  // namespace embedops
