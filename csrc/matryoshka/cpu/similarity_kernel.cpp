// matryoshka_similarity and matryoshka_inv_norms, CPU kernels (compiled once per CPU level; the
// host side is ../similarity.cpp).
//
// similarity: the corpus is streamed in row tiles, handed to the threads dynamically. The GEMM
// work is that of ONE full-dims.back() GEMM, whatever the number of prefixes:
//   - float32 scores (float32/float16/bfloat16 inputs): each tile is packed into d-major panels
//     and run through the register-blocked prefix micro kernel (prefix_gemm.h), which writes the
//     scores at every prefix from the same accumulators (cosine: times both inverse norms);
//     (at the default level only for small B * dmax: mat::use_prefix_micro);
//   - otherwise (float64, or past use_prefix_micro): the raw dot products are accumulated
//     segment by segment with ATen BLAS (R += Q[:, d_{p-1}:d_p] X[:, d_{p-1}:d_p]^T) and written
//     after each segment.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <atomic>
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

int64_t gemm_tile_rows(int64_t B) {
  const int64_t t = (65536 / std::max<int64_t>(B, 1) + 63) / 64 * 64;
  return std::clamp<int64_t>(t, 256, 4096);
}

// float32 scores through the prefix micro kernel. q_acc: (B, D) float32 contiguous.
template <typename scalar_t>
void similarity_packed(const at::Tensor& q_acc, const at::Tensor& x, const MatryoshkaShape& s, at::Tensor& out) {
  using mat::kMR;
  using mat::kNR;
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size());
  const int64_t dmax = s.dims.back();
  const float* q = q_acc.const_data_ptr<float>();
  const int64_t D = q_acc.size(1);
  std::vector<float> qinv(P * B);
  mat::prefix_inv_norms(q, D, B, s.dims, qinv.data(), B);
  const int64_t nqp = (B + kMR - 1) / kMR;
  const std::vector<float> qp = mat::pack_query_panels(q, D, B, dmax);
  float* o = out.data_ptr<float>();
  constexpr int64_t kPanels = 8;  // a tile of 256 rows: 8 packed panels (dmax=768: 768 KB, in L2)
  constexpr int64_t T = kPanels * kNR;
  const int64_t ntiles = (N + T - 1) / T;
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::min<int64_t>(std::max(1, at::get_num_threads()), ntiles);
  // outputs of several MB are written with streaming stores (each score line is written once)
  const bool stream = out.nbytes() >= (size_t(8) << 20);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    mat::TileRows<scalar_t, float> tiles{x.const_data_ptr<scalar_t>(), x.stride(0), dmax, {}};
    std::vector<float> xp(static_cast<size_t>(kPanels * dmax * kNR));
    std::vector<float> xinv(static_cast<size_t>(kPanels * P * kNR));
    for (int64_t tile = next_tile.fetch_add(1); tile < ntiles; tile = next_tile.fetch_add(1)) {
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      const int64_t npanels = (nt + kNR - 1) / kNR;
      int64_t ld = 0;
      const float* rows = tiles.load(n0, nt, ld);
      for (int64_t j = 0; j < npanels; ++j) {
        float* xpj = xp.data() + j * dmax * kNR;
        mat::pack_corpus_panel(rows + j * kNR * ld, ld, std::min<int64_t>(kNR, nt - j * kNR), 0, dmax, 0, xpj);
        if (s.cosine) mat::panel_inv_norms(xpj, s.dims.data(), P, xinv.data() + j * P * kNR);
      }
      for (int64_t i = 0; i < nqp; ++i) {
        const int64_t b0 = i * kMR, mr = std::min<int64_t>(kMR, B - b0);
        for (int64_t j = 0; j < npanels; ++j) {
          const int64_t c0 = n0 + j * kNR, nc = std::min<int64_t>(kNR, N - c0);
          const float* inv = xinv.data() + j * P * kNR;
          mat::prefix_micro_tile(qp.data() + i * dmax * kMR, xp.data() + j * dmax * kNR, s.dims.data(), P,
                                 [&](int64_t p, const mat::vf (&acc)[kMR][2]) {
                                   for (int64_t r = 0; r < mr; ++r) {
                                     mat::vf v0 = acc[r][0], v1 = acc[r][1];
                                     if (s.cosine) {
                                       const float iq = qinv[p * B + b0 + r];
                                       v0 = mat::cosine_lanes(v0, iq, mat::loadu(inv + p * kNR));
                                       v1 = mat::cosine_lanes(v1, iq, mat::loadu(inv + p * kNR + mat::kVec));
                                     }
                                     float* dst = o + (p * B + b0 + r) * N + c0;
                                     if (nc == kNR && stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
                                       mat::store_stream(dst, v0);
                                       mat::store_stream(dst + mat::kVec, v1);
                                     } else if (nc == kNR) {
                                       mat::storeu(dst, v0);
                                       mat::storeu(dst + mat::kVec, v1);
                                     } else {
                                       float buf[kNR];
                                       mat::storeu(buf, v0);
                                       mat::storeu(buf + mat::kVec, v1);
                                       std::copy(buf, buf + nc, dst);
                                     }
                                   }
                                 });
        }
      }
    }
    if (stream) mat::stream_fence();
  });
}

template <typename scalar_t>
void similarity_kernel(const at::Tensor& q_acc, const at::Tensor& x, const MatryoshkaShape& s,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s.B, N = s.N, P = static_cast<int64_t>(s.dims.size());
  const int64_t dmax = s.dims.back();
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  const int64_t D = q_acc.size(1);
  std::vector<acc_t> qinv(P * B);
  mat::prefix_inv_norms(q, D, B, s.dims, qinv.data(), B);
  acc_t* o = out.data_ptr<acc_t>();
  const int64_t T = gemm_tile_rows(B);
  const int64_t ntiles = (N + T - 1) / T;
  const auto acc_opts = q_acc.options();
  // tiles are handed out dynamically (an atomic counter), so a thread that the OS preempts does
  // not hold the others up; results do not depend on which thread scored which tile.
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::min<int64_t>(std::max(1, at::get_num_threads()), ntiles);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    mat::TileRows<scalar_t, acc_t> tiles{x.const_data_ptr<scalar_t>(), x.stride(0), dmax, {}};
    at::Tensor R = at::empty({B, T}, acc_opts);
    std::vector<acc_t> xinv(P * T);
    for (int64_t tile = next_tile.fetch_add(1); tile < ntiles; tile = next_tile.fetch_add(1)) {
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      int64_t ld = 0;
      const acc_t* rows = tiles.load(n0, nt, ld);
      if (s.cosine) mat::prefix_inv_norms(rows, ld, nt, s.dims, xinv.data(), T);
      at::Tensor xt = at::from_blob(const_cast<acc_t*>(rows), {nt, dmax}, {ld, 1}, acc_opts);
      at::Tensor Rt = R.narrow(1, 0, nt);
      int64_t a = 0;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t e = s.dims[p];
        Rt.addmm_(q_acc.narrow(1, a, e - a), xt.narrow(1, a, e - a).t(), p == 0 ? 0 : 1, 1);
        a = e;
        const acc_t* r = R.const_data_ptr<acc_t>();
        for (int64_t b = 0; b < B; ++b) {
          acc_t* dst = o + (p * B + b) * N + n0;
          const acc_t* src = r + b * T;
          if (s.cosine) {
            const acc_t iq = qinv[p * B + b];
            const acc_t* ix = xinv.data() + p * T;
            for (int64_t j = 0; j < nt; ++j) dst[j] = mat::cosine_from_dot(src[j], iq, ix[j]);
          } else {
            std::copy(src, src + nt, dst);
          }
        }
      }
    }
  });
}

void similarity_cpu_kernel(const at::Tensor& q_acc, const at::Tensor& x, const MatryoshkaShape& s, at::Tensor& out) {
  EMBEDOPS_DISPATCH_FLOATING(x.scalar_type(), "matryoshka_similarity_cpu", [&] {
    if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
      if (mat::use_prefix_micro(s.B, s.dims.back())) {
        similarity_packed<scalar_t>(q_acc, x, s, out);
        return;
      }
    }
    similarity_kernel<scalar_t>(q_acc, x, s, out);
  });
}

void inv_norms_cpu_kernel(const at::Tensor& x, const MatryoshkaShape& s, at::Tensor& out) {
  EMBEDOPS_DISPATCH_FLOATING(x.scalar_type(), "matryoshka_inv_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* o = out.data_ptr<acc_t>();
    constexpr int64_t T = 1024;
    at::parallel_for(0, (s.N + T - 1) / T, 1, [&](int64_t t0, int64_t t1) {
      mat::TileRows<scalar_t, acc_t> tiles{x.const_data_ptr<scalar_t>(), x.stride(0), s.dims.back(), {}};
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n0 = tile * T, nt = std::min(T, s.N - n0);
        int64_t ld = 0;
        const acc_t* rows = tiles.load(n0, nt, ld);
        mat::prefix_inv_norms(rows, ld, nt, s.dims, o + n0, s.N);
      }
    });
  });
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(matryoshka_similarity_stub, &similarity_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(matryoshka_inv_norms_stub, &inv_norms_cpu_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops
