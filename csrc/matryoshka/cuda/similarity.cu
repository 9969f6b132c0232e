// matryoshka_similarity and matryoshka_inv_norms, the CUDA kernels (the host side, shared with the
// CPU, is similarity.cpp).
//
// similarity: the raw dot products of all prefixes come from ONE pass of segment GEMMs (cuBLAS via
// ATen): out[0] = Q[:, :d0] X[:, :d0]^T, out[p] = out[p-1] + Q[:, d_{p-1}:d_p] X[:, d_{p-1}:d_p]^T,
// over corpus chunks; then one elementwise kernel applies the cosine rule of topk.h with the
// per-prefix inverse norms (computed by a warp-per-row kernel, the same rule as the CPU).

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common/dispatch.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"
#include "matryoshka/cuda/select.cuh"
#include "matryoshka/topk.h"

namespace embedops {

// Shared with topk.cu: per-prefix inverse norms of `rows` rows of x (row stride ld) into
// out (P, out_ld), on the current stream.
void launch_inv_norms(const at::Tensor& x, int64_t ld, int64_t rows, const std::vector<int64_t>& dims,
                      const at::Tensor& out, int64_t out_offset, int64_t out_ld);

mat::DimList make_dim_list(const char* op, const std::vector<int64_t>& dims) {
  TORCH_CHECK_VALUE(dims.size() <= static_cast<size_t>(mat::kMaxDimsCuda), op, ": at most ", mat::kMaxDimsCuda,
                    " prefix sizes are supported on CUDA, got ", dims.size());
  mat::DimList l{};
  l.n = static_cast<int>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) l.d[i] = dims[i];
  return l;
}

void launch_inv_norms(const at::Tensor& x, int64_t ld, int64_t rows, const std::vector<int64_t>& dims,
                      const at::Tensor& out, int64_t out_offset, int64_t out_ld) {
  if (rows == 0) return;
  const mat::DimList dl = make_dim_list("matryoshka_inv_norms", dims);
  constexpr int kWarps = mat::kThreads / 32;
  const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, 65535LL * 4);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EMBEDOPS_DISPATCH_FLOATING(x.scalar_type(), "matryoshka_inv_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mat::inv_norms_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), mat::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), ld, rows, dl, out.data_ptr<acc_t>() + out_offset, out_ld);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

template <typename acc_t>
__global__ void cosine_scale_kernel(acc_t* __restrict__ out, int64_t P, int64_t B, int64_t N,
                                    const acc_t* __restrict__ qinv, const acc_t* __restrict__ xinv) {
  const int64_t total = P * B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i % N;
    const int64_t pb = i / N;
    const int64_t p = pb / B;
    out[i] = mat::cosine_from_dot(out[i], qinv[pb], xinv[p * N + n]);
  }
}

void matryoshka_inv_norms_cuda(const at::Tensor& x, const MatryoshkaShape& s, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  launch_inv_norms(x, x.stride(0), s.N, s.dims, out, 0, s.N);
}

void matryoshka_similarity_cuda(const at::Tensor& q, const at::Tensor& x, const MatryoshkaShape& s, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::ScalarType acc = q.scalar_type();
  const int64_t P = static_cast<int64_t>(s.dims.size());
  const int64_t dmax = s.dims.back();
  // chunks bound the temporary converted copy of low-precision corpora
  const int64_t T = x.scalar_type() == acc ? s.N : std::max<int64_t>(1024, (int64_t{1} << 25) / dmax);
  for (int64_t n0 = 0; n0 < s.N; n0 += T) {
    const int64_t nt = std::min(T, s.N - n0);
    at::Tensor xc = x.narrow(0, n0, nt).narrow(1, 0, dmax);
    if (xc.scalar_type() != acc) xc = xc.to(acc);
    int64_t a = 0;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t e = s.dims[p];
      at::Tensor dst = out[p].narrow(1, n0, nt);
      if (p == 0) {
        dst.addmm_(q.narrow(1, 0, e), xc.narrow(1, 0, e).t(), 0, 1);
      } else {
        dst.copy_(out[p - 1].narrow(1, n0, nt));
        dst.addmm_(q.narrow(1, a, e - a), xc.narrow(1, a, e - a).t(), 1, 1);
      }
      a = e;
    }
  }
  if (s.cosine) {
    at::Tensor qinv = at::empty({P, s.B}, out.options());
    at::Tensor xinv = at::empty({P, s.N}, out.options());
    launch_inv_norms(q, q.stride(0), s.B, s.dims, qinv, 0, s.B);
    launch_inv_norms(x, x.stride(0), s.N, s.dims, xinv, 0, s.N);
    const int64_t total = P * s.B * s.N;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535LL * 8);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "matryoshka_cosine_scale", [&] {
      cosine_scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          out.data_ptr<scalar_t>(), P, s.B, s.N, qinv.const_data_ptr<scalar_t>(), xinv.const_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(matryoshka_similarity_stub, &matryoshka_similarity_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(matryoshka_inv_norms_stub, &matryoshka_inv_norms_cuda);

}  // namespace embedops
