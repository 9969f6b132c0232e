// hash_ids on CUDA: one thread per id, the same hashing.h as the CPU kernel.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/hashing.h"

namespace embedops {
namespace {

template <typename index_t>
__global__ void hash_ids_kernel(const index_t* __restrict__ in, int64_t* __restrict__ out, int64_t n,
                                uint64_t salt, uint64_t num_rows) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = hash_row(static_cast<int64_t>(in[i]), salt, num_rows);
  }
}

at::Tensor hash_ids_cuda(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows,
                         int64_t seed) {
  check_hash_ids_args(values, feature, probe, num_rows);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous();
  at::Tensor rows = at::empty(values.sizes(), values.options().dtype(at::kLong));
  const int64_t n = v.numel();
  if (n == 0) return rows;
  const uint64_t salt = hash_salt(seed, static_cast<uint32_t>(feature), static_cast<uint32_t>(probe));
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "hash_ids_cuda", [&] {
    hash_ids_kernel<index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        v.const_data_ptr<index_t>(), rows.data_ptr<int64_t>(), n, salt, static_cast<uint64_t>(num_rows));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedops, CUDA, m) { m.impl("hash_ids", &hash_ids_cuda); }

}  // namespace embedops
