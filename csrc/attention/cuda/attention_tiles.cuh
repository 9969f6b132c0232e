#pragma once
// Cross attention on CUDA: tiled kernels on CUDA cores (fp32 / fp64 accumulation), the same
// online-softmax math as the CPU kernels (attention.h).
//
// Forward: one block per (query tile of kRowsPerBlock rows, query head, batch); 4 warps, each
// owning kRowsPerWarp query rows. Key/value tiles of 32 keys are staged in shared memory
// (converted to acc_t); lane j scores key j of the tile, the warp reduces max / sum with
// shuffles, and each lane accumulates the output dims d = lane + 32 c in registers.
// Backward (deterministic, no atomics): a pre-pass computes delta = rowsum(dO * O) - dlse; dQ has
// one block per query tile (like the forward); dK, dV one block per (key tile, kv head, batch)
// that loops over the query heads of its group and all query tiles.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention.h"
#include "common/cuda_upload.cuh"
#include "common/cuda_warp.cuh"

namespace embedops {
namespace attn_cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // query rows (forward, dQ) or keys (dK/dV)
constexpr int kTile = 32;                             // keys (forward, dQ) or queries (dK/dV) per tile
constexpr int kMaxHeadDim = 256;
constexpr int kChunks = kMaxHeadDim / 32;  // output dims per lane

// (.., L, H, X) tensor with a contiguous last dim: element (b, token, h, 0).
template <typename T>
struct Rows {
  T* base;
  int64_t sb, sl, sh;
  __device__ __forceinline__ T* at(int64_t b, int64_t tok, int64_t h) const { return base + b * sb + tok * sl + h * sh; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t, bool varlen) {
  T* p = const_cast<T*>(t.const_data_ptr<T>());
  if (varlen) return {p, 0, t.stride(0), t.stride(1)};
  return {p, t.stride(0), t.stride(1), t.stride(2)};
}

// (5, B) int64 on the device: q_start, q_len, q_slot, k_start, k_len.
struct SeqPtrs {
  const int64_t* d;
  int64_t B;
  __device__ __forceinline__ int64_t q_start(int64_t b) const { return d[b]; }
  __device__ __forceinline__ int64_t q_len(int64_t b) const { return d[B + b]; }
  __device__ __forceinline__ int64_t q_slot(int64_t b) const { return d[2 * B + b]; }
  __device__ __forceinline__ int64_t k_start(int64_t b) const { return d[3 * B + b]; }
  __device__ __forceinline__ int64_t k_len(int64_t b) const { return d[4 * B + b]; }
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Copies rows [0, n) of a (rows x cols) tile into shared memory with row stride `ld` (converted to
// acc_t); rows [n, rows) are zero-filled so no lane ever reads uninitialised memory.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t* dst, int ld, const Rows<const scalar_t>& src, int64_t b,
                                          int64_t tok0, int64_t h, int n, int rows, int cols) {
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols, c = e % cols;
    dst[r * ld + c] = r < n ? static_cast<acc_t>(src.at(b, tok0 + r, h)[c]) : acc_t(0);
  }
}

struct Dims {
  int64_t B, Hq, Hkv, D, Dv;
  int64_t ntiles;  // query tiles (forward, dQ, delta) or key tiles (dK/dV) per sequence
};

// Split-KV forward (few query tiles against many keys, e.g. latent-query pooling): blockIdx.z is
// the key split; each split writes its normalised partial output and lse for its key range,
// laid out [split][b][h][row] (row < max_q_slot), and combine_kernel merges the splits in order.
template <typename acc_t>
struct SplitKV {
  acc_t* o = nullptr;    // (S, B, Hq, max_q_slot, Dv); nullptr: no split (write O and lse directly)
  acc_t* lse = nullptr;  // (S, B, Hq, max_q_slot)
  int64_t keys = 0;      // keys per split (a multiple of kTile)
  int64_t max_q_slot = 0;
  __device__ __forceinline__ int64_t row(int64_t s, int64_t b, int64_t h, int64_t i, int64_t B, int64_t Hq) const {
    return ((s * B + b) * Hq + h) * max_q_slot + i;
  }
};

// ---- forward ---------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Rows<const scalar_t> Q, Rows<const scalar_t> K, Rows<const scalar_t> V, Rows<scalar_t> O,
                   acc_t* __restrict__ lse, int64_t lse_sb, int64_t lse_sh, SeqPtrs seq, Dims dm, acc_t scale,
                   SplitKV<acc_t> split) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);  // [kRowsPerBlock][D]
  const int D = static_cast<int>(dm.D), Dv = static_cast<int>(dm.Dv), ldk = D + 1;
  acc_t* sK = sQ + kRowsPerBlock * D;  // [kTile][D + 1]
  acc_t* sV = sK + kTile * ldk;        // [kTile][Dv]

  const int64_t b = blockIdx.x / dm.ntiles, h = blockIdx.y;
  const int64_t i0 = (blockIdx.x % dm.ntiles) * kRowsPerBlock;
  const int64_t q_slot = seq.q_slot(b);
  if (i0 >= q_slot) return;  // uniform over the block
  const int64_t q_len = seq.q_len(b), k_len = seq.k_len(b);
  const int64_t tok0 = seq.q_start(b) + i0, ktok0 = seq.k_start(b);
  const int64_t hk = h / (dm.Hq / dm.Hkv);
  const int qn = static_cast<int>(imax(0, imin(kRowsPerBlock, q_len - i0)));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // this block's key range: all keys, or split blockIdx.z's range
  const int64_t k_begin = split.o != nullptr ? imin(k_len, blockIdx.z * split.keys) : 0;
  const int64_t k_end = split.o != nullptr ? imin(k_len, k_begin + split.keys) : k_len;

  load_tile(sQ, D, Q, b, tok0, h, qn, kRowsPerBlock, D);

  acc_t m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = attn::neg_inf<acc_t>();
    l[rr] = acc_t(0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) acc[rr][c] = acc_t(0);
  }

  for (int64_t j0 = k_begin; j0 < k_end; j0 += kTile) {
    const int kn = static_cast<int>(imin(kTile, k_end - j0));
    __syncthreads();  // the previous tile is fully consumed (and sQ is loaded on the first pass)
    load_tile(sK, ldk, K, b, ktok0 + j0, hk, kn, kTile, D);
    load_tile(sV, Dv, V, b, ktok0 + j0, hk, kn, kTile, Dv);
    __syncthreads();
    acc_t p[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const acc_t* qr = sQ + r * D;
      const acc_t* kj = sK + lane * ldk;
      acc_t s = acc_t(0);
      for (int d = 0; d < D; ++d) s += qr[d] * kj[d];
      s = lane < kn ? s * scale : attn::neg_inf<acc_t>();
      const acc_t m_new = attn::softmax_new_max(m[rr], warp_max(s));
      const acc_t alpha = attn::softmax_rescale(m[rr], m_new);
      p[rr] = lane < kn ? attn::softmax_prob(s, m_new) : acc_t(0);
      l[rr] = l[rr] * alpha + warp_sum(p[rr]);
      m[rr] = m_new;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) acc[rr][c] *= alpha;
    }
    for (int jj = 0; jj < kn; ++jj) {
      const acc_t* vj = sV + jj * Dv;
      acc_t pj[kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) pj[rr] = __shfl_sync(0xffffffffu, p[rr], jj);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d = lane + 32 * c;
        if (d < Dv) {
          const acc_t vv = vj[d];
#pragma unroll
          for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr][c] += pj[rr] * vv;
        }
      }
    }
  }

  if (split.o != nullptr) {  // partial state of this key split (normalised; no keys: 0, lse -inf)
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (i0 + r >= q_slot) continue;
      const int64_t row = split.row(blockIdx.z, b, h, i0 + r, dm.B, dm.Hq);
      acc_t* o = split.o + row * Dv;
      const bool valid = r < qn;
      const acc_t inv = valid ? attn::softmax_inv_denominator(l[rr]) : acc_t(0);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d = lane + 32 * c;
        if (d < Dv) o[d] = acc[rr][c] * inv;
      }
      if (lane == 0) split.lse[row] = valid ? attn::softmax_lse(m[rr], l[rr]) : attn::neg_inf<acc_t>();
    }
    return;
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (i0 + r >= q_slot) continue;
    scalar_t* o = O.at(b, tok0 + r, h);
    acc_t* lse_row = lse + b * lse_sb + h * lse_sh + tok0 + r;
    if (r < qn) {  // a valid query row (a row without keys has l = 0: out 0, lse -inf)
      const acc_t inv = attn::softmax_inv_denominator(l[rr]);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d = lane + 32 * c;
        if (d < Dv) o[d] = static_cast<scalar_t>(acc[rr][c] * inv);
      }
      if (lane == 0) *lse_row = attn::softmax_lse(m[rr], l[rr]);
    } else {  // rows i >= q_lengths[b]
      for (int d = lane; d < Dv; d += 32) o[d] = static_cast<scalar_t>(0);
      if (lane == 0) *lse_row = attn::neg_inf<acc_t>();
    }
  }
}

// Merges the key splits of the split-KV forward, in split order (deterministic): one warp per
// (row, head, batch): lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s. Rows
// without any valid key (every lse_s = -inf) give out 0, lse -inf, as in forward_kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(SplitKV<acc_t> split, int64_t nsplit, Rows<scalar_t> O, acc_t* __restrict__ lse, int64_t lse_sb,
                   int64_t lse_sh, SeqPtrs seq, Dims dm) {
  const int64_t b = blockIdx.x / dm.ntiles, h = blockIdx.y;
  const int64_t i0 = (blockIdx.x % dm.ntiles) * kRowsPerBlock;
  const int64_t q_slot = seq.q_slot(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Dv = static_cast<int>(dm.Dv);
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    if (i >= q_slot) continue;
    acc_t mx = attn::neg_inf<acc_t>();
    for (int64_t s = 0; s < nsplit; ++s) mx = attn::softmax_new_max(mx, split.lse[split.row(s, b, h, i, dm.B, dm.Hq)]);
    acc_t total = acc_t(0);
    for (int64_t s = 0; s < nsplit; ++s) total += attn::softmax_prob(split.lse[split.row(s, b, h, i, dm.B, dm.Hq)], mx);
    const acc_t inv = attn::softmax_inv_denominator(total);
    scalar_t* o = O.at(b, seq.q_start(b) + i, h);
    for (int d = lane; d < Dv; d += 32) {
      acc_t v = acc_t(0);
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t row = split.row(s, b, h, i, dm.B, dm.Hq);
        v += attn::softmax_prob(split.lse[row], mx) * split.o[row * Dv + d];
      }
      o[d] = static_cast<scalar_t>(v * inv);
    }
    if (lane == 0) lse[b * lse_sb + h * lse_sh + seq.q_start(b) + i] = attn::softmax_lse(mx, total);
  }
}

