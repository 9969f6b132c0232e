// hamming_topk on the CPU (compiled once per CPU level): XOR + popcount over 64-bit words of the
// compared bit prefix, a bounded max-heap of the k nearest per query with an integer threshold
// (a row that is not strictly nearer than the current k-th is rejected by one compare: rows are
// scanned in increasing index, so an equal distance never displaces a kept, lower index).
//
// Work: blocks of kQB queries x chunks of corpus rows, so a chunk's codes are loaded once per
// query block, and B = 1 still splits the corpus over every core; each (block, chunk) task keeps
// its own heaps, merged per query at the end (exact: the merge orders by (distance, index)). The
// popcount is one POPCNT per word at the avx2/avx512 levels (x86-64-v3 has POPCNT), a bit trick
// at the default level.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

constexpr int kQB = 4;  // queries per block
constexpr int32_t kNoDist = std::numeric_limits<int32_t>::max();
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

inline uint64_t load_word(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

inline int popcount64(uint64_t w) { return __builtin_popcountll(w); }

// The compared prefix as words: nw words, the last one masked to the prefix's bytes and bits
// (bit i is bit 7 - i % 8 of byte i / 8: a partial last byte keeps its high bits) and read with
// last_bytes bytes (never past a row).
struct Prefix {
  int64_t nw = 0, last_bytes = 8;
  uint64_t last_mask = ~uint64_t(0);
};

Prefix make_prefix(const HammingShape& s) {
  Prefix p;
  const int64_t used = (s.nbits + 7) / 8;  // bytes holding the prefix
  p.nw = (used + 7) / 8;
  p.last_bytes = std::min<int64_t>(8, s.nbytes - 8 * (p.nw - 1));
  uint8_t m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t in_last = used - 8 * (p.nw - 1);
  for (int64_t j = 0; j < in_last; ++j) m[j] = 0xFF;
  if (s.nbits % 8 != 0) m[in_last - 1] = static_cast<uint8_t>(0xFF << (8 - s.nbits % 8));
  std::memcpy(&p.last_mask, m, 8);
  return p;
}

// A max-heap of the k nearest (distance, index) pairs, root = the farthest kept.
struct NearHeap {
  int32_t* d;
  int64_t* id;
  int64_t k;

  static bool farther(int32_t da, int64_t ia, int32_t db, int64_t ib) { return da > db || (da == db && ia > ib); }
  void push(int32_t dist, int64_t index) {  // caller checked it is nearer than the root
    int64_t i = 0;
    while (true) {
      const int64_t l = 2 * i + 1;
      if (l >= k) break;
      const int64_t r = l + 1;
      const int64_t w = (r < k && farther(d[r], id[r], d[l], id[l])) ? r : l;
      if (!farther(d[w], id[w], dist, index)) break;
      d[i] = d[w];
      id[i] = id[w];
      i = w;
    }
    d[i] = dist;
    id[i] = index;
  }
};

// Rows [r0, r1) against queries [q0, q0 + nq) (nq <= kQB): W > 0 words known at compile time
// (whole words, no mask), W == 0 the general prefix.
template <int W>
void scan(const uint8_t* corpus, int64_t row_bytes, const uint64_t* qwords, int nq, const Prefix& pre, int64_t r0,
          int64_t r1, NearHeap* heaps) {
  const int64_t nw = W > 0 ? W : pre.nw;
  int32_t worst[kQB];
  for (int j = 0; j < nq; ++j) worst[j] = heaps[j].d[0];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* x = corpus + r * row_bytes;
    int32_t dist[kQB] = {0, 0, 0, 0};
    if constexpr (W > 0) {
      uint64_t xw[W];
      for (int w = 0; w < W; ++w) xw[w] = load_word(x + 8 * w);
      for (int j = 0; j < nq; ++j) {
        const uint64_t* q = qwords + j * W;
        int32_t acc = 0;
        for (int w = 0; w < W; ++w) acc += popcount64(q[w] ^ xw[w]);
        dist[j] = acc;
      }
    } else {
      for (int64_t w = 0; w + 1 < nw; ++w) {
        const uint64_t xv = load_word(x + 8 * w);
        for (int j = 0; j < nq; ++j) dist[j] += popcount64(qwords[j * nw + w] ^ xv);
      }
      uint64_t xl = 0;
      std::memcpy(&xl, x + 8 * (nw - 1), static_cast<size_t>(pre.last_bytes));
      for (int j = 0; j < nq; ++j) dist[j] += popcount64((qwords[j * nw + nw - 1] ^ xl) & pre.last_mask);
    }
    for (int j = 0; j < nq; ++j) {
      if (dist[j] < worst[j]) {
        heaps[j].push(dist[j], r);
        worst[j] = heaps[j].d[0];
      }
    }
  }
}

void hamming_topk_kernel(const at::Tensor& queries, const at::Tensor& corpus, const HammingShape& s, int64_t k,
                         at::Tensor& distances, at::Tensor& indices) {
  const Prefix pre = make_prefix(s);
  const int64_t nw = pre.nw;
  const int W = (pre.last_mask == ~uint64_t(0) && 8 * nw <= s.nbytes && (nw == 4 || nw == 8 || nw == 16))
                    ? static_cast<int>(nw) : 0;
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
  // corpus chunks: enough tasks for every core (B = 1 too), >= 4096 rows each, partial heaps
  // bounded to ~256 MB
  int64_t chunks = std::max<int64_t>(1, (4 * threads + nqb - 1) / nqb);
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
      NearHeap heaps[kQB];
      for (int j = 0; j < nq; ++j) {
        const int64_t off = (c * s.B + q0 + j) * k;
        heaps[j] = NearHeap{pd.data() + off, pi.data() + off, k};
      }
      const uint64_t* qw = qwords.data() + q0 * nw;
      switch (W) {
        case 4: scan<4>(xp, s.nbytes, qw, nq, pre, r0, r1, heaps); break;
        case 8: scan<8>(xp, s.nbytes, qw, nq, pre, r0, r1, heaps); break;
        case 16: scan<16>(xp, s.nbytes, qw, nq, pre, r0, r1, heaps); break;
        default: scan<0>(xp, s.nbytes, qw, nq, pre, r0, r1, heaps); break;
      }
    }
  });
  // merge the chunks' heaps per query, nearest first, ties to the lower index
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
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end());
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
