// hamming_topk on the CPU (compiled once per CPU level): XOR + popcount over 64-bit words of the
// compared bit prefix, the k nearest per query kept behind an integer threshold (NearSet: a row
// that is not strictly nearer than the k-th kept is rejected by one compare: rows are scanned in
// increasing index, so an equal distance never displaces a kept, lower index).
//
// Work: blocks of kQB queries x chunks of corpus rows, so a chunk's codes are loaded once per
// query block, and B = 1 still splits the corpus over every core; each (block, chunk) task keeps
// its own sets, merged per query at the end (exact: the merge orders by (distance, index)). The
// popcount is one POPCNT per word at the avx2/avx512 levels (x86-64-v3 has POPCNT) and at the
// default level on a CPU with POPCNT (scan_popcnt), a bit trick on one without. At the avx512
// level on CPUs with VPOPCNTDQ (Ice Lake and later, Zen 4), 256/512/1024-bit codes take a vector
// path: 8 rows' 64-byte pieces are transposed in registers (8x8 64-bit words), so one VPOPCNTQ
// counts a word of 8 rows and the query words are broadcasts;
// the 8 distances are compared with the threshold in one mask compare. Codes of 32-byte rows (a
// 256-bit corpus, or the pieces of a blocked corpus (P, N, 32): matryoshka.h) take 16 rows per step,
// two rows per 64-byte load. At the avx2 level the same idea on 4 rows x 4 words: a word of 4 rows
// per ymm, popcount by the nibble table (VPSHUFB) into byte counts, summed per row by VPSADBW once
// per 4 rows and query. Word w of row r is read at x + r * row_stride + woff[w] (woff: the layout's
// byte offsets of the words, matryoshka.h), so rows and blocked pieces take the same paths.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

constexpr int kQB = 8;  // queries per block
constexpr int32_t kNoDist = std::numeric_limits<int32_t>::max();
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

inline uint64_t load_word(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// (always inlined: inside scan_popcnt below the builtin becomes one POPCNT)
[[gnu::always_inline]] inline int popcount64(uint64_t w) { return __builtin_popcountll(w); }

// The k nearest (distance, index) pairs of rows offered in increasing index, kept as a buffer
// with a threshold: a row is offered only when strictly nearer than the threshold (the k-th
// nearest at the last compaction; equal distances never displace a kept, lower index), appended
// in O(1), and when the buffer is full it is cut back to its k nearest (nth_element, ties to the
// lower index) and the threshold tightened. Cheaper than a heap for the large k of a funnel's
// shortlist (k = 200..1000: a push per admitted row instead of log2 k moves), the same result.
struct NearSet {
  int64_t k = 0, n = 0;
  int32_t thr = kNoDist;
  std::vector<std::pair<int32_t, int64_t>> buf;

  void init(int64_t k_) {
    k = k_;
    n = 0;
    thr = kNoDist;
    // a compaction (O(2k)) per k + 8 admitted rows: O(1) per row, and the threshold is never looser
    // than the 2k-th nearest so far (a much larger buffer admits many more rows at small k: the
    // threshold stays loose for longer, and every admitted row leaves the vector path)
    buf.resize(static_cast<size_t>(2 * k + 8));
  }
  // caller checked dist < thr; returns the (maybe tightened) threshold
  int32_t push(int32_t dist, int64_t index) {
    buf[n++] = {dist, index};
    if (n == static_cast<int64_t>(buf.size())) compact();
    return thr;
  }
  void compact() {
    if (n < k) return;
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + n);
    n = k;
    thr = buf[k - 1].first;
  }
  // the kept pairs into d / id (k slots, unset slots keep their sentinels), any order
  void write(int32_t* d, int64_t* id) {
    if (n > k) compact();
    for (int64_t j = 0; j < n; ++j) {
      d[j] = buf[j].first;
      id[j] = buf[j].second;
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512)
#define EMBEDOPS_VPOPCNT __attribute__((target("avx512vpopcntdq")))

// v[0..7]: 8 rows of 8 words; afterwards v[w] holds word w of the 8 rows (lane i = row i).
// always inlined: out of line, v[] would go through the stack (and GCC 12 warns falsely inside the intrinsics)
__attribute__((always_inline)) EMBEDOPS_VPOPCNT inline void transpose8x8(__m512i* v) {
  __m512i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi64(v[2 * i], v[2 * i + 1]);      // words 0 2 4 6 of rows 2i, 2i+1
    t[2 * i + 1] = _mm512_unpackhi_epi64(v[2 * i], v[2 * i + 1]);  // words 1 3 5 7
  }
  // u[0] (rows 0-3): words 0 4; u[1]: 2 6; u[2]: 1 5; u[3]: 3 7; u[4..7] the same for rows 4-7
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm512_shuffle_i64x2(t[4 * h + 0], t[4 * h + 2], 0x88);
    u[4 * h + 1] = _mm512_shuffle_i64x2(t[4 * h + 0], t[4 * h + 2], 0xDD);
    u[4 * h + 2] = _mm512_shuffle_i64x2(t[4 * h + 1], t[4 * h + 3], 0x88);
    u[4 * h + 3] = _mm512_shuffle_i64x2(t[4 * h + 1], t[4 * h + 3], 0xDD);
  }
  v[0] = _mm512_shuffle_i64x2(u[0], u[4], 0x88);
  v[4] = _mm512_shuffle_i64x2(u[0], u[4], 0xDD);
  v[2] = _mm512_shuffle_i64x2(u[1], u[5], 0x88);
  v[6] = _mm512_shuffle_i64x2(u[1], u[5], 0xDD);
  v[1] = _mm512_shuffle_i64x2(u[2], u[6], 0x88);
  v[5] = _mm512_shuffle_i64x2(u[2], u[6], 0xDD);
  v[3] = _mm512_shuffle_i64x2(u[3], u[7], 0x88);
  v[7] = _mm512_shuffle_i64x2(u[3], u[7], 0xDD);
}

