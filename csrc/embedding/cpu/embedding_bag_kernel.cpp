// multiplexed_embedding_bag on the CPU: forward (hashing inside the lookup), deterministic dense
// backward, per_sample_weights gradient, and the fused row-wise optimizer update.
//
// Forward: parallel over bags (f, b); each id is hashed once per probe with hashing.h (fp32/opmath
// accumulation, loops over D the compiler vectorises). Sum/mean at D = 16/32/64/128: blocks of
// bags hashed into a local buffer, then gathered with rows prefetched a fixed distance ahead
// (forward_kernel_fixed_d); other D and max pooling: rows hashed a few ids ahead into a ring.
// Backward: every (id, probe) contribution (or, for max pooling, every argmax element) gets its
// row; contributions are bucketed by row range with a stable counting scatter, then each bucket
// (a disjoint slice of the table, one thread) sorts its entries by (row, contribution index) and
// sums each row's contributions in that fixed order. No two threads touch one row and the order
// of the sums never depends on scheduling or thread count: identical bits run to run.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/vec.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
#include "embedding/hashing.h"
#include "embedding/cpu/embedding_bag_cpu.h"

// GCC's unroll-and-jam (on at -O3) fuses two ids of the id loops below and then runs the loops
// over D scalar (measured: 3-4x slower); keep it off for this file's kernels.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
// and no memset idiom: the per-bag zeroing of a 64-float accumulator became a `rep stos` of 256
// bytes (~8 % of the avx2 forward in a profile) instead of a few vector stores
#pragma GCC optimize("no-loop-unroll-and-jam", "no-tree-loop-distribute-patterns")
#endif

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

// ---- forward -----------------------------------------------------------------------------------

// kMax: max pooling (else sum or mean, L.mode)
template <typename scalar_t, typename index_t, bool kMax, bool kPsw>
void forward_kernel(const BagLayout& L, const uint64_t* salts, const scalar_t* __restrict__ w,
                    const index_t* __restrict__ vals, const int64_t* __restrict__ offs,
                    const scalar_t* __restrict__ psw, scalar_t* __restrict__ out, int64_t* __restrict__ argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = L.dim, B = L.batch, Q = L.num_blocks;
  const uint64_t R = static_cast<uint64_t>(L.num_rows);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const int comb = static_cast<int>(L.combine), mode = static_cast<int>(L.mode);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D));
  at::parallel_for(0, L.num_features * B, grain, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> acc(L.max_probes * D);
    // max pooling tracks the argmax as an int32 position in the bag (vectorises with the float
    // compare) and maps it to the row through bag_rows at the end of the bag
    std::vector<int32_t> arg(kMax ? L.max_probes * D : 0);
    std::vector<int64_t> bag_rows;
    // Rows are hashed kPrefetch ids ahead of their use (across bag boundaries) into a ring, and
    // their cache lines prefetched, so the table reads of several ids are in flight at once.
    constexpr int64_t kPrefetch = 8, kRing = 16;
    const int64_t maxp = L.max_probes;
    std::vector<int64_t> ring(kRing * maxp);
    const int64_t i_end = offs[j1];
    int64_t pf_i = offs[j0], pf_j = j0;
    int64_t pf_fend = -1, pf_np = 0;  // end bag of the prefetch cursor's feature, its probe count
    const uint64_t* pf_salt = nullptr;
    auto hash_ahead = [&]() {
      while (offs[pf_j + 1] <= pf_i) ++pf_j;
      if (pf_j >= pf_fend) {  // entered a new feature (no division per id)
        const int64_t pf_f = pf_j / B;
        pf_fend = (pf_f + 1) * B;
        pf_salt = salts + L.pbase[pf_f];
        pf_np = L.probes[pf_f];
      }
      int64_t* slot = ring.data() + (pf_i & (kRing - 1)) * maxp;
      const int64_t v = static_cast<int64_t>(vals[pf_i]);
      for (int64_t p = 0; p < pf_np; ++p) {
        slot[p] = hash_row(v, pf_salt[p], R);
        prefetch(w + slot[p] * D, row_bytes);
      }
      ++pf_i;
    };
    for (int64_t k = 0; k < kPrefetch && pf_i < i_end; ++k) hash_ahead();
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t f = j / B, b = j - f * B;
      const int64_t P = L.probes[f], q0 = L.pbase[f];
      const int64_t start = offs[j], end = offs[j + 1];
      std::fill(acc.begin(), acc.begin() + P * D, acc_t(0));
      if constexpr (kMax) {
        if (static_cast<int64_t>(bag_rows.size()) < (end - start) * P) bag_rows.resize((end - start) * P);
      }
      for (int64_t i = start; i < end; ++i) {
        if (pf_i < i_end) hash_ahead();
        const int64_t* rows_cur = ring.data() + (i & (kRing - 1)) * maxp;
        const acc_t s = kPsw ? static_cast<acc_t>(psw[i]) : acc_t(1);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = rows_cur[p];
          const scalar_t* __restrict__ wr = w + r * D;
          acc_t* __restrict__ a = acc.data() + p * D;
          if constexpr (kMax) {
            int32_t* __restrict__ ag = arg.data() + p * D;
            const int32_t pos = static_cast<int32_t>(i - start);
            bag_rows[pos * P + p] = r;
            if (i == start) {
              for (int64_t d = 0; d < D; ++d) {
                a[d] = static_cast<acc_t>(wr[d]);
                ag[d] = 0;
              }
            } else {
              for (int64_t d = 0; d < D; ++d) {
                const acc_t x = static_cast<acc_t>(wr[d]);
                const bool gt = x > a[d];
                a[d] = gt ? x : a[d];
                ag[d] = gt ? pos : ag[d];
              }
            }
          } else if constexpr (kPsw) {
            for (int64_t d = 0; d < D; ++d) a[d] += s * static_cast<acc_t>(wr[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) a[d] += static_cast<acc_t>(wr[d]);
          }
        }
      }
      const acc_t ps = pool_scale<acc_t>(mode, end - start);
      scalar_t* o = out + b * L.out_dim;
      if (comb == static_cast<int>(Combine::kConcat)) {
        for (int64_t p = 0; p < P; ++p) {
          scalar_t* __restrict__ op = o + (q0 + p) * D;
          const acc_t* __restrict__ a = acc.data() + p * D;
          for (int64_t d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(a[d] * ps);
        }
      } else {
        const acc_t cs = combine_scale<acc_t>(comb, P) * ps;
        for (int64_t p = 1; p < P; ++p) {
          const acc_t* __restrict__ ap = acc.data() + p * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += ap[d];
        }
        scalar_t* __restrict__ op = o + f * D;
        for (int64_t d = 0; d < D; ++d) op[d] = static_cast<scalar_t>(acc[d] * cs);
      }
      if constexpr (kMax) {
        int64_t* ag_out = argmax + b * Q * D + q0 * D;
        if (start == end) {
          std::fill(ag_out, ag_out + P * D, int64_t(-1));
        } else {
          for (int64_t p = 0; p < P; ++p)
            for (int64_t d = 0; d < D; ++d) ag_out[p * D + d] = bag_rows[arg[p * D + d] * P + p];
        }
      }
    }
  });
}

// ---- fixed-D sum/mean forward --------------------------------------------------------------------
//
// Sum/mean pooling at a compile-time D (16, 32, 64, 128), the accumulators in registers. A thread
// walks its bags in hash blocks: the bags of one feature holding at most kHashBlockRows (id, probe)
// rows. It hashes a whole block into a small local buffer first (a tight loop the compiler
// vectorises when R < 2^32), then gathers: every row it adds prefetches the row kGatherAhead
// rows further on in the buffer, so a steady number of table reads is in flight across bag
// boundaries (hashing one bag ahead, as before, kept only ~L rows in flight). A bag with more rows
// than a block is reduced in chunks of a block. Big outputs may be written with streaming stores
// (see stream_output). Measured on the bench's F=26 B=4096 L~5 D=64 P=1 trace, 1 thread: 15.5 ms
// with bag-ahead hashing, 8.4 ms with this (nn.EmbeddingBag on pre-hashed ids: 9.2 ms).

// (kHashBlockRows, kGatherAhead, stream_output, hash_rows_block: embedding_bag_cpu.h)
//
// The kD sums of a bag live in registers (BagAcc) from its first row to its store: on float tables
// kD / kFloats vectors of the level's width (GCC kept the former acc_t x[kD] arrays in stack
// memory between bags: ~40 loads / stores per bag, and a bounds check per row on the prefetch
// cursor, ~25 % more instructions than the gather itself at L ~ 5). The row buffer is padded with
// kGatherAhead valid rows, so the cursor runs past a block's rows without a check.

// A bag's kD running sums in opmath, lane d the sum of column d in row order (as the scalar loop).
template <typename scalar_t, int kD, typename = void>
struct BagAcc {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t x[kD];
  void zero() {
    for (int d = 0; d < kD; ++d) x[d] = acc_t(0);
  }
  void add(const scalar_t* __restrict__ row) {
#pragma omp simd
    for (int d = 0; d < kD; ++d) x[d] += static_cast<acc_t>(row[d]);
  }
  void add(acc_t s, const scalar_t* __restrict__ row) {
#pragma omp simd
    for (int d = 0; d < kD; ++d) x[d] += s * static_cast<acc_t>(row[d]);
  }
  void add_scaled(const BagAcc& o, acc_t s) {
    for (int d = 0; d < kD; ++d) x[d] += o.x[d] * s;
  }
  void load(const acc_t* p) {
    for (int d = 0; d < kD; ++d) x[d] = p[d];
  }
  void save(acc_t* p) const {
    for (int d = 0; d < kD; ++d) p[d] = x[d];
  }
  // stream: dst 64-byte aligned and kD * sizeof(scalar_t) a multiple of 64 (stream_output)
  void store(scalar_t* __restrict__ dst, acc_t scale, bool stream) const {
    if constexpr (kD * sizeof(scalar_t) % 64 == 0) {
      if (stream) {
        alignas(64) scalar_t tmp[kD];
        for (int d = 0; d < kD; ++d) tmp[d] = static_cast<scalar_t>(x[d] * scale);
        vec::stream_copy(dst, tmp, kD * static_cast<int64_t>(sizeof(scalar_t)));
        return;
      }
    }
    for (int d = 0; d < kD; ++d) dst[d] = static_cast<scalar_t>(x[d] * scale);
  }
};

template <int kD>
struct BagAcc<float, kD, std::enable_if_t<kD % vec::kFloats == 0>> {
  static constexpr int kV = kD / vec::kFloats;
  vec::vfloat v[kV];
  void zero() {
    for (int i = 0; i < kV; ++i) v[i] = vec::vfloat{};
  }
  void add(const float* __restrict__ row) {
    for (int i = 0; i < kV; ++i) v[i] += vec::loadu(row + i * vec::kFloats);
  }
  void add(float s, const float* __restrict__ row) {
    const vec::vfloat sv = vec::splat(s);
    for (int i = 0; i < kV; ++i) v[i] += sv * vec::loadu(row + i * vec::kFloats);
  }
  void add_scaled(const BagAcc& o, float s) {
    const vec::vfloat sv = vec::splat(s);
    for (int i = 0; i < kV; ++i) v[i] += o.v[i] * sv;
  }
  void load(const float* p) {
    for (int i = 0; i < kV; ++i) v[i] = vec::loadu(p + i * vec::kFloats);
  }
  void save(float* p) const {
    for (int i = 0; i < kV; ++i) vec::storeu(p + i * vec::kFloats, v[i]);
  }
  // stream: dst 64-byte aligned, kD * 4 a multiple of 64 (stream_output)
  void store(float* __restrict__ dst, float scale, bool stream) const {
    const vec::vfloat sv = vec::splat(scale);
    if (stream) {
      for (int i = 0; i < kV; ++i) vec::store_stream(dst + i * vec::kFloats, v[i] * sv);
    } else {
      for (int i = 0; i < kV; ++i) vec::storeu(dst + i * vec::kFloats, v[i] * sv);
    }
  }
};

template <typename scalar_t, bool kPsw, int kD>
void forward_kernel_fixed_d(const BagLayout& L, const uint64_t* salts, const scalar_t* __restrict__ w,
                            const void* vals, HashBlockFn hash_block, const int64_t* __restrict__ offs,
                            const scalar_t* __restrict__ psw, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = BagAcc<scalar_t, kD>;
  const int64_t B = L.batch;
  const uint64_t R = static_cast<uint64_t>(L.num_rows);
  const int comb = static_cast<int>(L.combine), mode = static_cast<int>(L.mode);
  constexpr int64_t kRowBytes = kD * static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kPrefetchBytes = std::min(kRowBytes, kPrefetchRowBytes);
  const bool stream = stream_output(out, B * L.out_dim, kRowBytes);
  const int64_t grain = std::max<int64_t>(1, 4096 / kD);
  at::parallel_for(0, L.num_features * B, grain, [&](int64_t j0, int64_t j1) {
    const int64_t cap = std::max<int64_t>(kHashBlockRows, L.max_probes);
    // the block's rows, then kGatherAhead valid rows that the prefetch cursor may run into
    std::unique_ptr<int64_t[]> rows(new int64_t[cap + kGatherAhead]);
    std::vector<acc_t> partial;  // per-probe sums of a long bag, reduced in chunks
    const int64_t* pf = rows.get();  // the gather's prefetch cursor
    auto start_block = [&](int64_t n) {
      std::fill(rows.get() + n, rows.get() + n + kGatherAhead, n > 0 ? rows[n - 1] : int64_t(0));
      for (int64_t i = 0; i < kGatherAhead; ++i) prefetch(w + rows[i] * kD, kPrefetchBytes);
      pf = rows.get() + kGatherAhead;
    };
    // x += sum_t s_t * weight[r[t * P]] for t < n (s_t = psw[t] or 1)
    auto gather = [&](Acc& x, const int64_t* __restrict__ r, int64_t n, int64_t P, const scalar_t* __restrict__ sw) {
      for (int64_t t = 0; t < n; ++t) {
        prefetch(w + *pf++ * kD, kPrefetchBytes);
        const scalar_t* __restrict__ wr = w + r[t * P] * kD;
        if constexpr (kPsw) {
          x.add(static_cast<acc_t>(sw[t]), wr);
        } else {
          x.add(wr);
        }
      }
    };
    // pooled(p, x) gives probe p's pooled sum of bag (f, b) -> out (concat) or the combined total.
    // One call site for every bag, long or not: the combine compiles to one instruction sequence
    // (whether it fuses the multiply-add is the compiler's choice), so every bag rounds alike.
    auto emit = [&](int64_t b, int64_t f, int64_t P, int64_t len, const auto& pooled) {
      const acc_t ps = pool_scale<acc_t>(mode, len);
      scalar_t* o = out + b * L.out_dim;
      const int64_t q0 = L.pbase[f];
      if (comb == static_cast<int>(Combine::kConcat)) {
        for (int64_t p = 0; p < P; ++p) {
          Acc x;
          pooled(p, x);
          x.store(o + (q0 + p) * kD, ps, stream);
        }
      } else {
        Acc total;
        total.zero();
        for (int64_t p = 0; p < P; ++p) {
          Acc x;
          pooled(p, x);
          total.add_scaled(x, ps);
        }
        total.store(o + f * kD, combine_scale<acc_t>(comb, P), stream);
      }
    };

    int64_t j = j0;
    while (j < j1) {
      const int64_t f = j / B, P = L.probes[f];
      const uint64_t* s = salts + L.pbase[f];
      const int64_t fend = std::min(j1, (f + 1) * B);
      const int64_t start = offs[j];
      const int64_t cap_ids = cap / P;
      // a block: bags [j, je) of feature f whose ids fit in cap_ids, or one longer bag, reduced
      // in chunks of cap_ids into `partial` first
      const auto [je, long_bag] = next_bag_block(offs, j, fend, cap_ids);
      if (long_bag) {
        const int64_t len = offs[j + 1] - start;
        partial.assign(P * kD, acc_t(0));
        for (int64_t c0 = 0; c0 < len; c0 += cap_ids) {
          const int64_t n = std::min(cap_ids, len - c0);
          hash_block(vals, start + c0, n, s, P, R, rows.get());
          start_block(n * P);
          for (int64_t p = 0; p < P; ++p) {
            Acc x;
            x.load(partial.data() + p * kD);
            gather(x, rows.get() + p, n, P, kPsw ? psw + start + c0 : nullptr);
            x.save(partial.data() + p * kD);
          }
        }
      } else {
        const int64_t n_ids = offs[je] - start;
        hash_block(vals, start, n_ids, s, P, R, rows.get());
        start_block(n_ids * P);
      }
      for (; j < je; ++j) {
        const int64_t bs = offs[j], len = offs[j + 1] - bs;
        const int64_t* r = rows.get() + (bs - start) * P;
        emit(j - f * B, f, P, len, [&](int64_t p, Acc& x) {
          if (long_bag) {
            x.load(partial.data() + p * kD);
          } else {
            x.zero();
            gather(x, r + p, len, P, kPsw ? psw + bs : nullptr);
          }
        });
      }
    }
    if (stream) vec::stream_fence();
  });
}

// Runs the fixed-D kernel (sum or mean pooling) when D is one of its sizes; returns false otherwise.
template <typename scalar_t, typename index_t, bool kPsw>
bool forward_fixed_d(const BagLayout& L, const uint64_t* salts, const scalar_t* w, const index_t* vals,
                     const int64_t* offs, const scalar_t* psw, scalar_t* out) {
  const HashBlockFn h = &hash_rows_block_at<index_t>;
  switch (L.dim) {
    case 16: forward_kernel_fixed_d<scalar_t, kPsw, 16>(L, salts, w, vals, h, offs, psw, out); return true;
    case 32: forward_kernel_fixed_d<scalar_t, kPsw, 32>(L, salts, w, vals, h, offs, psw, out); return true;
    case 64: forward_kernel_fixed_d<scalar_t, kPsw, 64>(L, salts, w, vals, h, offs, psw, out); return true;
    case 128: forward_kernel_fixed_d<scalar_t, kPsw, 128>(L, salts, w, vals, h, offs, psw, out); return true;
    default: return false;
  }
}

void embedding_bag_forward_kernel(const BagLayout& L, int64_t seed, const at::Tensor& w, const at::Tensor& v,
                                  const at::Tensor& offs, const at::Tensor& psw, bool validate, at::Tensor& out,
                                  at::Tensor& argmax) {
  (void)validate;  // the CPU checks are O(F*B) and always run
  check_offsets_cpu("multiplexed_embedding_bag", offs, v.numel());
  TORCH_CHECK_VALUE(L.mode != PoolMode::kMax || v.numel() <= std::numeric_limits<int32_t>::max(),
                    "multiplexed_embedding_bag: mode=\"max\" supports at most 2^31 - 1 values on the CPU, got ",
                    v.numel());
  if (L.batch == 0) return;
  const bool has_psw = psw.defined();
  const std::vector<uint64_t> salts = block_salts(L, seed);
  EMBEDOPS_DISPATCH_FLOATING(w.scalar_type(), "multiplexed_embedding_bag_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* pp = has_psw ? psw.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t* ap = L.mode == PoolMode::kMax ? argmax.data_ptr<int64_t>() : nullptr;
    const int64_t* o = offs.const_data_ptr<int64_t>();
    EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "multiplexed_embedding_bag_cpu", [&] {
      const index_t* vp = v.const_data_ptr<index_t>();
      switch (L.mode) {
        case PoolMode::kSum:
          EMBEDOPS_BOOL_SWITCH(has_psw, kPsw, [&] {
            if (!forward_fixed_d<scalar_t, index_t, kPsw>(L, salts.data(), wp, vp, o, pp, op))
              forward_kernel<scalar_t, index_t, false, kPsw>(L, salts.data(), wp, vp, o, pp, op, ap);
          });
          break;
        case PoolMode::kMean:
          if (!forward_fixed_d<scalar_t, index_t, false>(L, salts.data(), wp, vp, o, pp, op))
            forward_kernel<scalar_t, index_t, false, false>(L, salts.data(), wp, vp, o, pp, op, ap);
          break;
        case PoolMode::kMax:
          forward_kernel<scalar_t, index_t, true, false>(L, salts.data(), wp, vp, o, pp, op, ap);
          break;
      }
    });
  });
}

// ---- backward: contributions, bucketed and sorted by row -----------------------------------------

// One contribution: `row` receives scale * grad_out[src : src + n] at columns [d0, d0 + n).
// Sum/mean pooling: one per (id, probe), n = D, d0 = 0. Max pooling: one per argmax element, n = 1,
// d0 = k % D. Arrays are left uninitialised (every slot is written; this machine's page faults
// on zeroed memory cost as much as the work).
template <typename T>
using Buffer = std::unique_ptr<T[]>;

template <typename acc_t>
struct Contributions {
  int64_t size = 0;
  Buffer<int64_t> row;  // -1: none (empty max bag)
  Buffer<int64_t> src;
  Buffer<acc_t> scale;
  bool elementwise = false;
  void resize(int64_t k) {
    size = k;
    row.reset(new int64_t[k]);
    src.reset(new int64_t[k]);
    scale.reset(new acc_t[k]);
  }
};

template <typename scalar_t, typename index_t>
Contributions<at::opmath_type<scalar_t>> build_contributions(const BagLayout& L, int64_t seed, const index_t* vals,
                                                            const int64_t* offs, const scalar_t* psw,
                                                            const int64_t* argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  Contributions<acc_t> c;
  const int64_t D = L.dim, B = L.batch, Q = L.num_blocks, F = L.num_features;
  const int comb = static_cast<int>(L.combine), mode = static_cast<int>(L.mode);
  if (L.mode == PoolMode::kMax) {
    c.elementwise = true;
    c.resize(B * Q * D);
    std::vector<int64_t> feat_of_block(Q);
    for (int64_t f = 0; f < F; ++f)
      for (int64_t p = 0; p < L.probes[f]; ++p) feat_of_block[L.pbase[f] + p] = f;
    at::parallel_for(0, B * Q, 64, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t b = e / Q, q = e - b * Q, f = feat_of_block[q];
        const acc_t cs = combine_scale<acc_t>(comb, L.probes[f]);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t k = e * D + d;
          c.row[k] = argmax[k];
          c.src[k] = b * L.out_dim + out_column(comb, q, f, d, D);
          c.scale[k] = cs;
        }
      }
    });
    return c;
  }
  // sum / mean: contribution k of (bag j, position i, probe p) = cbase[f] + (i - offs[f*B]) * P_f + p
  std::vector<int64_t> cbase(F + 1, 0);
  for (int64_t f = 0; f < F; ++f) cbase[f + 1] = cbase[f] + (offs[(f + 1) * B] - offs[f * B]) * L.probes[f];
  c.resize(cbase[F]);
  const std::vector<uint64_t> salts = block_salts(L, seed);
  const uint64_t R = static_cast<uint64_t>(L.num_rows);
  at::parallel_for(0, F * B, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t f = j / B, b = j - f * B, P = L.probes[f], q0 = L.pbase[f];
      const int64_t start = offs[j], end = offs[j + 1];
      const acc_t base_scale = pool_scale<acc_t>(mode, end - start) * combine_scale<acc_t>(comb, P);
      int64_t k = cbase[f] + (start - offs[f * B]) * P;
      for (int64_t i = start; i < end; ++i) {
        const acc_t s = psw != nullptr ? base_scale * static_cast<acc_t>(psw[i]) : base_scale;
        for (int64_t p = 0; p < P; ++p, ++k) {
          c.row[k] = hash_row(static_cast<int64_t>(vals[i]), salts[q0 + p], R);
          c.src[k] = b * L.out_dim + out_column(comb, q0 + p, f, 0, D);
          c.scale[k] = s;
        }
      }
    }
  });
  return c;
}

// A contribution as the row buckets hold it: sorted by (row, k); k (the contribution's index)
// fixes the summation order of a row, so the bits never depend on threads.
template <typename acc_t>
struct RowEntry {
  int64_t row;
  int64_t k;
  int64_t src;
  acc_t scale;
};

// Buckets the contributions by row range (a stable counting scatter over fixed chunks), then calls
// visit(bucket_entries, count) for each bucket in parallel, entries sorted by (row, k). Buckets
// own disjoint row ranges, so visits never touch the same row.
template <typename acc_t, typename Visit>
void for_each_row_bucket(const Contributions<acc_t>& c, int64_t num_rows, const Visit& visit) {
  const int64_t K = c.size;
  if (K == 0) return;
  const int64_t* rows = c.row.get();
  const int64_t target = std::clamp<int64_t>(K / 256, 1, 4096);
  int shift = 0;
  while (((num_rows - 1) >> shift) + 1 > target) ++shift;
  const int64_t nb = ((num_rows - 1) >> shift) + 1;
  const int64_t chunk = std::max<int64_t>(int64_t(1) << 15, (K + 255) / 256);
  const int64_t nc = (K + chunk - 1) / chunk;
  std::vector<int64_t> counts(nc * nb, 0);  // [chunk][bucket]
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      int64_t* cnt = counts.data() + ch * nb;
      for (int64_t k = ch * chunk, e = std::min(K, (ch + 1) * chunk); k < e; ++k)
        if (rows[k] >= 0) ++cnt[rows[k] >> shift];
    }
  });
  // bucket-major, chunk-minor exclusive prefix sum -> stable positions
  std::vector<int64_t> bucket_start(nb + 1, 0);
  int64_t total = 0;
  for (int64_t bk = 0; bk < nb; ++bk) {
    bucket_start[bk] = total;
    for (int64_t ch = 0; ch < nc; ++ch) {
      const int64_t n = counts[ch * nb + bk];
      counts[ch * nb + bk] = total;
      total += n;
    }
  }
  bucket_start[nb] = total;
  Buffer<RowEntry<acc_t>> entries(new RowEntry<acc_t>[std::max<int64_t>(total, 1)]);
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      int64_t* cur = counts.data() + ch * nb;
      for (int64_t k = ch * chunk, e = std::min(K, (ch + 1) * chunk); k < e; ++k) {
        const int64_t r = rows[k];
        if (r >= 0) entries[cur[r >> shift]++] = RowEntry<acc_t>{r, k, c.src[k], c.scale[k]};
      }
    }
  });
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bk = b0; bk < b1; ++bk) {
      RowEntry<acc_t>* first = entries.get() + bucket_start[bk];
      const int64_t n = bucket_start[bk + 1] - bucket_start[bk];
      if (n == 0) continue;
      std::sort(first, first + n, [](const RowEntry<acc_t>& a, const RowEntry<acc_t>& b) {
        return a.row < b.row || (a.row == b.row && a.k < b.k);
      });
      visit(first, n);
    }
  });
}

// Calls on_row(row, acc) for every touched row with acc = that row's summed gradient (opmath, D).
// dst (the table the rows are written to) is prefetched a few entries ahead, like grad_out's rows.
template <typename scalar_t, typename OnRow>
void reduce_rows(const Contributions<at::opmath_type<scalar_t>>& c, const BagLayout& L, const scalar_t* g,
                 const scalar_t* dst, const OnRow& on_row) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = L.dim;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const bool elementwise = c.elementwise;
  for_each_row_bucket(c, L.num_rows, [&](const RowEntry<acc_t>* e, int64_t n) {
    constexpr int64_t kAhead = 8;
    std::vector<acc_t> acc(D);
    for (int64_t i = 0; i < std::min(n, kAhead); ++i) {
      prefetch(g + e[i].src, elementwise ? 1 : row_bytes);
      prefetch(dst + e[i].row * D, row_bytes);
    }
    int64_t i = 0;
    while (i < n) {
      const int64_t r = e[i].row;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (; i < n && e[i].row == r; ++i) {
        if (i + kAhead < n) {
          prefetch(g + e[i + kAhead].src, elementwise ? 1 : row_bytes);
          if (e[i + kAhead].row != e[i + kAhead - 1].row) prefetch(dst + e[i + kAhead].row * D, row_bytes);
        }
        const acc_t s = e[i].scale;
        const scalar_t* __restrict__ gs = g + e[i].src;
        if (elementwise) {
          acc[e[i].k % D] += s * static_cast<acc_t>(gs[0]);
        } else {
          acc_t* __restrict__ a = acc.data();
          for (int64_t d = 0; d < D; ++d) a[d] += s * static_cast<acc_t>(gs[d]);
        }
      }
      on_row(r, acc.data());
    }
  });
}

void embedding_bag_backward_kernel(const BagLayout& L, int64_t seed, const BagBackwardInputs& in,
                                   const at::Tensor& w, at::Tensor& grad_weight, at::Tensor& grad_psw) {
  check_offsets_cpu("multiplexed_embedding_bag_backward", in.offs, in.v.numel());
  if (L.batch == 0) return;
  const bool weight_grad = grad_weight.numel() > 0, psw_grad = grad_psw.numel() > 0;
  EMBEDOPS_DISPATCH_FLOATING(w.scalar_type(), "multiplexed_embedding_bag_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = in.g.const_data_ptr<scalar_t>();
    const int64_t* o = in.offs.const_data_ptr<int64_t>();
    const scalar_t* psw = in.has_psw ? in.psw.const_data_ptr<scalar_t>() : nullptr;
    const int64_t D = L.dim;
    EMBEDOPS_DISPATCH_INDEX(in.v.scalar_type(), "multiplexed_embedding_bag_backward_cpu", [&] {
      const index_t* vals = in.v.const_data_ptr<index_t>();
      if (weight_grad) {
        const Contributions<acc_t> c = build_contributions<scalar_t, index_t>(
            L, seed, vals, o, psw, L.mode == PoolMode::kMax ? in.argmax.const_data_ptr<int64_t>() : nullptr);
        scalar_t* gw = grad_weight.data_ptr<scalar_t>();
        reduce_rows<scalar_t>(c, L, g, gw, [&](int64_t r, const acc_t* acc) {
          scalar_t* __restrict__ dst = gw + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
        });
      }
      if (psw_grad && L.mode == PoolMode::kSum) {
        // d out / d psw[i] = sum_p combine_scale * <grad_out block, weight[row(i, p)]>
        const std::vector<uint64_t> salts = block_salts(L, seed);
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        scalar_t* gp = grad_psw.data_ptr<scalar_t>();
        const uint64_t R = static_cast<uint64_t>(L.num_rows);
        const int comb = static_cast<int>(L.combine);
        at::parallel_for(0, L.num_features * L.batch, 64, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t f = j / L.batch, b = j - f * L.batch, P = L.probes[f], q0 = L.pbase[f];
            const acc_t cs = combine_scale<acc_t>(comb, P);
            for (int64_t i = o[j]; i < o[j + 1]; ++i) {
              acc_t total = 0;
              for (int64_t p = 0; p < P; ++p) {
                const scalar_t* __restrict__ wr = wp + hash_row(static_cast<int64_t>(vals[i]), salts[q0 + p], R) * D;
                const scalar_t* __restrict__ gs = g + b * L.out_dim + out_column(comb, q0 + p, f, 0, D);
                acc_t dot = 0;
                for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(gs[d]) * static_cast<acc_t>(wr[d]);
                total += dot;
              }
              gp[i] = static_cast<scalar_t>(total * cs);
            }
          }
        });
      }
    });
  });
}

void embedding_bag_update_kernel(const BagLayout& L, int64_t seed, const BagBackwardInputs& in, at::Tensor& weight,
                                 at::Tensor& state, Optimizer opt, double lr, double eps) {
  check_offsets_cpu("multiplexed_embedding_bag_update", in.offs, in.v.numel());
  if (L.batch == 0) return;
  EMBEDOPS_DISPATCH_FLOATING(weight.scalar_type(), "multiplexed_embedding_bag_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = in.g.const_data_ptr<scalar_t>();
    const int64_t* o = in.offs.const_data_ptr<int64_t>();
    const scalar_t* psw = in.has_psw ? in.psw.const_data_ptr<scalar_t>() : nullptr;
    const int64_t D = L.dim;
    scalar_t* w = weight.data_ptr<scalar_t>();
    acc_t* st = opt == Optimizer::kRowwiseAdagrad ? state.data_ptr<acc_t>() : nullptr;
    const acc_t alr = static_cast<acc_t>(lr), aeps = static_cast<acc_t>(eps);
    EMBEDOPS_DISPATCH_INDEX(in.v.scalar_type(), "multiplexed_embedding_bag_update_cpu", [&] {
      const index_t* vals = in.v.const_data_ptr<index_t>();
      const Contributions<acc_t> c = build_contributions<scalar_t, index_t>(
          L, seed, vals, o, psw, L.mode == PoolMode::kMax ? in.argmax.const_data_ptr<int64_t>() : nullptr);
      reduce_rows<scalar_t>(c, L, g, w, [&](int64_t r, const acc_t* acc) {
        scalar_t* __restrict__ wr = w + r * D;
        acc_t mult = alr;
        if (st != nullptr) {
          acc_t sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += acc[d] * acc[d];
          mult = rowwise_adagrad_multiplier<acc_t>(st[r], sq / static_cast<acc_t>(D), alr, aeps);
        }
        for (int64_t d = 0; d < D; ++d) wr[d] = static_cast<scalar_t>(static_cast<acc_t>(wr[d]) - mult * acc[d]);
      });
    });
  });
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(embedding_bag_forward_stub, &embedding_bag_forward_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(embedding_bag_backward_stub, &embedding_bag_backward_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(embedding_bag_update_stub, &embedding_bag_update_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
