// hash_ids, the CUDA kernel: one thread per id, the same hashing.h as the CPU kernel (the host
// side is hash_ids.cpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
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

void hash_ids_cuda(const at::Tensor& v, uint64_t salt, uint64_t num_rows, at::Tensor& rows) {
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t n = v.numel();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "hash_ids_cuda", [&] {
    hash_ids_kernel<index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        v.const_data_ptr<index_t>(), rows.data_ptr<int64_t>(), n, salt, num_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(hash_ids_stub, &hash_ids_cuda);

}  // namespace embedops