// Offers the distances d[0..n) of rows row0 + i * step (increasing) to set h.
inline void offer(NearSet& h, int32_t& worst, const int64_t* d, int n, int64_t row0, int64_t step) {
  for (int i = 0; i < n; ++i) {
    const int32_t di = static_cast<int32_t>(d[i]);
    if (di < worst) worst = h.push(di, row0 + i * step);
  }
}

// kPairs = false: W = 8 or 16 words (512 / 1024 bits) in 64-byte pieces (rows, or blocked pieces of
// a multiple of 64 bytes), 8 rows per step. kPairs = true: 32-byte rows (row_stride 32; W = 2, 4, 8, 16
// in pieces of 32 bytes), 16 rows per step, two rows per 64-byte load (lanes: even rows in words
// 0-3, odd rows in words 4-7 of the transposed block). Returns the first row not scanned.
template <int W, int NQ, bool kPairs>
EMBEDOPS_VPOPCNT int64_t scan_vpopcnt(const uint8_t* corpus, int64_t row_stride, const int64_t* woff,
                                      const uint64_t* qwords, int64_t r0, int64_t r1, NearSet* heaps, int32_t* worst) {
  constexpr int nq = NQ;
  constexpr int kRowsPerStep = kPairs ? 16 : 8;
  constexpr int kPieces = kPairs ? (W + 3) / 4 : W / 8;
  constexpr int kPieceWords = W < 4 ? W : 4;  // words used of a 32-byte piece (pairs)
  int64_t r = r0;
  for (; r + kRowsPerStep <= r1; r += kRowsPerStep) {
    __m512i acc[NQ], acc_odd[NQ];
    for (int j = 0; j < nq; ++j) acc[j] = acc_odd[j] = _mm512_setzero_si512();
    for (int piece = 0; piece < kPieces; ++piece) {
      __m512i v[8];
      for (int i = 0; i < 8; ++i) {
        const uint8_t* p = kPairs ? corpus + woff[4 * piece] + (r + 2 * i) * 32
                                  : corpus + woff[8 * piece] + (r + i) * row_stride;
        v[i] = _mm512_loadu_si512(p);
      }
      transpose8x8(v);
      for (int j = 0; j < nq; ++j) {
        const uint64_t* q = qwords + j * W;
        if constexpr (kPairs) {
          for (int w = 0; w < kPieceWords; ++w) {
            const __m512i qb = _mm512_set1_epi64(static_cast<long long>(q[4 * piece + w]));
            acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_xor_si512(v[w], qb)));
            acc_odd[j] = _mm512_add_epi64(acc_odd[j], _mm512_popcnt_epi64(_mm512_xor_si512(v[w + 4], qb)));
          }
        } else {
          for (int w = 0; w < 8; ++w) {
            const __m512i qb = _mm512_set1_epi64(static_cast<long long>(q[8 * piece + w]));
            acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_xor_si512(v[w], qb)));
          }
        }
      }
    }
    for (int j = 0; j < nq; ++j) {
      const __m512i thr = _mm512_set1_epi64(worst[j]);
      __mmask8 m = _mm512_cmplt_epi64_mask(acc[j], thr);
      if constexpr (kPairs) m |= _mm512_cmplt_epi64_mask(acc_odd[j], thr);
      if (m == 0) continue;
      alignas(64) int64_t d[8];
      if constexpr (kPairs) {
        alignas(64) int64_t e[8];
        _mm512_store_si512(d, acc[j]);
        _mm512_store_si512(e, acc_odd[j]);
        for (int i = 0; i < 8; ++i) {  // rows r + 2i, r + 2i + 1 in order
          offer(heaps[j], worst[j], d + i, 1, r + 2 * i, 1);
          offer(heaps[j], worst[j], e + i, 1, r + 2 * i + 1, 1);
        }
      } else {
        _mm512_store_si512(d, acc[j]);
        offer(heaps[j], worst[j], d, 8, r, 1);
      }
    }
  }
  return r;
}

