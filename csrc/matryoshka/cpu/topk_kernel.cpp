// matryoshka_topk and matryoshka_funnel, CPU kernels (compiled once per CPU level; the host side
// is ../topk.cpp).
//
// topk streams the corpus in row tiles, parallel over tiles (one contiguous run of tiles per
// thread). Per tile the raw dot products are accumulated segment by segment (prefix d_{p-1}..d_p):
//   - B <= 4 (GEMV-shaped): one fused pass per row computes the dots of every query and the row's
//     sums of squares for every prefix (vectorised lanes), no score matrix at all;
//   - B > 4, float32 scores: the tile is packed into d-major panels and run through the prefix
//     micro kernel (prefix_gemm.h); at each prefix boundary the scores go straight from the
//     accumulators to admission (one vector compare per vector of scores against the heap's worst
//     entry), no score tile at all;
//     (at the default level only for small B * dmax: mat::use_prefix_micro);
//   - otherwise (B > 4 in float64 or past use_prefix_micro, or B <= 4 with the dot metric / given
//     norms):
//     R(B x T) += Q_seg X_seg^T (ATen BLAS, or a 4-row GEMV kernel for B = 1), one per segment.
// After segment p each score goes through threshold-first admission into the thread's top-k heap
// of (p, query): one compare against the heap's worst entry rejects almost every candidate.
// At the end the per-thread heaps are merged per (p, query) by the total order of topk.h
// (score desc, NaN last, ties to the lower index), so the result does not depend on threads.
// Extra memory: threads x (P*B*k + B*T), never B x N.
//
// funnel: stage 0 is a topk at dims[0]; every later stage extends the survivors' dot products
// (and sums of squares) from the previous prefix to the next one by reading only the new segment
// of each survivor's row, rescoring, and keeping the best ks[s].

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/dispatch.h"
#include "matryoshka/cpu/prefix_gemm.h"
#include "matryoshka/cpu/segments.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"
#include "matryoshka/topk.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kDirectMaxB = 4;

// The corpus as column blocks: block i holds columns [c0[i], c1[i]) of every row, row stride ld[i]
// (a plain (N, D) corpus is one block; MatryoshkaIndex stores one contiguous block per segment so
// that a prefix scan reads contiguous memory).
template <typename scalar_t>
struct Blocks {
  std::vector<const scalar_t*> ptr;
  std::vector<int64_t> ld, c0, c1;
};

// The part of global columns [a, e) that lies in one block, in the block's local columns.
struct Piece {
  int blk;
  int64_t lo, hi;  // local columns
  int64_t qoff;    // global column of local column 0
};

template <typename scalar_t>
std::vector<std::vector<Piece>> make_pieces(const Blocks<scalar_t>& bl, const std::vector<int64_t>& dims) {
  std::vector<std::vector<Piece>> out(dims.size());
  int64_t a = 0;
  for (size_t p = 0; p < dims.size(); ++p) {
    const int64_t e = dims[p];
    for (size_t i = 0; i < bl.ptr.size(); ++i) {
      const int64_t lo = std::max(a, bl.c0[i]), hi = std::min(e, bl.c1[i]);
      if (lo < hi) out[p].push_back({static_cast<int>(i), lo - bl.c0[i], hi - bl.c0[i], bl.c0[i]});
    }
    a = e;
  }
  return out;
}

// Rows [n0, n0+nt) of every block as acc_t (converted into per-thread buffers when needed),
// only the columns below dmax.
template <typename scalar_t, typename acc_t>
struct BlockTiles {
  const Blocks<scalar_t>& bl;
  int64_t dmax;
  std::vector<mat::TileRows<scalar_t, acc_t>> tiles;
  std::vector<const acc_t*> rows;
  std::vector<int64_t> ld;

  // dq: codes' dequantisation (base row, then step row, D each, global columns) or null
  BlockTiles(const Blocks<scalar_t>& b, int64_t dm, const acc_t* dq, int64_t D) : bl(b), dmax(dm) {
    for (size_t i = 0; i < b.ptr.size(); ++i) {
      const int64_t w = std::max<int64_t>(0, std::min(dm, b.c1[i]) - b.c0[i]);
      tiles.push_back({b.ptr[i], b.ld[i], w, {}});
      if (dq != nullptr) {
        tiles.back().base = dq + b.c0[i];
        tiles.back().step = dq + D + b.c0[i];
      }
    }
    rows.resize(b.ptr.size());
    ld.resize(b.ptr.size());
  }
  void load(int64_t n0, int64_t nt) {
    for (size_t i = 0; i < tiles.size(); ++i) {
      if (tiles[i].width > 0) rows[i] = tiles[i].load(n0, nt, ld[i]);
    }
  }
};