template <typename acc_t>
size_t forward_smem(int64_t D, int64_t Dv) {
  return sizeof(acc_t) * (kRowsPerBlock * D + kTile * (D + 1) + kTile * Dv);
}

// ---- backward --------------------------------------------------------------------------------

// delta[row] = sum_d dO * O - dlse (laid out like lse); one warp per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    delta_kernel(Rows<const scalar_t> O, Rows<const scalar_t> dO, const acc_t* __restrict__ dlse,
                 acc_t* __restrict__ delta, int64_t lse_sb, int64_t lse_sh, SeqPtrs seq, Dims dm) {
  const int64_t b = blockIdx.x / dm.ntiles, h = blockIdx.y;
  const int64_t i0 = (blockIdx.x % dm.ntiles) * kRowsPerBlock;
  const int64_t q_len = seq.q_len(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    if (i >= q_len) continue;
    const int64_t tok = seq.q_start(b) + i;
    const scalar_t* o = O.at(b, tok, h);
    const scalar_t* g = dO.at(b, tok, h);
    acc_t s = acc_t(0);
    for (int64_t d = lane; d < dm.Dv; d += 32) s += static_cast<acc_t>(o[d]) * static_cast<acc_t>(g[d]);
    s = warp_sum(s);
    const int64_t off = b * lse_sb + h * lse_sh + tok;
    if (lane == 0) delta[off] = s - (dlse != nullptr ? dlse[off] : acc_t(0));
  }
}

// dQ: one block per (query tile, query head, batch), like the forward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(Rows<const scalar_t> Q, Rows<const scalar_t> K, Rows<const scalar_t> V, Rows<const scalar_t> dO,
              const acc_t* __restrict__ lse, const acc_t* __restrict__ delta, int64_t lse_sb, int64_t lse_sh,
              Rows<scalar_t> dQ, SeqPtrs seq, Dims dm, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = static_cast<int>(dm.D), Dv = static_cast<int>(dm.Dv), ldk = D + 1, ldv = Dv + 1;
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);  // [kRowsPerBlock][D]
  acc_t* sdO = sQ + kRowsPerBlock * D;             // [kRowsPerBlock][Dv]
  acc_t* sK = sdO + kRowsPerBlock * Dv;            // [kTile][D + 1]
  acc_t* sV = sK + kTile * ldk;                    // [kTile][Dv + 1]

  const int64_t b = blockIdx.x / dm.ntiles, h = blockIdx.y;
  const int64_t i0 = (blockIdx.x % dm.ntiles) * kRowsPerBlock;
  const int64_t q_len = seq.q_len(b), k_len = seq.k_len(b);
  if (i0 >= q_len) return;  // uniform; dQ of padding rows stays 0
  const int64_t tok0 = seq.q_start(b) + i0, ktok0 = seq.k_start(b);
  const int64_t hk = h / (dm.Hq / dm.Hkv);
  const int qn = static_cast<int>(imin(kRowsPerBlock, q_len - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile(sQ, D, Q, b, tok0, h, qn, kRowsPerBlock, D);
  load_tile(sdO, Dv, dO, b, tok0, h, qn, kRowsPerBlock, Dv);
  acc_t lse_r[kRowsPerWarp], delta_r[kRowsPerWarp], dq[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t off = b * lse_sb + h * lse_sh + tok0 + r;
    lse_r[rr] = r < qn ? lse[off] : attn::neg_inf<acc_t>();  // -inf: P = 0 for padding rows
    delta_r[rr] = r < qn ? delta[off] : acc_t(0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dq[rr][c] = acc_t(0);
  }

  for (int64_t j0 = 0; j0 < k_len; j0 += kTile) {
    const int kn = static_cast<int>(imin(kTile, k_len - j0));
    __syncthreads();
    load_tile(sK, ldk, K, b, ktok0 + j0, hk, kn, kTile, D);
    load_tile(sV, ldv, V, b, ktok0 + j0, hk, kn, kTile, Dv);
    __syncthreads();
    acc_t ds[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const acc_t* qr = sQ + r * D;
      const acc_t* gr = sdO + r * Dv;
      const acc_t* kj = sK + lane * ldk;
      const acc_t* vj = sV + lane * ldv;
      acc_t s = acc_t(0), dp = acc_t(0);
      for (int d = 0; d < D; ++d) s += qr[d] * kj[d];
      for (int d = 0; d < Dv; ++d) dp += gr[d] * vj[d];
      const acc_t p = lane < kn ? attn::softmax_prob(s * scale, lse_r[rr]) : acc_t(0);
      ds[rr] = attn::softmax_grad(p, dp, delta_r[rr]);
    }
    for (int jj = 0; jj < kn; ++jj) {
      const acc_t* kj = sK + jj * ldk;
      acc_t dsj[kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) dsj[rr] = __shfl_sync(0xffffffffu, ds[rr], jj);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
          const acc_t kv = kj[d];
#pragma unroll
          for (int rr = 0; rr < kRowsPerWarp; ++rr) dq[rr][c] += dsj[rr] * kv;
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= qn) continue;
    scalar_t* out = dQ.at(b, tok0 + r, h);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < D) out[d] = static_cast<scalar_t>(dq[rr][c] * scale);
    }
  }
}

// dK, dV: one block per (key tile of kRowsPerBlock keys, kv head, batch); the warp's lanes are
// the 32 queries of a query tile.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dkdv_kernel(Rows<const scalar_t> Q, Rows<const scalar_t> K, Rows<const scalar_t> V, Rows<const scalar_t> dO,
                const acc_t* __restrict__ lse, const acc_t* __restrict__ delta, int64_t lse_sb, int64_t lse_sh,
                Rows<scalar_t> dK, Rows<scalar_t> dV, SeqPtrs seq, Dims dm, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = static_cast<int>(dm.D), Dv = static_cast<int>(dm.Dv), ldq = D + 1, ldo = Dv + 1;
  acc_t* sK = reinterpret_cast<acc_t*>(smem_raw);  // [kRowsPerBlock][D]
  acc_t* sV = sK + kRowsPerBlock * D;              // [kRowsPerBlock][Dv]
  acc_t* sQ = sV + kRowsPerBlock * Dv;             // [kTile][D + 1]
  acc_t* sdO = sQ + kTile * ldq;                   // [kTile][Dv + 1]
  acc_t* sL = sdO + kTile * ldo;                   // [kTile] lse
  acc_t* sDelta = sL + kTile;                      // [kTile]

  const int64_t b = blockIdx.x / dm.ntiles, hk = blockIdx.y;
  const int64_t j0 = (blockIdx.x % dm.ntiles) * kRowsPerBlock;
  const int64_t q_len = seq.q_len(b), k_len = seq.k_len(b);
  if (j0 >= k_len) return;  // uniform; gradients of padding keys stay 0
  const int64_t ktok0 = seq.k_start(b) + j0, qtok = seq.q_start(b);
  const int kn = static_cast<int>(imin(kRowsPerBlock, k_len - j0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t group = dm.Hq / dm.Hkv;

  load_tile(sK, D, K, b, ktok0, hk, kn, kRowsPerBlock, D);
  load_tile(sV, Dv, V, b, ktok0, hk, kn, kRowsPerBlock, Dv);
  acc_t dk[kRowsPerWarp][kChunks], dv[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dk[rr][c] = dv[rr][c] = acc_t(0);
  }

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < q_len; i0 += kTile) {
      const int qn = static_cast<int>(imin(kTile, q_len - i0));
      __syncthreads();
      load_tile(sQ, ldq, Q, b, qtok + i0, h, qn, kTile, D);
      load_tile(sdO, ldo, dO, b, qtok + i0, h, qn, kTile, Dv);
      for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
        const int64_t off = b * lse_sb + h * lse_sh + qtok + i0 + i;
        sL[i] = i < qn ? lse[off] : attn::neg_inf<acc_t>();
        sDelta[i] = i < qn ? delta[off] : acc_t(0);
      }
      __syncthreads();
      acc_t p[kRowsPerWarp], ds[kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;  // this warp's key
        const acc_t* kr = sK + r * D;
        const acc_t* vr = sV + r * Dv;
        const acc_t* qi = sQ + lane * ldq;  // this lane's query
        const acc_t* gi = sdO + lane * ldo;
        acc_t s = acc_t(0), dp = acc_t(0);
        for (int d = 0; d < D; ++d) s += qi[d] * kr[d];
        for (int d = 0; d < Dv; ++d) dp += gi[d] * vr[d];
        p[rr] = attn::softmax_prob(s * scale, sL[lane]);  // 0 for lanes past qn (lse -inf)
        ds[rr] = attn::softmax_grad(p[rr], dp, sDelta[lane]);
      }
      for (int ii = 0; ii < qn; ++ii) {
        const acc_t* qi = sQ + ii * ldq;
        const acc_t* gi = sdO + ii * ldo;
        acc_t pi[kRowsPerWarp], dsi[kRowsPerWarp];
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
          pi[rr] = __shfl_sync(0xffffffffu, p[rr], ii);
          dsi[rr] = __shfl_sync(0xffffffffu, ds[rr], ii);
        }
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int d = lane + 32 * c;
          if (d < Dv) {
            const acc_t g = gi[d];
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) dv[rr][c] += pi[rr] * g;
          }
          if (d < D) {
            const acc_t qq = qi[d];
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) dk[rr][c] += dsi[rr] * qq;
          }
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= kn) continue;
    scalar_t* ok = dK.at(b, ktok0 + r, hk);
    scalar_t* ov = dV.at(b, ktok0 + r, hk);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < D) ok[d] = static_cast<scalar_t>(dk[rr][c] * scale);
      if (d < Dv) ov[d] = static_cast<scalar_t>(dv[rr][c]);
    }
  }
}

template <typename acc_t>
size_t dq_smem(int64_t D, int64_t Dv) {
  return sizeof(acc_t) * (kRowsPerBlock * (D + Dv) + kTile * (D + 1) + kTile * (Dv + 1));
}

template <typename acc_t>
size_t dkdv_smem(int64_t D, int64_t Dv) {
  return sizeof(acc_t) * (kRowsPerBlock * (D + Dv) + kTile * (D + 1) + kTile * (Dv + 1) + 2 * kTile);
}

// ---- host helpers ----------------------------------------------------------------------------

// Head dims, grid size and shared memory the kernels support; raises a clear error otherwise and
// opts the kernel into more than 48 KiB of shared memory when it needs it.
void check_cuda_limits(const char* op, int64_t D, int64_t Dv, int64_t blocks_x, int64_t heads);
void prepare_smem(const char* op, const void* kernel, size_t smem, const at::Tensor& like);

// The whole forward / backward of one attention problem described by a SeqDesc (any k_start per
// batch in the padded layout too: mixture_attention runs one per modality, co_attention one per
// direction) into allocated outputs (the gradients zeroed); operands with a contiguous last dim
// (prepare, attention_kernels.h); dlse undefined when absent. In cross_attention_{fwd,bwd}.cu.
void forward_into(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const SeqDesc& desc, double scale, bool varlen, at::Tensor& out, at::Tensor& lse);
void backward_into(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse,
                   const SeqDesc& desc, double scale, bool varlen, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace attn_cuda

// The (5, B) sequence table on q's device without a blocking copy (common/cuda_upload.cuh): kept
// on the device for uniform tables (no lengths: capturable in a CUDA graph after a first call);
// otherwise pinned + non_blocking (such calls already synchronised to validate the lengths).
inline at::Tensor seq_desc_on_device(const SeqDesc& desc, const c10::Device& device) {
  if (desc.uniform) {
    const int64_t* p = desc.desc.const_data_ptr<int64_t>();
    return upload_cached(std::vector<int64_t>(p, p + desc.desc.numel()), device);
  }
  return upload_async(desc.desc, device);
}

}  // namespace embedops