bool has_vpopcntdq() {
  static const bool yes = __builtin_cpu_supports("avx512vpopcntdq");
  return yes;
}
#endif  // CPU_CAPABILITY_AVX512

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// byte-wise popcount of v (each byte 0..8) by the nibble table
inline __m256i popcount_bytes(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

// offer4's rare case, out of line: the rows of d[j] (per-row distances of rows r .. r + 3) below
// query j's threshold into its set, in increasing index
__attribute__((noinline)) void offer4_slow(NearSet* heaps, int32_t* worst, const __m256i* d, int nq, int64_t r) {
  for (int j = 0; j < nq; ++j) {
    const __m256i lt = _mm256_cmpgt_epi64(_mm256_set1_epi64x(worst[j]), d[j]);
    int m = _mm256_movemask_pd(_mm256_castsi256_pd(lt));
    if (m == 0) continue;
    alignas(32) int64_t dd[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(dd), d[j]);
    for (; m != 0; m &= m - 1) {
      const int i = __builtin_ctz(static_cast<unsigned>(m));
      const int32_t di = static_cast<int32_t>(dd[i]);
      if (di < worst[j]) worst[j] = heaps[j].push(di, r + i);  // (worst may have tightened)
    }
  }
}

// The rows r .. r + 3 into the sets of NQ queries, from their byte counts acc[j] (8 bytes per row,
// each < 256). The common case (no row nearer than any query's threshold) is one VPSADBW, one
// compare and one OR per query and a single branch (it was a compare, a movemask and a branch per
// query, in a function GCC kept out of line: 256-bit codes, B = 64, 1M rows went from 56 to 43 ms).
template <int NQ>
__attribute__((always_inline)) inline void offer4(NearSet* heaps, int32_t* worst, const __m256i* acc, int64_t r) {
  __m256i d[NQ];
  __m256i any = _mm256_setzero_si256();
  for (int j = 0; j < NQ; ++j) {
    d[j] = _mm256_sad_epu8(acc[j], _mm256_setzero_si256());  // per-row distances
    any = _mm256_or_si256(any, _mm256_cmpgt_epi64(_mm256_set1_epi64x(worst[j]), d[j]));
  }
  if (_mm256_testz_si256(any, any)) return;
  offer4_slow(heaps, worst, d, NQ, r);
}

// W = 4, 8 or 16 words: 4 rows per step (row pieces of 32 bytes transposed 4x4 in registers).
// Byte counts of up to 16 words stay below 256. Returns the first row not scanned.
template <int W, int NQ>
int64_t scan_avx2(const uint8_t* corpus, int64_t row_stride, const int64_t* woff, const uint64_t* qwords, int64_t r0,
                  int64_t r1, NearSet* heaps, int32_t* worst) {
  constexpr int nq = NQ;
  static_assert(W % 4 == 0 && W <= 16, "byte counts must not overflow");
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    __m256i acc[NQ];
    for (int j = 0; j < nq; ++j) acc[j] = _mm256_setzero_si256();
    for (int piece = 0; piece < W / 4; ++piece) {
      __m256i v[4];
      for (int i = 0; i < 4; ++i)
        v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corpus + (r + i) * row_stride + woff[4 * piece]));
      const __m256i t0 = _mm256_unpacklo_epi64(v[0], v[1]), t1 = _mm256_unpackhi_epi64(v[0], v[1]);
      const __m256i t2 = _mm256_unpacklo_epi64(v[2], v[3]), t3 = _mm256_unpackhi_epi64(v[2], v[3]);
      __m256i T[4];  // T[w]: word 4 * piece + w of the 4 rows
      T[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
      T[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
      T[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
      T[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
      for (int j = 0; j < nq; ++j) {
        const uint64_t* q = qwords + j * W + 4 * piece;
        for (int w = 0; w < 4; ++w) {
          const __m256i x = _mm256_xor_si256(T[w], _mm256_set1_epi64x(static_cast<long long>(q[w])));
          acc[j] = _mm256_add_epi8(acc[j], popcount_bytes(x));
        }
      }
    }
    offer4<NQ>(heaps, worst, acc, r);
  }
  return r;
}

// W = 2 (128-bit prefixes), 4 rows per step: a row's two words are one 16-byte load, rows r and
// r + 2 in one ymm, r + 1 and r + 3 in another, and one unpack pair transposes them into word 0 and
// word 1 of the 4 rows (lanes in row order). Per query: two XORs, two nibble-table popcounts, one
// VPSADBW. (The scalar loop it replaces spent ~13 instructions per row and query, with the 8
// queries' distances through the stack.) Returns the first row not scanned.
template <int NQ>
int64_t scan_avx2_w2(const uint8_t* corpus, int64_t row_stride, const int64_t* woff, const uint64_t* qwords,
                     int64_t r0, int64_t r1, NearSet* heaps, int32_t* worst) {
  constexpr int nq = NQ;
  const uint8_t* base = corpus + woff[0];
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const uint8_t* p = base + r * row_stride;
    const __m256i a = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 2 * row_stride),
                                          reinterpret_cast<const __m128i*>(p));  // rows r | r + 2
    const __m256i b = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 3 * row_stride),
                                          reinterpret_cast<const __m128i*>(p + row_stride));  // r + 1 | r + 3
    const __m256i t0 = _mm256_unpacklo_epi64(a, b), t1 = _mm256_unpackhi_epi64(a, b);
    __m256i acc[NQ];
    for (int j = 0; j < nq; ++j) {
      const uint64_t* q = qwords + 2 * j;
      const __m256i c0 = popcount_bytes(_mm256_xor_si256(t0, _mm256_set1_epi64x(static_cast<long long>(q[0]))));
      const __m256i c1 = popcount_bytes(_mm256_xor_si256(t1, _mm256_set1_epi64x(static_cast<long long>(q[1]))));
      acc[j] = _mm256_add_epi8(c0, c1);
    }
    offer4<NQ>(heaps, worst, acc, r);
  }
  return r;
}
#endif  // CPU_CAPABILITY_AVX2 || CPU_CAPABILITY_AVX512

