#pragma once
// CUDA building blocks of the matryoshka kernels: per-prefix inverse norms, a corpus held as
// column blocks read in place, and a block-wide top-k selection kept in shared memory. The ranking order and
// the norm/cosine rules come from topk.h, the same functions the CPU kernels use.
//
// Block top-k ("threshold-first, then bitonic merge"): the block keeps its current top-k sorted
// best-first in s[0, KP) and a candidate buffer in s[KP, 2KP). Each round every thread scores one
// element; only those that rank before the current k-th entry are appended to the buffer (one
// compare rejects almost all). When the buffer could overflow, the 2KP entries are bitonic-sorted
// and the first KP kept. KP is a power of two >= k and >= the block size.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "common/cuda_warp.cuh"
#include "matryoshka/topk.h"

namespace embedops {
namespace mat {

constexpr int kThreads = 256;
constexpr int kMaxDimsCuda = 32;

struct DimList {
  int64_t d[kMaxDimsCuda];
  int n;
};

// The corpus as column blocks (MatryoshkaIndex's storage: one block per prefix segment; a plain
// corpus is one block): block i holds columns [start[i], start[i + 1]) with row stride ld[i].
template <typename scalar_t>
struct ColumnBlocks {
  const scalar_t* ptr[kMaxDimsCuda];
  int64_t ld[kMaxDimsCuda];
  int64_t start[kMaxDimsCuda + 1];
  int n;
};

template <typename scalar_t>
ColumnBlocks<scalar_t> make_column_blocks(const char* op, const std::vector<at::Tensor>& blocks) {
  TORCH_CHECK_VALUE(blocks.size() <= static_cast<size_t>(kMaxDimsCuda), op, ": at most ", kMaxDimsCuda,
                    " column blocks are supported on CUDA, got ", blocks.size());
  ColumnBlocks<scalar_t> cb{};
  cb.n = static_cast<int>(blocks.size());
  for (int i = 0; i < cb.n; ++i) {
    cb.ptr[i] = blocks[i].const_data_ptr<scalar_t>();
    cb.ld[i] = blocks[i].stride(0);
    cb.start[i + 1] = cb.start[i] + blocks[i].size(1);
  }
  return cb;
}

// f(j, x[row, j]) for the columns j in [a, e) of one row, strided over a warp's lanes (lane j % 32
// of each block's piece).
template <typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void for_row_columns(const ColumnBlocks<scalar_t>& x, int64_t row, int64_t a, int64_t e,
                                                int lane, F&& f) {
  for (int i = 0; i < x.n; ++i) {
    const int64_t lo = a > x.start[i] ? a : x.start[i];
    const int64_t hi = e < x.start[i + 1] ? e : x.start[i + 1];
    if (lo >= hi) continue;
    const scalar_t* xr = x.ptr[i] + row * x.ld[i];
    for (int64_t j = lo + lane; j < hi; j += 32) f(j, static_cast<acc_t>(xr[j - x.start[i]]));
  }
}

// One warp per row: out[p * out_ld + row] = inv_norm(||x[row, :dims[p]]||), rows grid-strided.
template <typename scalar_t, typename acc_t>
__global__ void inv_norms_kernel(const scalar_t* __restrict__ x, int64_t ld, int64_t rows, DimList dims,
                                 acc_t* __restrict__ out, int64_t out_ld) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; row < rows;
       row += warps) {
    const scalar_t* xr = x + row * ld;
    acc_t sq = 0;
    int64_t a = 0;
    for (int p = 0; p < dims.n; ++p) {
      const int64_t e = dims.d[p];
      for (int64_t j = a + lane; j < e; j += 32) {
        const acc_t v = static_cast<acc_t>(xr[j]);
        sq += v * v;
      }
      const acc_t total = warp_sum(sq);
      if (lane == 0) out[p * out_ld + row] = inv_norm_from_sq(total);
      a = e;
    }
  }
}

// Bitonic sort of M (power of two) (score, index[, payload]) entries, best first.
template <typename acc_t, bool kPayload>
__device__ void bitonic_sort(acc_t* s, int64_t* id, int* payload, int M) {
  for (int size = 2; size <= M; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < M / 2; i += blockDim.x) {
        const int a = 2 * i - (i & (stride - 1));
        const int b = a + stride;
        const bool ascending = (a & size) == 0;
        if (ascending == ranks_before(s[b], id[b], s[a], id[a])) {
          const acc_t ts = s[a];
          s[a] = s[b];
          s[b] = ts;
          const int64_t ti = id[a];
          id[a] = id[b];
          id[b] = ti;
          if constexpr (kPayload) {
            const int tp = payload[a];
            payload[a] = payload[b];
            payload[b] = tp;
          }
        }
      }
      __syncthreads();
    }
  }
}

template <typename acc_t, int KP>
struct BlockTopK {
  acc_t s[2 * KP];
  int64_t id[2 * KP];
  int nbuf;
};

// Sorts buffer + current top-k together; afterwards s[0, KP) is the new top-k (best first).
template <typename acc_t, int KP>
__device__ void block_topk_flush(BlockTopK<acc_t, KP>& t) {
  const int n = t.nbuf;
  for (int i = n + threadIdx.x; i < KP; i += blockDim.x) {
    t.s[KP + i] = sentinel_score<acc_t>();
    t.id[KP + i] = kSentinelIndex;
  }
  __syncthreads();
  bitonic_sort<acc_t, false>(t.s, t.id, nullptr, 2 * KP);
  if (threadIdx.x == 0) t.nbuf = 0;
  __syncthreads();
}

// Loads a top-k list (k entries, may hold sentinels) into the block's state.
template <typename acc_t, int KP>
__device__ void block_topk_load(BlockTopK<acc_t, KP>& t, const acc_t* s, const int64_t* id, int k) {
  for (int i = threadIdx.x; i < KP; i += blockDim.x) {
    t.s[i] = i < k ? s[i] : sentinel_score<acc_t>();
    t.id[i] = i < k ? id[i] : kSentinelIndex;
  }
  if (threadIdx.x == 0) t.nbuf = 0;
  __syncthreads();
}

// Offers elements [begin, end) — get(n, score, index) — to the block's top-k. Uniform control
// flow: every thread runs the same number of rounds.
template <typename acc_t, int KP, typename Get>
__device__ void block_topk_offer(BlockTopK<acc_t, KP>& t, int k, int64_t begin, int64_t end, Get get) {
  for (int64_t base = begin; base < end; base += blockDim.x) {
    const int nb = t.nbuf;
    __syncthreads();
    if (nb + static_cast<int>(blockDim.x) > KP) block_topk_flush(t);
    const int64_t n = base + threadIdx.x;
    if (n < end) {
      acc_t sc;
      int64_t ix;
      get(n, sc, ix);
      if (ranks_before(sc, ix, t.s[k - 1], t.id[k - 1])) {
        const int slot = atomicAdd(&t.nbuf, 1);
        t.s[KP + slot] = sc;
        t.id[KP + slot] = ix;
      }
    }
    __syncthreads();
  }
}

// Flushes pending candidates; afterwards t.s[0, k) is the sorted top-k.
template <typename acc_t, int KP>
__device__ void block_topk_finish(BlockTopK<acc_t, KP>& t) {
  const int nb = t.nbuf;
  __syncthreads();
  if (nb > 0) block_topk_flush(t);
}

// Runs `f` with the compile-time KP (256, 512 or 1024) fitting k <= KP.
template <typename F>
inline void dispatch_kp(int64_t k, F&& f) {
  if (k <= 256) {
    f(std::integral_constant<int, 256>{});
  } else if (k <= 512) {
    f(std::integral_constant<int, 512>{});
  } else {
    f(std::integral_constant<int, 1024>{});
  }
}

}  // namespace mat
}  // namespace embedops
