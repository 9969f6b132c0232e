#pragma once
// Pieces of the embedding family's CPU kernels shared by its kernel files (embedding_bag_kernel.cpp,
// embedding_bag_int8_kernel.cpp): the salts of the probe blocks, the block hashing and the
// prefetch / streaming-store helpers of the gather. Compiled once per CPU level like its includers:
// everything lives in the level's namespace, internal to each file (never one symbol across levels).

#ifndef CPU_CAPABILITY
#error "embedding/cpu/embedding_bag_cpu.h is for the kernel files compiled once per CPU level"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/vec.h"
#include "embedding/embedding.h"
#include "embedding/hashing.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

// (as in the kernel files: GCC's unroll-and-jam would fuse the probe loops of hash_rows_block)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-loop-unroll-and-jam")
#endif

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

using vec::prefetch;

inline std::vector<uint64_t> block_salts(const BagLayout& L, int64_t seed) {
  std::vector<uint64_t> salts(L.num_blocks);
  for (int64_t f = 0; f < L.num_features; ++f)
    for (int64_t p = 0; p < L.probes[f]; ++p)
      salts[L.pbase[f] + p] = hash_salt(seed, static_cast<uint32_t>(f), static_cast<uint32_t>(p));
  return salts;
}

// The next block of bags of one feature, from bag j (bags before fend): [j, end) whose ids fit in
// cap_ids together, or the single bag j when it alone is longer (long_bag: reduced in chunks of
// cap_ids). offs: the bag offsets.
struct BagBlock {
  int64_t end;
  bool long_bag;
};
template <typename index_t>
inline BagBlock next_bag_block(const index_t* offs, int64_t j, int64_t fend, int64_t cap_ids) {
  const int64_t start = offs[j];
  if (offs[j + 1] - start > cap_ids) return {j + 1, true};
  return {std::upper_bound(offs + j + 1, offs + fend + 1, start + cap_ids) - offs - 1, false};
}

constexpr int64_t kHashBlockRows = 2048;
constexpr int64_t kGatherAhead = 64;       // rows
constexpr int64_t kPrefetchRowBytes = 256;  // of each row (longer rows: the rest on demand)
// Outputs at least this big may be written with streaming (non-temporal) stores.
constexpr int64_t kStreamOutBytes = int64_t(16) << 20;

// Whether to write the output with streaming stores. Each bag writes one strided D-wide piece of
// a (B, out_dim) row, so write-allocate stores first read every line they are about to overwrite
// (and a big output cannot stay cached anyway): streaming stores measured ~20 % faster on a
// 26 MB output. But on pages the allocator has just mapped (glibc serves allocations above its
// mmap threshold, 32 MB at most, from fresh mappings that the kernel zeroes on first touch)
// they measured ~10 % slower, so they are used only when the output's first and last pages are
// already resident (memory the allocator reuses).
template <typename scalar_t>
bool stream_output(const scalar_t* out, int64_t numel, int64_t row_bytes) {
  const int64_t bytes = numel * static_cast<int64_t>(sizeof(scalar_t));
  if (row_bytes % 64 != 0 || reinterpret_cast<uintptr_t>(out) % 64 != 0 || bytes < kStreamOutBytes) return false;
#if defined(__linux__)
  const long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return false;
  for (const char* at : {reinterpret_cast<const char*>(out), reinterpret_cast<const char*>(out) + bytes - 1}) {
    unsigned char resident = 0;
    void* p = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(at) & ~static_cast<uintptr_t>(page - 1));
    if (mincore(p, 1, &resident) != 0 || (resident & 1) == 0) return false;
  }
  return true;
#else
  return false;
#endif
}

// hashing.h's hash_row() for num_rows < 2^32 on vectors of 64-bit lanes:
// floor(h * R / 2^64) = ((h >> 32) * R + ((h mod 2^32) * R >> 32)) >> 32 exactly, and no term
// overflows (the sum is at most 2^64 - 1); both products are of two 32-bit values, one PMULUDQ each
// (AVX2 has no 64 x 64-bit vector multiply). Written out on vector types: GCC's vectorisation of
// the scalar form multiplied the two halves as full 64 x 64-bit products (3 PMULUDQ each) and
// stored the rows lane by lane (a runtime stride P) even for P = 1. Same bits as hash_row().
typedef uint64_t vu64 __attribute__((vector_size(vec::kBytes)));
constexpr int kLanes64 = vec::kBytes / 8;

// the products of the low 32 bits of each lane of a and b, as 64-bit lanes (PMULUDQ)
inline vu64 mul_lo32(vu64 a, vu64 b) {
#if defined(EMBEDOPS_VEC_AVX512)
  __m512i x, y;
  std::memcpy(&x, &a, sizeof(x));
  std::memcpy(&y, &b, sizeof(y));
  const __m512i r = _mm512_mul_epu32(x, y);
#elif defined(EMBEDOPS_VEC_AVX2)
  __m256i x, y;
  std::memcpy(&x, &a, sizeof(x));
  std::memcpy(&y, &b, sizeof(y));
  const __m256i r = _mm256_mul_epu32(x, y);
#elif defined(EMBEDOPS_VEC_SSE2)
  __m128i x, y;
  std::memcpy(&x, &a, sizeof(x));
  std::memcpy(&y, &b, sizeof(y));
  const __m128i r = _mm_mul_epu32(x, y);
#else
  const vu64 r = (a & 0xffffffffULL) * (b & 0xffffffffULL);
#endif
  vu64 out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

// kLanes64 ids from p, sign-extended to 64 bits (hashing.h reads an int32 id as its int64 value)
template <typename index_t>
inline vu64 load_ids(const index_t* p) {
  if constexpr (sizeof(index_t) == 8) {
    vu64 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    typedef int32_t vhalf __attribute__((vector_size(vec::kBytes / 2)));
    typedef int64_t vi64 __attribute__((vector_size(vec::kBytes)));
    vhalf h;
    std::memcpy(&h, p, sizeof(h));
    return reinterpret_cast<vu64>(__builtin_convertvector(h, vi64));
  }
}

// the rows of kLanes64 ids: mix64 (hashing.h), then the two 32 x 32-bit products
inline vu64 hash_rows_narrow(vu64 v, uint64_t salt, vu64 r32) {
  const vu64 z = mix64_lanes(v ^ salt);
  return (mul_lo32(z >> 32, r32) + (mul_lo32(z, r32) >> 32)) >> 32;
}

template <typename index_t>
void hash_rows_block(const index_t* __restrict__ vals, int64_t n, const uint64_t* salts, int64_t P,
                     uint64_t num_rows, int64_t* __restrict__ rows) {
  if (num_rows < (uint64_t(1) << 32)) {
    const uint32_t r32 = static_cast<uint32_t>(num_rows);
    vu64 rv;
    for (int i = 0; i < kLanes64; ++i) rv[i] = r32;
    for (int64_t p = 0; p < P; ++p) {
      const uint64_t s = salts[p];
      int64_t t = 0;
      for (; t + kLanes64 <= n; t += kLanes64) {
        const vu64 r = hash_rows_narrow(load_ids(vals + t), s, rv);
        if (P == 1) {
          std::memcpy(rows + t, &r, sizeof(r));
        } else {
          for (int i = 0; i < kLanes64; ++i) rows[(t + i) * P + p] = static_cast<int64_t>(r[i]);
        }
      }
      for (; t < n; ++t) rows[t * P + p] = hash_row(static_cast<int64_t>(vals[t]), s, num_rows);
    }
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t p = 0; p < P; ++p) rows[t * P + p] = hash_row(static_cast<int64_t>(vals[t]), salts[p], num_rows);
  }
}

// hash_rows_block for ids [first, first + n) of an id array of either index type. The fixed-D
// kernels (float and int8 tables) take it as a pointer, called once per block of ids, so that
// their instances do not multiply by the index type (that, with sum / mean as two instances,
// tripled their object code).
using HashBlockFn = void (*)(const void* vals, int64_t first, int64_t n, const uint64_t* salts, int64_t P,
                             uint64_t num_rows, int64_t* rows);

template <typename index_t>
void hash_rows_block_at(const void* vals, int64_t first, int64_t n, const uint64_t* salts, int64_t P,
                        uint64_t num_rows, int64_t* rows) {
  hash_rows_block(static_cast<const index_t*>(vals) + first, n, salts, P, num_rows, rows);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace embedops

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