// Rows [r0, r1) against NQ queries (1 or kQB): W > 0 words known at compile time
// (whole words, no mask), W == 0 the general prefix. woff: the byte offsets of the prefix's words
// in a row (HammingShape::byte_offset).
template <int W, int NQ>
[[gnu::always_inline]] inline void scan_rows(const uint8_t* corpus, const HammingShape& s, const int64_t* woff,
                                             const uint64_t* qwords, const HammingWords& pre, int64_t r0, int64_t r1,
                                             NearSet* heaps) {
  constexpr int nq = NQ;
  const int64_t nw = W > 0 ? W : pre.nw;
  const int64_t rs = s.row_stride;
  int32_t worst[NQ];
  for (int j = 0; j < nq; ++j) worst[j] = heaps[j].thr;
  // a vector load (16, 32 or 64 bytes) must lie inside one piece of the layout
  [[maybe_unused]] const bool rows = s.piece_stride == 0 || s.piece_bytes == s.nbytes;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (W > 0) {
    const int64_t start = r0;
#if defined(CPU_CAPABILITY_AVX512)
    // a block of queries on a CPU with VPOPCNTDQ: VPOPCNTQ over transposed 8-row blocks. One query
    // takes the ymm paths below (the 8x8 transpose is not amortised over one query: measured
    // 0.48-0.55 ms against 0.65-1.12 ms for 1M 256-bit rows on a Zen 4, 2 threads), and so does an
    // AVX-512 CPU without VPOPCNTDQ (Skylake-X, Cascade Lake).
    if constexpr (NQ > 1) {
      if (has_vpopcntdq()) {
        if (rs == 32 && (rows || s.piece_bytes % 32 == 0)) {
          r0 = scan_vpopcnt<W, NQ, true>(corpus, rs, woff, qwords, r0, r1, heaps, worst);
        } else if constexpr (W % 8 == 0) {
          if (rows || s.piece_bytes % 64 == 0) r0 = scan_vpopcnt<W, NQ, false>(corpus, rs, woff, qwords, r0, r1, heaps, worst);
        }
      }
    }
#endif
    if (r0 == start) {
      if constexpr (W == 2) {
        if (rows || s.piece_bytes >= 16) r0 = scan_avx2_w2<NQ>(corpus, rs, woff, qwords, r0, r1, heaps, worst);
      } else if constexpr (W % 4 == 0) {
        if (rows || s.piece_bytes % 32 == 0) r0 = scan_avx2<W, NQ>(corpus, rs, woff, qwords, r0, r1, heaps, worst);
      }
    }
  }
#endif
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* x = corpus + r * rs;
    int32_t dist[NQ] = {};
    if constexpr (W > 0) {
      uint64_t xw[W];
      for (int w = 0; w < W; ++w) xw[w] = load_word(x + woff[w]);
      for (int j = 0; j < nq; ++j) {
        const uint64_t* q = qwords + j * W;
        int32_t acc = 0;
        for (int w = 0; w < W; ++w) acc += popcount64(q[w] ^ xw[w]);
        dist[j] = acc;
      }
    } else {
      for (int64_t w = 0; w + 1 < nw; ++w) {
        const uint64_t xv = load_word(x + woff[w]);
        for (int j = 0; j < nq; ++j) dist[j] += popcount64(qwords[j * nw + w] ^ xv);
      }
      uint64_t xl = 0;
      std::memcpy(&xl, x + woff[nw - 1], static_cast<size_t>(pre.last_bytes));
      for (int j = 0; j < nq; ++j) dist[j] += popcount64((qwords[j * nw + nw - 1] ^ xl) & pre.last_mask);
    }
    for (int j = 0; j < nq; ++j) {
      if (dist[j] < worst[j]) {
        worst[j] = heaps[j].push(dist[j], r);
      }
    }
  }
}

template <int W, int NQ>
void scan(const uint8_t* corpus, const HammingShape& s, const int64_t* woff, const uint64_t* qwords,
          const HammingWords& pre, int64_t r0, int64_t r1, NearSet* heaps) {
  scan_rows<W, NQ>(corpus, s, woff, qwords, pre, r0, r1, heaps);
}

#if defined(CPU_CAPABILITY_DEFAULT) && defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
// The default level's scan once more for POPCNT, taken when the CPU has it. x86-64's baseline lacks
// the instruction, so there __builtin_popcountll is a bit trick of ~12 instructions per word; every
// x86-64 CPU since Nehalem / Barcelona (x86-64-v2) has POPCNT. Forced to the default level on a
// Zen 3 (N 200k, B 1 and 64, 256-1024 bits, 2 threads), hamming_topk was 0.10-0.70x faiss's
// IndexBinaryFlat at its generic level without it, 0.70-1.68x with it.
template <int W, int NQ>
__attribute__((target("popcnt"))) void scan_popcnt(const uint8_t* corpus, const HammingShape& s, const int64_t* woff,
                                                   const uint64_t* qwords, const HammingWords& pre, int64_t r0,
                                                   int64_t r1, NearSet* heaps) {
  scan_rows<W, NQ>(corpus, s, woff, qwords, pre, r0, r1, heaps);
}
bool cpu_has_popcnt() {
  static const bool yes = __builtin_cpu_supports("popcnt");
  return yes;
}
#endif

// the scan this CPU runs at this level
template <int W, int NQ>
auto scan_for() {
#if defined(CPU_CAPABILITY_DEFAULT) && defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
  if (cpu_has_popcnt()) return &scan_popcnt<W, NQ>;
#endif
  return &scan<W, NQ>;
}

void hamming_topk_kernel(const at::Tensor& queries, const at::Tensor& corpus, const HammingShape& s, int64_t k,
                         at::Tensor& distances, at::Tensor& indices) {
  const HammingWords pre = hamming_words(s);
  const int64_t nw = pre.nw;
  const int W = (pre.last_mask == ~uint64_t(0) && 8 * nw <= s.nbytes && (nw == 2 || nw == 4 || nw == 8 || nw == 16))
                    ? static_cast<int>(nw) : 0;
  std::vector<int64_t> woff(static_cast<size_t>(nw));
  for (int64_t w = 0; w < nw; ++w) woff[w] = s.byte_offset(8 * w);
  // the queries' prefix words (the last one masked)
  std::vector<uint64_t> qwords(static_cast<size_t>(s.B * nw));
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(queries.const_data_ptr());
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t w = 0; w + 1 < nw; ++w) qwords[b * nw + w] = load_word(qp + b * s.nbytes + 8 * w);
    uint64_t last = 0;
    std::memcpy(&last, qp + b * s.nbytes + 8 * (nw - 1), static_cast<size_t>(pre.last_bytes));
    qwords[b * nw + nw - 1] = last & pre.last_mask;
  }
  const int64_t nqb = (s.B + kQB - 1) / kQB;
  const int64_t threads = at::get_num_threads();
  // corpus chunks: tasks (query block, chunk) in a multiple of the thread count, so that every core
  // (B = 1 too) gets the same number of rows (at::parallel_for splits the task range statically);
  // no more chunks than that: each chunk fills its own sets, and a set costs ~k log(rows / k) offers
  // (at k = 400, 4 chunks per thread took 1.3x the time of one). >= 4096 rows each, partial sets
  // bounded to ~256 MB.
  int64_t chunks = threads / std::gcd(nqb, threads);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, s.N / 4096));
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t{256} << 20) / (12 * s.B * k)));
  const int64_t chunk_rows = (s.N + chunks - 1) / chunks;
  std::vector<int32_t> pd(static_cast<size_t>(chunks * s.B * k), kNoDist);
  std::vector<int64_t> pi(static_cast<size_t>(chunks * s.B * k), kNoIndex);
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(corpus.const_data_ptr());
  at::parallel_for(0, nqb * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t / chunks, c = t % chunks;
      const int64_t q0 = qb * kQB;
      const int nq = static_cast<int>(std::min<int64_t>(kQB, s.B - q0));
      const int64_t r0 = c * chunk_rows, r1 = std::min(s.N, r0 + chunk_rows);
      if (r0 >= r1) continue;
      NearSet sets[kQB];
      for (int j = 0; j < nq; ++j) sets[j].init(k);
      const uint64_t* qw = qwords.data() + q0 * nw;
      // a full block of queries shares each row's loads; the last, partial block goes query by query
      auto run = [&](auto w_tag) {
        constexpr int kW = decltype(w_tag)::value;
        if (nq == kQB) {
          scan_for<kW, kQB>()(xp, s, woff.data(), qw, pre, r0, r1, sets);
        } else {
          const auto one = scan_for<kW, 1>();
          for (int j = 0; j < nq; ++j) one(xp, s, woff.data(), qw + j * nw, pre, r0, r1, sets + j);
        }
      };
      switch (W) {
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 8: run(std::integral_constant<int, 8>{}); break;
        case 16: run(std::integral_constant<int, 16>{}); break;
        default: run(std::integral_constant<int, 0>{}); break;
      }
      for (int j = 0; j < nq; ++j) {
        const int64_t off = (c * s.B + q0 + j) * k;
        sets[j].write(pd.data() + off, pi.data() + off);
      }
    }
  });
  // merge the chunks' sets per query, nearest first, ties to the lower index
  int32_t* od = distances.data_ptr<int32_t>();
  int64_t* oi = indices.data_ptr<int64_t>();
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int32_t, int64_t>> cand;
    for (int64_t b = begin; b < end; ++b) {
      cand.clear();
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t off = (c * s.B + b) * k;
        for (int64_t j = 0; j < k; ++j)
          if (pi[off + j] != kNoIndex) cand.emplace_back(pd[off + j], pi[off + j]);
      }
      // the k nearest, sorted (nth_element + sort: a heap-based partial_sort is 2-3x slower at k ~ size)
      if (static_cast<int64_t>(cand.size()) > k) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end());
      std::sort(cand.begin(), cand.begin() + k);
      for (int64_t j = 0; j < k; ++j) {
        od[b * k + j] = cand[j].first;
        oi[b * k + j] = cand[j].second;
      }
    }
  });
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(hamming_topk_stub, &hamming_topk_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops
