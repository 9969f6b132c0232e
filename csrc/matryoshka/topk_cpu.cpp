// matryoshka_topk and matryoshka_funnel on CPU.
//
// topk streams the corpus in row tiles, parallel over tiles (one contiguous run of tiles per
// thread). Per tile the raw dot products are accumulated segment by segment (prefix d_{p-1}..d_p):
//   - B <= 4 (GEMV-shaped): one fused pass per row computes the dots of every query and the row's
//     sums of squares for every prefix (vectorised lanes), no score matrix at all;
//   - B > 4: R(B x T) += Q_seg X_seg^T with ATen BLAS, one GEMM per segment.
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
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>

#include "common/dispatch.h"
#include "matryoshka/cpu_kernels.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/topk.h"

namespace embedops {
namespace {

constexpr int64_t kDirectMaxB = 4;

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

template <typename scalar_t, int NB>
void direct_tile(const at::opmath_type<scalar_t>* rows, int64_t ld, int64_t nt, int64_t n0,
                 const at::opmath_type<scalar_t>* q, int64_t D, const MatryoshkaShape& s,
                 const at::opmath_type<scalar_t>* qinv, const at::opmath_type<scalar_t>* given_inv,
                 at::opmath_type<scalar_t>* hs, int64_t* hi, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size());
  const acc_t* qr[NB];
  for (int b = 0; b < NB; ++b) qr[b] = q + b * D;
  const int64_t row_bytes = s.dims.back() * static_cast<int64_t>(sizeof(acc_t));
  constexpr int64_t kAhead = 8;
  for (int64_t r = 0; r < nt; ++r) {
    const acc_t* xr = rows + r * ld;
    if (r + kAhead < nt) mat::prefetch_row(xr + kAhead * ld, row_bytes);
    acc_t dots[NB] = {};
    acc_t sq = 0;
    int64_t a = 0;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t e = s.dims[p];
      mat::seg_dot_sq<acc_t, NB>(xr, qr, a, e, dots, sq);
      a = e;
      const acc_t ix = !s.cosine ? acc_t(1) : given_inv ? given_inv[p * N + n0 + r] : mat::inv_norm_from_sq(sq);
      for (int b = 0; b < NB; ++b) {
        const int64_t pb = p * B + b;
        const acc_t sc = s.cosine ? mat::cosine_from_dot(dots[b], qinv[pb], ix) : dots[b];
        acc_t* h = hs + pb * k;
        if (sc < h[0]) continue;
        mat::heap_push(h, hi + pb * k, k, sc, n0 + r);
      }
    }
  }
}

template <typename scalar_t>
void topk_kernel(const at::Tensor& q_acc, const at::Tensor& x, const MatryoshkaShape& s, int64_t k,
                 const at::opmath_type<scalar_t>* given_inv, at::Tensor& values, at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size()), D = q_acc.size(1);
  const int64_t dmax = s.dims.back();
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  std::vector<acc_t> qinv(P * B);
  mat::prefix_inv_norms(q, D, B, s.dims, qinv.data(), B);
  const bool direct = B <= kDirectMaxB;
  const int64_t T = direct ? 2048 : std::clamp<int64_t>((65536 / B + 63) / 64 * 64, 256, 4096);
  const int64_t ntiles = (N + T - 1) / T;
  const int64_t nthreads = std::max(1, at::get_num_threads());
  std::vector<Heaps<acc_t>> heaps(nthreads);
  const auto acc_opts = q_acc.options();
  const int64_t slots = P * B * k;

  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < nthreads);
    Heaps<acc_t>& h = heaps[tid];
    if (h.s.empty()) {
      h.s.assign(slots, mat::sentinel_score<acc_t>());
      h.id.assign(slots, mat::kSentinelIndex);
    }
    mat::TileRows<scalar_t, acc_t> tiles{x.const_data_ptr<scalar_t>(), x.stride(0), dmax, {}};
    at::Tensor R;
    std::vector<acc_t> xinv;
    if (!direct) {
      R = at::empty({B, T}, acc_opts);
      xinv.resize(P * T);
    }
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      int64_t ld = 0;
      const acc_t* rows = tiles.load(n0, nt, ld);
      if (direct) {
        switch (B) {
          case 1: direct_tile<scalar_t, 1>(rows, ld, nt, n0, q, D, s, qinv.data(), given_inv, h.s.data(), h.id.data(), k); break;
          case 2: direct_tile<scalar_t, 2>(rows, ld, nt, n0, q, D, s, qinv.data(), given_inv, h.s.data(), h.id.data(), k); break;
          case 3: direct_tile<scalar_t, 3>(rows, ld, nt, n0, q, D, s, qinv.data(), given_inv, h.s.data(), h.id.data(), k); break;
          default: direct_tile<scalar_t, 4>(rows, ld, nt, n0, q, D, s, qinv.data(), given_inv, h.s.data(), h.id.data(), k); break;
        }
        continue;
      }
      const acc_t* ix_base = nullptr;
      int64_t ix_stride = 0;
      if (s.cosine) {
        if (given_inv) {
          ix_base = given_inv + n0;
          ix_stride = N;
        } else {
          mat::prefix_inv_norms(rows, ld, nt, s.dims, xinv.data(), T);
          ix_base = xinv.data();
          ix_stride = T;
        }
      }
      at::Tensor xt = at::from_blob(const_cast<acc_t*>(rows), {nt, dmax}, {ld, 1}, acc_opts);
      at::Tensor Rt = R.narrow(1, 0, nt);
      int64_t a = 0;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t e = s.dims[p];
        Rt.addmm_(q_acc.narrow(1, a, e - a), xt.narrow(1, a, e - a).t(), p == 0 ? 0 : 1, 1);
        a = e;
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

std::tuple<at::Tensor, at::Tensor> topk_impl(const char* op, const at::Tensor& queries, const at::Tensor& corpus,
                                             int64_t k, const MatryoshkaShape& s,
                                             const std::optional<at::Tensor>& corpus_inv_norms) {
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  const int64_t P = static_cast<int64_t>(s.dims.size());
  at::Tensor values = at::empty({P, s.B, k}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({P, s.B, k}, queries.options().dtype(at::kLong));
  if (s.B == 0 || k == 0) return {values, indices};
  const at::Tensor q = queries.to(acc).contiguous();
  const at::Tensor x = rows_unit_stride(corpus);
  at::Tensor inv;
  if (corpus_inv_norms.has_value() && s.cosine) inv = corpus_inv_norms->contiguous();
  EMBEDOPS_DISPATCH_FLOATING(x.scalar_type(), "matryoshka_topk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    topk_kernel<scalar_t>(q, x, s, k, inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr, values, indices);
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> matryoshka_topk_cpu(const at::Tensor& queries, const at::Tensor& corpus, int64_t k,
                                                       at::IntArrayRef dims, c10::string_view metric,
                                                       const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "matryoshka_topk";
  const MatryoshkaShape s = check_matryoshka_args(op, queries, corpus, dims, metric);
  check_topk_k(op, k, s.N);
  check_inv_norms(op, corpus_inv_norms, static_cast<int64_t>(s.dims.size()), s.N, corpus);
  return topk_impl(op, queries, corpus, k, s, corpus_inv_norms);
}

template <typename scalar_t>
void funnel_rerank(const at::Tensor& q_acc, const at::Tensor& x, const MatryoshkaShape& s, at::IntArrayRef ks,
                   const at::Tensor& v0, const at::Tensor& i0, at::Tensor& values, at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, D = q_acc.size(1), S = static_cast<int64_t>(s.dims.size());
  const int64_t k0 = ks[0], kl = ks[S - 1];
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  const scalar_t* xb = x.const_data_ptr<scalar_t>();
  const int64_t ldx = x.stride(0);
  const acc_t* vin = v0.const_data_ptr<acc_t>();
  const int64_t* iin = i0.const_data_ptr<int64_t>();
  acc_t* vo = values.data_ptr<acc_t>();
  int64_t* io = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> dot(k0), sq(k0), score(k0);
    std::vector<int64_t> idx(k0), order(k0);
    std::vector<acc_t> seg(D);
    std::vector<acc_t> dot2(k0), sq2(k0), score2(k0);
    std::vector<int64_t> idx2(k0);
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* qb = q + b * D;
      acc_t qsq = 0;
      mat::seg_sq(qb, 0, s.dims[0], qsq);
      const acc_t iq0 = mat::inv_norm_from_sq(qsq);
      // stage 0 survivors: recover their raw dot products at dims[0] from the scores
      for (int64_t c = 0; c < k0; ++c) {
        idx[c] = iin[b * k0 + c];
        const scalar_t* xr = xb + idx[c] * ldx;
        for (int64_t j = 0; j < s.dims[0]; ++j) seg[j] = static_cast<acc_t>(xr[j]);
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
          const scalar_t* xr = xb + idx[c] * ldx;
          for (int64_t j = a; j < e; ++j) seg[j] = static_cast<acc_t>(xr[j]);
          // seg_dot_sq reads x[a:e] relative to the row start: pass seg shifted so indices line up
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

std::tuple<at::Tensor, at::Tensor> matryoshka_funnel_cpu(const at::Tensor& queries, const at::Tensor& corpus,
                                                         at::IntArrayRef dims, at::IntArrayRef ks,
                                                         c10::string_view metric,
                                                         const std::optional<at::Tensor>& corpus_inv_norms) {
  const char* op = "matryoshka_funnel";
  MatryoshkaShape s = check_matryoshka_args(op, queries, corpus, dims, metric);
  check_funnel_ks(op, dims, ks, s.N);
  check_inv_norms(op, corpus_inv_norms, 1, s.N, corpus);
  const at::ScalarType acc = acc_dtype_of(queries.scalar_type());
  const int64_t kl = ks.back();
  at::Tensor values = at::empty({s.B, kl}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({s.B, kl}, queries.options().dtype(at::kLong));
  if (s.B == 0 || kl == 0) return {values, indices};
  MatryoshkaShape s0 = s;
  s0.dims = {s.dims[0]};
  auto [v0, i0] = topk_impl(op, queries, corpus, ks[0], s0, corpus_inv_norms);
  const at::Tensor q = queries.to(acc).contiguous();
  const at::Tensor x = rows_unit_stride(corpus);
  EMBEDOPS_DISPATCH_FLOATING(x.scalar_type(), "matryoshka_funnel_cpu",
                             [&] { funnel_rerank<scalar_t>(q, x, s, ks, v0, i0, values, indices); });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedops, CPU, m) {
  m.impl("matryoshka_topk", &matryoshka_topk_cpu);
  m.impl("matryoshka_funnel", &matryoshka_funnel_cpu);
}

}  // namespace embedops