template <typename acc_t>
struct Heaps {
  std::vector<acc_t> s;
  std::vector<int64_t> id;
};

template <typename acc_t>
inline void admit_row(const acc_t* __restrict__ dots, int64_t nt, int64_t n0, bool cosine, acc_t iq,
                      const acc_t* __restrict__ ix, acc_t* hs, int64_t* hi, int64_t k) {
  acc_t thr = hs[0];
  for (int64_t j = 0; j < nt; ++j) {
    const acc_t sc = cosine ? mat::cosine_from_dot(dots[j], iq, ix[j]) : dots[j];
    if (sc < thr) continue;  // the common case: one compare (false for NaN: full rule below)
    if (mat::heap_push(hs, hi, k, sc, n0 + j)) thr = hs[0];
  }
}

// The codes' dequantisation folded into the queries, for scores that need no corpus norm (the dot
// metric, or norms given): q . (base + step * c) = q . base + (q * step) . c, so the rows are read
// as raw codes against qs = q * step (B x D), and qbase[p * B + b] = q[b][:dims[p]] . base[:dims[p]]
// (summed in double) is added once per prefix.
struct FoldedQueries {
  std::vector<float> qs, qbase;
  FoldedQueries(const float* q, const float* dq, int64_t B, int64_t D, const std::vector<int64_t>& dims)
      : qs(static_cast<size_t>(B * D)), qbase(dims.size() * static_cast<size_t>(B)) {
    for (int64_t b = 0; b < B; ++b) {
      double c = 0;
      int64_t j = 0;
      for (size_t p = 0; p < dims.size(); ++p) {
        for (; j < dims[p]; ++j) c += static_cast<double>(q[b * D + j]) * dq[j];
        qbase[p * B + b] = static_cast<float>(c);
      }
      for (j = 0; j < D; ++j) qs[b * D + j] = q[b * D + j] * dq[D + j];
    }
  }
};

// rows: the tile's rows per block, in the compute type (x_t = acc_t), or the raw int8 / uint8
// codes (x_t = the code type, acc_t = float) dequantised in registers with dq (base row, then step
// row, D each, global columns), or, with fold (dot metric or given norms), read raw against the
// folded queries.
template <typename x_t, typename acc_t, int NB, bool kFold = false>
void direct_tile(const std::vector<const x_t*>& rows, const std::vector<int64_t>& ld, int64_t nt, int64_t n0,
                 const acc_t* q, int64_t D, const MatryoshkaShape& s, const std::vector<std::vector<Piece>>& pieces,
                 const std::vector<int64_t>& row_bytes, const acc_t* qinv, const acc_t* given_inv, const acc_t* dq,
                 const FoldedQueries* fold, acc_t* hs, int64_t* hi, int64_t k) {
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size());
  constexpr int64_t kAhead = 8;
  if constexpr (kFold) q = fold->qs.data();
  for (int64_t r = 0; r < nt; ++r) {
    if (r + kAhead < nt) {
      for (size_t i = 0; i < rows.size(); ++i) {
        if (row_bytes[i] > 0) mat::prefetch(rows[i] + (r + kAhead) * ld[i], row_bytes[i]);
      }
    }
    acc_t dots[NB] = {};
    acc_t sq = 0;
    mat::SegAcc<acc_t, NB, !kFold> acc;  // summed up once per prefix
    for (int64_t p = 0; p < P; ++p) {
      for (const Piece& pc : pieces[p]) {
        const acc_t* qr[NB];
        for (int b = 0; b < NB; ++b) qr[b] = q + b * D + pc.qoff;
        if constexpr (kFold) {
          mat::code_seg_dot_into<x_t, NB>(rows[pc.blk] + r * ld[pc.blk], qr, pc.lo, pc.hi, acc, dots);
        } else if constexpr (std::is_same_v<x_t, acc_t>) {
          mat::seg_dot_sq_into<acc_t, NB>(rows[pc.blk] + r * ld[pc.blk], qr, pc.lo, pc.hi, acc, dots, sq);
        } else {
          mat::code_seg_dot_sq_into<x_t, NB>(rows[pc.blk] + r * ld[pc.blk], qr, dq + pc.qoff, dq + D + pc.qoff,
                                             pc.lo, pc.hi, acc, dots, sq);
        }
      }
      acc.flush(dots, sq);
      const acc_t ix = !s.cosine ? acc_t(1) : given_inv ? given_inv[p * N + n0 + r] : mat::inv_norm_from_sq(sq);
      for (int b = 0; b < NB; ++b) {
        const int64_t pb = p * B + b;
        acc_t dot = dots[b];
        if constexpr (kFold) dot += fold->qbase[pb];
        const acc_t sc = s.cosine ? mat::cosine_from_dot(dot, qinv[pb], ix) : dot;
        acc_t* h = hs + pb * k;
        if (sc < h[0]) continue;
        mat::heap_push(h, hi + pb * k, k, sc, n0 + r);
      }
    }
  }
}

// f(std::integral_constant<int, B>{}) for the direct path's query counts B in [1, kDirectMaxB]
template <typename F>
void dispatch_direct_b(int64_t B, F&& f) {
  static_assert(kDirectMaxB == 4);
  switch (B) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: TORCH_INTERNAL_ASSERT(false, "direct path with B = ", B);
  }
}

// One tile of rows [n0, n0 + nt) (nt <= 8 * kNR) on the packed path: pack every block's columns
// below dims.back() into d-major panels, then per (query panel, row panel) the prefix micro
// kernel hands each prefix's scores straight to admission.
template <typename scalar_t>
void packed_tile(const BlockTiles<scalar_t, float>& tiles, const Blocks<scalar_t>& bl, int64_t nt, int64_t n0,
                 const MatryoshkaShape& s, const float* qp, int64_t nqp, const float* qinv, const float* given_inv,
                 float* xp, float* xinv, float* hs, int64_t* hi, int64_t k) {
  using mat::kMR;
  using mat::kNR;
  using mat::kVec;
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size()), dmax = s.dims.back();
  const int64_t npanels = (nt + kNR - 1) / kNR;
  for (int64_t j = 0; j < npanels; ++j) {
    float* xpj = xp + j * dmax * kNR;
    const int64_t nr = std::min<int64_t>(kNR, nt - j * kNR);
    for (size_t i = 0; i < bl.ptr.size(); ++i) {
      const int64_t w = std::min(dmax, bl.c1[i]) - bl.c0[i];
      if (w > 0) mat::pack_corpus_panel(tiles.rows[i] + j * kNR * tiles.ld[i], tiles.ld[i], nr, 0, w, bl.c0[i], xpj);
    }
    if (s.cosine && given_inv == nullptr) mat::panel_inv_norms(xpj, s.dims.data(), P, xinv + j * P * kNR);
  }
  for (int64_t i = 0; i < nqp; ++i) {
    const int64_t b0 = i * kMR, mr = std::min<int64_t>(kMR, B - b0);
    for (int64_t j = 0; j < npanels; ++j) {
      const int64_t c0 = n0 + j * kNR, nc = std::min<int64_t>(kNR, nt - j * kNR);
      mat::prefix_micro_tile(qp + i * dmax * kMR, xp + j * dmax * kNR, s.dims.data(), P,
                             [&](int64_t p, const mat::vf (&acc)[kMR][2]) {
                               mat::vf ix0 = {}, ix1 = {};
                               if (s.cosine) {
                                 if (given_inv) {
                                   const float* g = given_inv + p * N + c0;
                                   ix0 = mat::load_partial(g, nc);
                                   ix1 = mat::load_partial(g + kVec, nc - kVec);
                                 } else {
                                   ix0 = mat::loadu(xinv + (j * P + p) * kNR);
                                   ix1 = mat::loadu(xinv + (j * P + p) * kNR + kVec);
                                 }
                               }
                               for (int64_t r = 0; r < mr; ++r) {
                                 const int64_t pb = p * B + b0 + r;
                                 mat::vf v0 = acc[r][0], v1 = acc[r][1];
                                 if (s.cosine) {
                                   v0 = mat::cosine_lanes(v0, qinv[pb], ix0);
                                   v1 = mat::cosine_lanes(v1, qinv[pb], ix1);
                                 }
                                 float* h = hs + pb * k;
                                 if (!mat::any_not_below(v0, h[0]) && !mat::any_not_below(v1, h[0])) continue;
                                 float sc[kNR];
                                 mat::storeu(sc, v0);
                                 mat::storeu(sc + kVec, v1);
                                 admit_row<float>(sc, nc, c0, false, 1.f, nullptr, h, hi + pb * k, k);
                               }
                             });
    }
  }
}

// dq: for int8 / uint8 codes their dequantisation (see BlockTiles), else null
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void topk_kernel(const at::Tensor& q_acc, const Blocks<scalar_t>& bl, const MatryoshkaShape& s, int64_t k,
                 const acc_t* given_inv, const acc_t* dq, at::Tensor& values, at::Tensor& indices) {
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size()), D = q_acc.size(1);
  const int64_t dmax = s.dims.back();
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  std::vector<acc_t> qinv(P * B);
  mat::prefix_inv_norms(q, D, B, s.dims, qinv.data(), B);
  const auto pieces = make_pieces(bl, s.dims);
  std::vector<int64_t> row_bytes(bl.ptr.size());
  for (size_t i = 0; i < bl.ptr.size(); ++i) {
    // software prefetch only for strided rows (a prefix of a wide row); contiguous blocks stream fine
    const int64_t bytes = std::max<int64_t>(0, std::min(dmax, bl.c1[i]) - bl.c0[i]) * static_cast<int64_t>(sizeof(acc_t));
    row_bytes[i] = bl.ld[i] * static_cast<int64_t>(sizeof(scalar_t)) >= 2 * bytes + 256 ? bytes : 0;
  }
  // raw code rows (direct_codes): prefetched always (the codes' segment blocks are several streams
  // of short rows, which the hardware prefetcher follows badly: 2x faster at 12 blocks of 64 columns)
  std::vector<int64_t> code_row_bytes(bl.ptr.size());
  for (size_t i = 0; i < bl.ptr.size(); ++i) {
    const int64_t bytes = std::max<int64_t>(0, std::min(dmax, bl.c1[i]) - bl.c0[i]);
    code_row_bytes[i] = bytes;
  }
  // GEMV-shaped calls that must compute the corpus norms anyway fuse everything into one pass per
  // row; otherwise (dot metric, or norms given) BLAS streams the tile (faster than our loops).
  constexpr bool kFloatScores = std::is_same_v<acc_t, float>;
  // codes with float scores and few queries: dequantised in registers, straight from the codes
  constexpr bool kCodes = std::is_integral_v<scalar_t>;
  const bool direct_codes = kCodes && kFloatScores && B <= kDirectMaxB;
  const bool direct = direct_codes || (B <= kDirectMaxB && s.cosine && given_inv == nullptr);
  const bool packed = kFloatScores && B > kDirectMaxB && mat::use_prefix_micro(B, dmax);
  // the direct code path without corpus norms reads the raw codes against the folded queries
  std::optional<FoldedQueries> fold;
  if constexpr (kCodes && kFloatScores) {
    if (direct_codes && (!s.cosine || given_inv != nullptr)) fold.emplace(q, dq, B, D, s.dims);
  }
  constexpr int64_t kPanels = 8;
  int64_t T = direct   ? 2048
              : packed ? kPanels * mat::kNR
                       : std::clamp<int64_t>((65536 / B + 63) / 64 * 64, 256, 16384);
  // codes are dequantised tile by tile into a per-thread buffer: keep it within L2 (~256 KB)
  if constexpr (kCodes) {
    if (!packed && !direct_codes) T = std::min(T, std::clamp<int64_t>((65536 / dmax + 7) / 8 * 8, 32, 2048));
  }
  std::vector<float> qp;  // packed query panels (packed path)
  const int64_t nqp = (B + mat::kMR - 1) / mat::kMR;
  if constexpr (kFloatScores) {
    if (packed) qp = mat::pack_query_panels(q, D, B, dmax);
  }
  const int64_t ntiles = (N + T - 1) / T;
  const int64_t nthreads = std::max(1, at::get_num_threads());
  std::vector<Heaps<acc_t>> heaps(nthreads);
  const auto acc_opts = q_acc.options();
  const int64_t slots = P * B * k;

  // tiles are handed out dynamically (an atomic counter), so a thread that the OS preempts does
  // not hold the others up; results do not depend on which thread scored which tile.
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::min<int64_t>(std::max(1, at::get_num_threads()), ntiles);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < nthreads);
    Heaps<acc_t>& h = heaps[tid];
    if (h.s.empty()) {
      h.s.assign(slots, mat::sentinel_score<acc_t>());
      h.id.assign(slots, mat::kSentinelIndex);
    }
    BlockTiles<scalar_t, acc_t> tiles(bl, dmax, dq, D);
    at::Tensor R;
    std::vector<acc_t> xinv;
    std::vector<float> xp;
    if (packed) {
      xp.resize(static_cast<size_t>(kPanels * dmax * mat::kNR));
      xinv.resize(kPanels * P * mat::kNR);
    } else if (!direct) {
      R = at::empty({B, T}, acc_opts);
      xinv.resize(P * T);
    }
    std::vector<const scalar_t*> raw(bl.ptr.size());  // the tile's code rows (direct_codes)
    for (int64_t tile = next_tile.fetch_add(1); tile < ntiles; tile = next_tile.fetch_add(1)) {
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      if constexpr (kCodes && kFloatScores) {
        if (direct_codes) {
          for (size_t i = 0; i < raw.size(); ++i) raw[i] = bl.ptr[i] + n0 * bl.ld[i];
          dispatch_direct_b(B, [&](auto nb) {
            EMBEDOPS_BOOL_SWITCH(fold.has_value(), kFold, [&] {
              direct_tile<scalar_t, acc_t, decltype(nb)::value, kFold>(raw, bl.ld, nt, n0, q, D, s, pieces,
                                                                       code_row_bytes, qinv.data(), given_inv, dq,
                                                                       kFold ? &*fold : nullptr, h.s.data(),
                                                                       h.id.data(), k);
            });
          });
          continue;
        }
      }
      tiles.load(n0, nt);
      if (direct) {
        dispatch_direct_b(B, [&](auto nb) {
          direct_tile<acc_t, acc_t, decltype(nb)::value>(tiles.rows, tiles.ld, nt, n0, q, D, s, pieces, row_bytes,
                                                         qinv.data(), given_inv, nullptr, nullptr, h.s.data(),
                                                         h.id.data(), k);
        });
        continue;
      }
      if constexpr (kFloatScores) {
        if (packed) {
          packed_tile(tiles, bl, nt, n0, s, qp.data(), nqp, qinv.data(), given_inv, xp.data(), xinv.data(),
                      h.s.data(), h.id.data(), k);
          continue;
        }
      }
      const acc_t* ix_base = nullptr;
      int64_t ix_stride = 0;
      if (s.cosine) {
        if (given_inv) {
          ix_base = given_inv + n0;
          ix_stride = N;
        } else {
          for (int64_t r = 0; r < nt; ++r) {
            acc_t sq = 0;
            for (int64_t p = 0; p < P; ++p) {
              for (const Piece& pc : pieces[p]) mat::seg_sq(tiles.rows[pc.blk] + r * tiles.ld[pc.blk], pc.lo, pc.hi, sq);
              xinv[p * T + r] = mat::inv_norm_from_sq(sq);
            }
          }
          ix_base = xinv.data();
          ix_stride = T;
        }
      }
      at::Tensor Rt = R.narrow(1, 0, nt);
      bool first = true;
      for (int64_t p = 0; p < P; ++p) {
        for (const Piece& pc : pieces[p]) {
          if (B == 1) {  // GEMV: our 4-row kernel streams the rows faster than BLAS' sgemv here
            mat::rows_dot1<acc_t>(tiles.rows[pc.blk] + pc.lo, tiles.ld[pc.blk], nt, q + pc.qoff + pc.lo,
                                  pc.hi - pc.lo, R.data_ptr<acc_t>(), !first);
            first = false;
            continue;
          }
          at::Tensor xt = at::from_blob(const_cast<acc_t*>(tiles.rows[pc.blk]) + pc.lo, {nt, pc.hi - pc.lo},
                                        {tiles.ld[pc.blk], 1}, acc_opts);
          Rt.addmm_(q_acc.narrow(1, pc.qoff + pc.lo, pc.hi - pc.lo), xt.t(), first ? 0 : 1, 1);
          first = false;
        }
        const acc_t* r = R.const_data_ptr<acc_t>();
        for (int64_t b = 0; b < B; ++b) {
          const int64_t pb = p * B + b;
          admit_row(r + b * T, nt, n0, s.cosine, qinv[pb], ix_base ? ix_base + p * ix_stride : nullptr,
                    h.s.data() + pb * k, h.id.data() + pb * k, k);
        }
      }
    }
  });

  // deterministic merge of the per-thread heaps
  acc_t* vo = values.data_ptr<acc_t>();
  int64_t* io = indices.data_ptr<int64_t>();
  at::parallel_for(0, P * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> cand;
    for (int64_t pb = begin; pb < end; ++pb) {
      cand.clear();
      for (const auto& h : heaps) {
        if (h.s.empty()) continue;
        for (int64_t j = 0; j < k; ++j) {
          if (h.id[pb * k + j] != mat::kSentinelIndex) cand.emplace_back(h.s[pb * k + j], h.id[pb * k + j]);
        }
      }
      TORCH_INTERNAL_ASSERT(static_cast<int64_t>(cand.size()) >= k);
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [](const auto& u, const auto& v) {
        return mat::ranks_before(u.first, u.second, v.first, v.second);
      });
      for (int64_t j = 0; j < k; ++j) {
        vo[pb * k + j] = cand[j].first;
        io[pb * k + j] = cand[j].second;
      }
    }
  });
}

template <typename scalar_t>
Blocks<scalar_t> make_blocks(const std::vector<at::Tensor>& ts) {
  Blocks<scalar_t> bl;
  int64_t c = 0;
  for (const auto& t : ts) {
    bl.ptr.push_back(t.const_data_ptr<scalar_t>());
    bl.ld.push_back(t.stride(0));
    bl.c0.push_back(c);
    c += t.size(1);
    bl.c1.push_back(c);
  }
  return bl;
}

// Global columns [a, e) of row `row` into seg[a, e) as acc_t (codes dequantised with dq: base
// row then step row, D each; null for a float corpus).
template <typename scalar_t, typename acc_t>
inline void gather_row(const Blocks<scalar_t>& bl, int64_t row, int64_t a, int64_t e, acc_t* seg, const acc_t* dq,
                       int64_t D) {
  for (size_t i = 0; i < bl.ptr.size(); ++i) {
    const int64_t lo = std::max(a, bl.c0[i]), hi = std::min(e, bl.c1[i]);
    const scalar_t* src = bl.ptr[i] + row * bl.ld[i] - bl.c0[i];
    if (dq != nullptr) {
      for (int64_t j = lo; j < hi; ++j) seg[j] = dq[j] + dq[D + j] * static_cast<acc_t>(src[j]);
    } else {
      for (int64_t j = lo; j < hi; ++j) seg[j] = static_cast<acc_t>(src[j]);
    }
  }
}

template <typename scalar_t>
void funnel_rerank(const at::Tensor& q_acc, const Blocks<scalar_t>& bl, const MatryoshkaShape& s,
                   at::IntArrayRef ks, const at::Tensor& v0, const at::Tensor& i0, at::Tensor& values,
                   at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, D = q_acc.size(1), S = static_cast<int64_t>(s.dims.size());
  const int64_t k0 = ks[0], kl = ks[S - 1];
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  const acc_t* vin = v0.const_data_ptr<acc_t>();
  const int64_t* iin = i0.const_data_ptr<int64_t>();
  acc_t* vo = values.data_ptr<acc_t>();
  int64_t* io = indices.data_ptr<int64_t>();
  auto gather = [&](int64_t row, int64_t a, int64_t e, acc_t* seg) {
    gather_row<scalar_t, acc_t>(bl, row, a, e, seg, nullptr, D);
  };
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> dot(k0), sq(k0), score(k0), dot2(k0), sq2(k0), score2(k0), seg(D);
    std::vector<int64_t> idx(k0), idx2(k0), order(k0);
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* qb = q + b * D;
      acc_t qsq = 0;
      mat::seg_sq(qb, 0, s.dims[0], qsq);
      const acc_t iq0 = mat::inv_norm_from_sq(qsq);
      // stage 0 survivors: their raw dot products at dims[0], recovered from the scores
      for (int64_t c = 0; c < k0; ++c) {
        idx[c] = iin[b * k0 + c];
        gather(idx[c], 0, s.dims[0], seg.data());
        acc_t xsq = 0;
        mat::seg_sq(seg.data(), 0, s.dims[0], xsq);
        sq[c] = xsq;
        const acc_t sc = vin[b * k0 + c];
        if (!s.cosine) {
          dot[c] = sc;
        } else {
          const acc_t ix = mat::inv_norm_from_sq(xsq);
          dot[c] = (iq0 == acc_t(0) || ix == acc_t(0)) ? acc_t(0) : sc / (iq0 * ix);
        }
        score[c] = sc;
      }
      int64_t kc = k0;
      for (int64_t st = 1; st < S; ++st) {
        const int64_t a = s.dims[st - 1], e = s.dims[st];
        mat::seg_sq(qb, a, e, qsq);
        const acc_t iq = mat::inv_norm_from_sq(qsq);
        const acc_t* qrow[1] = {qb};
        for (int64_t c = 0; c < kc; ++c) {
          gather(idx[c], a, e, seg.data());  // only the new segment of the survivor's row
          mat::seg_dot_sq<acc_t, 1>(seg.data(), qrow, a, e, &dot[c], sq[c]);
          score[c] = s.cosine ? mat::cosine_from_dot(dot[c], iq, mat::inv_norm_from_sq(sq[c])) : dot[c];
        }
        const int64_t kn = ks[st];
        std::iota(order.begin(), order.begin() + kc, 0);
        std::partial_sort(order.begin(), order.begin() + kn, order.begin() + kc, [&](int64_t u, int64_t v) {
          return mat::ranks_before(score[u], idx[u], score[v], idx[v]);
        });
        for (int64_t c = 0; c < kn; ++c) {
          dot2[c] = dot[order[c]];
          sq2[c] = sq[order[c]];
          idx2[c] = idx[order[c]];
          score2[c] = score[order[c]];
        }
        std::swap(dot, dot2);
        std::swap(sq, sq2);
        std::swap(idx, idx2);
        std::swap(score, score2);
        kc = kn;
      }
      for (int64_t c = 0; c < kl; ++c) {
        vo[b * kl + c] = score[c];
        io[b * kl + c] = idx[c];
      }
    }
  });
}

// The best k of each query's candidates at prefix s.dims[0] (any order in; best first out, the
// order of topk.h). The scores: tasks over (query, run of candidates), so that B = 1 still uses
// every core, the rows of the candidates kAhead places ahead prefetched (the candidates are random
// rows: the loads are DRAM latency, not bandwidth); float32 codes are dequantised in registers.
// Then each query's best k, parallel over queries.
template <typename scalar_t, typename acc_t>
void rescore_kernel(const at::Tensor& q_acc, const Blocks<scalar_t>& bl, const MatryoshkaShape& s, const acc_t* dq,
                    const at::Tensor& candidates, int64_t k, at::Tensor& values, at::Tensor& indices) {
  const int64_t D = q_acc.size(1), d = s.dims[0], C = candidates.size(1), B = s.B;
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  const int64_t* cand = candidates.const_data_ptr<int64_t>();
  acc_t* vo = values.data_ptr<acc_t>();
  int64_t* io = indices.data_ptr<int64_t>();
  const std::vector<Piece> pieces = make_pieces(bl, {d})[0];
  std::vector<int64_t> row_bytes(bl.ptr.size(), 0);
  for (const Piece& pc : pieces) row_bytes[pc.blk] = (pc.hi - pc.lo) * static_cast<int64_t>(sizeof(scalar_t));
  // runs of >= 32 candidates, >= 4 tasks per thread where the candidates allow
  const int64_t threads = at::get_num_threads();
  const int64_t runs = std::clamp<int64_t>((4 * threads + B - 1) / std::max<int64_t>(B, 1), 1,
                                           std::max<int64_t>(1, C / 32));
  const int64_t run = (C + runs - 1) / runs;
  std::vector<acc_t> score(static_cast<size_t>(B * C));
  std::vector<acc_t> qinv(static_cast<size_t>(B), acc_t(1));
  if (s.cosine) {
    for (int64_t b = 0; b < B; ++b) {
      acc_t qsq = 0;
      mat::seg_sq(q + b * D, 0, d, qsq);
      qinv[b] = mat::inv_norm_from_sq(qsq);
    }
  }
  constexpr int64_t kAhead = 6;
  at::parallel_for(0, B * runs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> seg(static_cast<size_t>(d));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / runs, c0 = (t % runs) * run, c1 = std::min(C, c0 + run);
      const acc_t* qb = q + b * D;
      const int64_t* cb = cand + b * C;
      const acc_t* qrow[1] = {qb};
      for (int64_t c = c0; c < c1; ++c) {
        if (c + kAhead < c1) {
          for (const Piece& pc : pieces)
            mat::prefetch(bl.ptr[pc.blk] + cb[c + kAhead] * bl.ld[pc.blk] + pc.lo, row_bytes[pc.blk]);
        }
        acc_t dot = 0, sq = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {  // float32 / float64 rows: in place
          mat::SegAcc<acc_t, 1> acc;
          for (const Piece& pc : pieces) {
            const acc_t* qr[1] = {qb + pc.qoff};
            mat::seg_dot_sq_into<acc_t, 1>(bl.ptr[pc.blk] + cb[c] * bl.ld[pc.blk], qr, pc.lo, pc.hi, acc, &dot, sq);
          }
          acc.flush(&dot, sq);
        } else if constexpr (std::is_integral_v<scalar_t> && std::is_same_v<acc_t, float>) {  // codes
          mat::SegAcc<float, 1> acc;
          for (const Piece& pc : pieces) {
            const acc_t* qr[1] = {qb + pc.qoff};
            mat::code_seg_dot_sq_into<scalar_t, 1>(bl.ptr[pc.blk] + cb[c] * bl.ld[pc.blk], qr, dq + pc.qoff,
                                                   dq + D + pc.qoff, pc.lo, pc.hi, acc, &dot, sq);
          }
          acc.flush(&dot, sq);
        } else {  // half / bfloat16 rows, or codes with float64 queries: converted first
          gather_row<scalar_t, acc_t>(bl, cb[c], 0, d, seg.data(), dq, D);
          mat::seg_dot_sq<acc_t, 1>(seg.data(), qrow, 0, d, &dot, sq);
        }
        score[b * C + c] = s.cosine ? mat::cosine_from_dot(dot, qinv[b], mat::inv_norm_from_sq(sq)) : dot;
      }
    }
  });
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(static_cast<size_t>(C));
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* sb = score.data() + b * C;
      const int64_t* cb = cand + b * C;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t u, int64_t v) {
        return mat::ranks_before(sb[u], cb[u], sb[v], cb[v]);
      });
      for (int64_t j = 0; j < k; ++j) {
        vo[b * k + j] = sb[order[j]];
        io[b * k + j] = cb[order[j]];
      }
    }
  });
}

