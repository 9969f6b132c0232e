#pragma once
// Attention family, CPU (per CPU level): the tile helpers every CPU attention kernel shares
// (cross_attention, co_attention, mixture_attention): tile-size heuristics, row addressing, vector
// exp/max for the softmax rows (common/vec.h: as wide as the level's registers), the register-
// blocked broadcast-FMA product, the flash forward / backward tile steps, tile conversion for
// float16/bfloat16. GEMM on raw tiles: gemm.h; the short-query pass: short_query.h.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>


#include "attention/attention.h"
#include "attention/attention_kernels.h"
#include "attention/cpu/gemm.h"
#include "common/vec.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace attn_cpu {

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

// The forward's query tile height. Long key sides (>= kMinBlockK): up to 256 rows, so that each
// (512-key) K and V tile is packed for the BLAS once per 256 rows instead of per 64, while the
// (batch, head, query tile) tasks still number >= 4 per core of the machine (else 128, then 64
// rows: many cores at small B * H). The machine's core count, not the thread setting, so that the
// tiles, and with them the bits of the result, do not depend on torch.set_num_threads. Measured
// at Lq = Lk = 1024, D = 64 (avx2, Zen 3, 2 threads, interleaved A/B): 64 -> 256 rows took the
// B1 H8 forward from 0.86x to 0.93x SDPA's speed; text->image (Lq 77: one 80-row tile instead of
// 40 + 37) from 1.02x to 1.09x. Shorter key sides: block_q_for.
inline int64_t forward_block_q(int64_t max_k, int64_t max_q, int64_t tasks_per_tile_row) {
  if (max_k < kMinBlockK) return block_q_for(max_k, max_q);
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  int64_t bq = 256;
  while (bq > 64 && tasks_per_tile_row * ((max_q + bq - 1) / bq) < 4 * cores) bq /= 2;
  const int64_t tiles = std::max<int64_t>(1, (max_q + bq - 1) / bq);
  return std::clamp<int64_t>(((max_q + tiles - 1) / tiles + 7) / 8 * 8, 8, bq);
}

// The backward's tile: at most 256 query rows (dK / dV are summed per tile: blocked summation).
// Long key sides: 256-key tiles, so P and dP (the tile's two score matrices) hold 2 x 256 KB at
// most, in L2, and the five per-tile GEMMs get 256-row operands. Measured as above: B1 H8
// Lq = Lk = 1024 fwd+bwd 0.93x -> ~1.0x SDPA's speed, B4 0.92x -> ~1.0x, text->image fwd+bwd
// 1.01x -> 1.08x (512-key tiles at 80 rows: 0.97x). Shorter key sides: block_q_for / block_k_for.
inline int64_t backward_block_q(int64_t max_k, int64_t max_q) {
  if (max_k < kMinBlockK) return std::min<int64_t>(block_q_for(max_k, max_q), 256);
  const int64_t tiles = std::max<int64_t>(1, (max_q + 255) / 256);
  return std::clamp<int64_t>(((max_q + tiles - 1) / tiles + 7) / 8 * 8, 8, 256);
}
inline int64_t backward_block_k(int64_t max_k, int64_t block_q) {
  return max_k >= kMinBlockK && block_q >= 64 ? 256 : block_k_for(block_q);
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
// kColSum: also colsum[j] += x[j] (co_attention's shared exponent: row and column sums in one pass).
template <bool kColSum = false, typename T>
T exp_row(T* x, int64_t n, T m, T* colsum = nullptr) {
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
      if constexpr (kColSum) vec::storeu(colsum + j, vec::loadu(colsum + j) + e);
      acc += e;
    }
    sum = vec::hsum(acc);
  }
  for (; j < n; ++j) {
    const T e = exp_any(x[j] - m);
    x[j] = e;
    if constexpr (kColSum) colsum[j] += e;
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
