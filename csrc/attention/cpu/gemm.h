#pragma once
// Attention family, CPU (per CPU level): GEMM on raw strided tiles.
// Column-major BLAS convention (like ATen's cpublas): C (m x n, ldc) = alpha op(A) op(B) + beta C.
// x86 torch wheels export MKL's Fortran sgemm_/dgemm_ from libtorch_cpu; they are called
// directly (single-threaded inside our parallel region, no tensor wrapping). Where a torch build
// does not export them (weak symbols resolve to null), the same product goes through at::addmm
// on from_blob views.

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace embedops {
namespace CPU_CAPABILITY {
namespace attn_cpu {

enum class TransposeType { NoTranspose, Transpose };

template <typename T>
inline void gemm_aten(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const bool an = ta == TransposeType::NoTranspose, bn = tb == TransposeType::NoTranspose;
  // a stored column-major (rows x cols, ld) is the row-major (cols x rows, strides (ld, 1)) tensor of its transpose
  at::Tensor At = at::from_blob(const_cast<T*>(a), {an ? k : m, an ? m : k}, {lda, 1}, opts);
  at::Tensor Bt = at::from_blob(const_cast<T*>(b), {bn ? n : k, bn ? k : n}, {ldb, 1}, opts);
  at::Tensor Ct = at::from_blob(c, {n, m}, {ldc, 1}, opts);
  // C^T = op(B)^T op(A)^T
  const at::Tensor x = bn ? Bt : Bt.t(), y = an ? At : At.t();
  if (beta == T(0)) Ct.zero_();
  Ct.addmm_(x, y, beta == T(0) ? T(1) : beta, alpha);
}

template <typename T>
inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  auto fn = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_;
    else return dgemm_;
  }();
  if (fn == nullptr || m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax || ldc > kMax) {
    gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char tra = ta == TransposeType::NoTranspose ? 'N' : 'T', trb = tb == TransposeType::NoTranspose ? 'N' : 'T';
  // BLAS wants ld >= the stored row count even for a single column
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(std::max<int64_t>(lda, std::max<int64_t>(1, tra == 'N' ? m : k)));
  const int ib = static_cast<int>(std::max<int64_t>(ldb, std::max<int64_t>(1, trb == 'N' ? k : n)));
  const int ic = static_cast<int>(std::max<int64_t>(ldc, std::max<int64_t>(1, m)));
  fn(&tra, &trb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

}  // namespace attn_cpu
}  // namespace CPU_CAPABILITY
}  // namespace embedops