// f.template operator()<code_t, acc_t>() for int8 / uint8 codes and float / double queries
template <typename F>
void dispatch_codes(at::ScalarType codes, at::ScalarType acc, F&& f) {
  const bool dbl = acc == at::kDouble;
  if (codes == at::kChar) {
    dbl ? f.template operator()<int8_t, double>() : f.template operator()<int8_t, float>();
  } else {
    TORCH_INTERNAL_ASSERT(codes == at::kByte);
    dbl ? f.template operator()<uint8_t, double>() : f.template operator()<uint8_t, float>();
  }
}

void topk_cpu_kernel(const at::Tensor& q_acc, const std::vector<at::Tensor>& blocks, const MatryoshkaShape& s,
                     int64_t k, const at::Tensor& inv, const at::Tensor& dequant, at::Tensor& values,
                     at::Tensor& indices) {
  if (dequant.defined()) {
    dispatch_codes(blocks[0].scalar_type(), q_acc.scalar_type(), [&]<typename code_t, typename acc_t>() {
      topk_kernel<code_t, acc_t>(q_acc, make_blocks<code_t>(blocks), s, k,
                                 inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr,
                                 dequant.const_data_ptr<acc_t>(), values, indices);
    });
    return;
  }
  EMBEDOPS_DISPATCH_FLOATING(blocks[0].scalar_type(), "matryoshka_topk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    topk_kernel<scalar_t, acc_t>(q_acc, make_blocks<scalar_t>(blocks), s, k,
                                 inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr, nullptr, values, indices);
  });
}

void rescore_cpu_kernel(const at::Tensor& q_acc, const std::vector<at::Tensor>& blocks, const MatryoshkaShape& s,
                        const at::Tensor& dequant, const at::Tensor& candidates, int64_t k, at::Tensor& values,
                        at::Tensor& indices) {
  if (dequant.defined()) {
    dispatch_codes(blocks[0].scalar_type(), q_acc.scalar_type(), [&]<typename code_t, typename acc_t>() {
      rescore_kernel<code_t, acc_t>(q_acc, make_blocks<code_t>(blocks), s, dequant.const_data_ptr<acc_t>(),
                                    candidates, k, values, indices);
    });
    return;
  }
  EMBEDOPS_DISPATCH_FLOATING(blocks[0].scalar_type(), "matryoshka_rescore_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rescore_kernel<scalar_t, acc_t>(q_acc, make_blocks<scalar_t>(blocks), s, nullptr, candidates, k, values,
                                    indices);
  });
}

void funnel_rerank_cpu_kernel(const at::Tensor& q_acc, const std::vector<at::Tensor>& blocks,
                              const MatryoshkaShape& s, at::IntArrayRef ks, const at::Tensor& v0,
                              const at::Tensor& i0, at::Tensor& values, at::Tensor& indices) {
  EMBEDOPS_DISPATCH_FLOATING(blocks[0].scalar_type(), "matryoshka_funnel_cpu", [&] {
    funnel_rerank<scalar_t>(q_acc, make_blocks<scalar_t>(blocks), s, ks, v0, i0, values, indices);
  });
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(matryoshka_topk_stub, &topk_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(matryoshka_funnel_rerank_stub, &funnel_rerank_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(matryoshka_rescore_stub, &rescore_cpu_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops
