// multiplexed_embedding_bag over a uint8 row-quantised table (embedding/quantized.h: rows of D
// codes, float32 scale, float32 bias) on the CPU: forward only, float32 out.
//
// The traversal is the float fixed-D kernel's (embedding_bag_kernel.cpp): parallel over bags
// (f, b); a thread hashes a block of bags' (id, probe) rows into a local buffer
// (hash_rows_block), then gathers, prefetching the row kGatherAhead rows further on, so a steady
// number of table reads is in flight across bag boundaries. Each fused row (D + 8 bytes) is read
// once: its scale and bias, with the id's weight folded in (quantized.h: int8_row_terms), then the
// codes, a register of kFloats at a time, widened to int32 and converted to float32 (vpmovzxbd +
// vcvtdq2ps on AVX2 and AVX-512) and accumulated as (acc + w * bias) + (w * scale) * code
// (int8_accumulate: one add and one FMA per register).
// D = 16, 32, 64, 128 with sum/mean: the accumulators in registers (compile-time D). Any other D,
// and max pooling: the same walk with loops over D the compiler vectorises.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/vec.h"
#include "embedding/cpu/embedding_bag_cpu.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
#include "embedding/hashing.h"
#include "embedding/quantized.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
// and no memset idiom: the per-bag zeroing of a 64-float accumulator became a `rep stos` of 256
// bytes (~8 % of the avx2 forward in a profile) instead of a few vector stores
#pragma GCC optimize("no-loop-unroll-and-jam", "no-tree-loop-distribute-patterns")
#endif

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

constexpr const char* kOp = "multiplexed_embedding_bag";

// every cache line of the first `bytes` of a row and the line of its last byte (scale, bias)
inline void prefetch_fused_row(const uint8_t* p, int64_t bytes, int64_t stride) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
  __builtin_prefetch(p + stride - 1, 0, 3);
}

// The accumulator of one (bag, probe): D floats, 0 for sum/mean, -inf for max (an empty bag
// pools to 0: see finish).
template <bool kMax>
inline void init_acc(float* acc, int64_t D) {
  std::fill(acc, acc + D, kMax ? -std::numeric_limits<float>::infinity() : 0.0f);
}

// acc += the n rows r[0], r[P], r[2P], ... (weights sw[t] with kPsw); pf() issues the next prefetch.
template <bool kMax, bool kPsw, int kD, typename Prefetch>
inline void gather(float* __restrict__ acc, const uint8_t* __restrict__ w, int64_t D, int64_t stride,
                   const int64_t* __restrict__ r, int64_t n, int64_t P, const float* __restrict__ sw,
                   const Prefetch& pf) {
  if constexpr (kD > 0 && !kMax) {
    constexpr int kV = kD / vec::kFloats;
    constexpr int64_t kStride = kD + kInt8RowExtraBytes;
    vec::vfloat c[kV];
#pragma GCC unroll 16
    for (int v = 0; v < kV; ++v) c[v] = vec::loadu(acc + v * vec::kFloats);
    for (int64_t t = 0; t < n; ++t) {
      pf();
      const uint8_t* __restrict__ row = w + r[t * P] * kStride;
      const Int8RowTerms tm = int8_row_terms(row, kD, kPsw ? sw[t] : 1.0f);
#pragma GCC unroll 16
      for (int v = 0; v < kV; ++v) c[v] = int8_accumulate(c[v], tm, vec::load_codes(row + v * vec::kFloats));
    }
#pragma GCC unroll 16
    for (int v = 0; v < kV; ++v) vec::storeu(acc + v * vec::kFloats, c[v]);
  } else {
    for (int64_t t = 0; t < n; ++t) {
      pf();
      const uint8_t* __restrict__ row = w + r[t * P] * stride;
      const Int8RowTerms tm = int8_row_terms(row, D, kPsw ? sw[t] : 1.0f);
      if constexpr (kMax) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float x = int8_value(tm, row[d]);
          acc[d] = x > acc[d] ? x : acc[d];
        }
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] = int8_accumulate(acc[d], tm, static_cast<float>(row[d]));
      }
    }
  }
}

// dst[d] = pooled(d) * scale for a bag of len ids
template <bool kMax>
inline void finish(const float* __restrict__ acc, int64_t D, int64_t len, float scale, float* __restrict__ dst) {
  if (kMax && len == 0) {
    std::fill(dst, dst + D, 0.0f);
    return;
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = acc[d] * scale;
}

// kMax: max pooling (else sum or mean, L.mode); the ids hashed by hash_block (embedding_bag_cpu.h)
template <bool kMax, bool kPsw, int kD>
void forward_int8(const BagLayout& L, const uint64_t* salts, const uint8_t* __restrict__ w, const void* vals,
                  HashBlockFn hash_block, const int64_t* __restrict__ offs, const float* __restrict__ psw,
                  float* __restrict__ out) {
  const int64_t D = kD > 0 ? kD : L.dim;
  const int64_t stride = D + kInt8RowExtraBytes;
  const int64_t B = L.batch;
  const uint64_t R = static_cast<uint64_t>(L.num_rows);
  const int comb = static_cast<int>(L.combine), mode = static_cast<int>(L.mode);
  const int64_t out_row_bytes = D * static_cast<int64_t>(sizeof(float));
  const bool stream = kD > 0 && stream_output(out, B * L.out_dim, out_row_bytes);
  const int64_t prefetch_bytes = std::min<int64_t>(stride, kPrefetchRowBytes);
  const int64_t grain = std::max<int64_t>(1, 4096 / D);
  at::parallel_for(0, L.num_features * B, grain, [&](int64_t j0, int64_t j1) {
    const int64_t cap = std::max<int64_t>(kHashBlockRows, L.max_probes);
    std::unique_ptr<int64_t[]> rows(new int64_t[cap]);
    const int64_t acc_len = D;
    std::vector<float> accs(L.max_probes * acc_len);  // one accumulator per probe of the bag
    std::vector<float> pooled(D), total(D);
    int64_t pf = 0, n_rows = 0;  // the gather's prefetch cursor over rows[0, n_rows)
    const auto prefetch_next = [&] {
      if (pf < n_rows) prefetch_fused_row(w + rows[pf++] * stride, prefetch_bytes, stride);
    };
    const auto start_block = [&](int64_t n) {
      n_rows = n;
      for (pf = 0; pf < std::min(n, kGatherAhead); ++pf)
        prefetch_fused_row(w + rows[pf] * stride, prefetch_bytes, stride);
    };
    const auto store = [&](float* __restrict__ dst, const float* __restrict__ src, float scale) {
      if (stream) {  // dst is 64-byte aligned: out is, and D * 4 is a multiple of 64 (kD > 0)
        alignas(64) float tmp[kD > 0 ? kD : 1];
        for (int64_t d = 0; d < D; ++d) tmp[d] = src[d] * scale;
        vec::stream_copy(dst, tmp, out_row_bytes);
        return;
      }
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
    };
    // bag j (feature f, P probes, len ids) from its probes' accumulators -> out
    const auto emit = [&](int64_t j, int64_t f, int64_t P, int64_t len) {
      const int64_t b = j - f * B, q0 = L.pbase[f];
      const float ps = pool_scale<float>(mode, len);
      float* o = out + b * L.out_dim;
      if (comb == static_cast<int>(Combine::kConcat)) {
        for (int64_t p = 0; p < P; ++p) {
          finish<kMax>(accs.data() + p * acc_len, D, len, ps, pooled.data());
          store(o + (q0 + p) * D, pooled.data(), 1.0f);
        }
      } else {
        std::fill(total.begin(), total.end(), 0.0f);
        for (int64_t p = 0; p < P; ++p) {
          finish<kMax>(accs.data() + p * acc_len, D, len, ps, pooled.data());
          for (int64_t d = 0; d < D; ++d) total[d] += pooled[d];
        }
        store(o + f * D, total.data(), combine_scale<float>(comb, P));
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
      // in chunks of cap_ids
      const auto [je, long_bag] = next_bag_block(offs, j, fend, cap_ids);
      if (long_bag) {
        const int64_t len = offs[j + 1] - start;
        for (int64_t p = 0; p < P; ++p) init_acc<kMax>(accs.data() + p * acc_len, D);
        for (int64_t c0 = 0; c0 < len; c0 += cap_ids) {
          const int64_t n = std::min(cap_ids, len - c0);
          hash_block(vals, start + c0, n, s, P, R, rows.get());
          start_block(n * P);
          for (int64_t p = 0; p < P; ++p)
            gather<kMax, kPsw, kD>(accs.data() + p * acc_len, w, D, stride, rows.get() + p, n, P,
                                   kPsw ? psw + start + c0 : nullptr, prefetch_next);
        }
        emit(j, f, P, len);
        ++j;
        continue;
      }
      const int64_t n_ids = offs[je] - start;
      hash_block(vals, start, n_ids, s, P, R, rows.get());
      start_block(n_ids * P);
      for (; j < je; ++j) {
        const int64_t bs = offs[j], len = offs[j + 1] - bs;
        const int64_t* r = rows.get() + (bs - start) * P;
        for (int64_t p = 0; p < P; ++p) {
          float* acc = accs.data() + p * acc_len;
          init_acc<kMax>(acc, D);
          gather<kMax, kPsw, kD>(acc, w, D, stride, r + p, len, P, kPsw ? psw + bs : nullptr, prefetch_next);
        }
        emit(j, f, P, len);
      }
    }
    if (stream) vec::stream_fence();
  });
}

template <bool kMax, bool kPsw>
void forward_int8_dispatch_d(const BagLayout& L, const uint64_t* salts, const uint8_t* w, const void* vals,
                             HashBlockFn h, const int64_t* offs, const float* psw, float* out) {
  if constexpr (!kMax) {
    switch (L.dim) {
      case 16: return forward_int8<kMax, kPsw, 16>(L, salts, w, vals, h, offs, psw, out);
      case 32: return forward_int8<kMax, kPsw, 32>(L, salts, w, vals, h, offs, psw, out);
      case 64: return forward_int8<kMax, kPsw, 64>(L, salts, w, vals, h, offs, psw, out);
      case 128: return forward_int8<kMax, kPsw, 128>(L, salts, w, vals, h, offs, psw, out);
      default: break;
    }
  }
  forward_int8<kMax, kPsw, 0>(L, salts, w, vals, h, offs, psw, out);
}

void embedding_bag_forward_int8_kernel(const BagLayout& L, int64_t seed, const at::Tensor& w, const at::Tensor& v,
                                       const at::Tensor& offs, const at::Tensor& psw, bool validate, at::Tensor& out,
                                       at::Tensor& argmax) {
  (void)validate;  // the CPU checks are O(F*B) and always run
  (void)argmax;    // quantised tables have no backward: no argmax
  check_offsets_cpu(kOp, offs, v.numel());
  if (L.batch == 0) return;
  const bool has_psw = psw.defined();
  const std::vector<uint64_t> salts = block_salts(L, seed);
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const float* pp = has_psw ? psw.const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t* o = offs.const_data_ptr<int64_t>();
  HashBlockFn h = nullptr;
  EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "multiplexed_embedding_bag_int8_cpu",
                          [&] { h = &hash_rows_block_at<index_t>; });
  const void* vp = v.const_data_ptr();
  switch (L.mode) {
    case PoolMode::kSum:
      EMBEDOPS_BOOL_SWITCH(has_psw, kPsw,
                           [&] { forward_int8_dispatch_d<false, kPsw>(L, salts.data(), wp, vp, h, o, pp, op); });
      break;
    case PoolMode::kMean:
      forward_int8_dispatch_d<false, false>(L, salts.data(), wp, vp, h, o, pp, op);
      break;
    case PoolMode::kMax:
      forward_int8_dispatch_d<true, false>(L, salts.data(), wp, vp, h, o, pp, op);
      break;
  }
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(embedding_bag_forward_int8_stub, &embedding_bag_forward_int8_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
