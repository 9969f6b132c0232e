// multiplexed_embedding_bag forward on CUDA over a uint8 row-quantised table (embedding/quantized.h:
// rows of D codes, float32 scale, float32 bias): one warp per bag (f, b), as the float kernel
// (embedding_bag_fwd.cu). Every lane hashes the id with hashing.h, reads the row's scale and bias
// (quantized.h: int8_row_terms, the same function as the CPU kernel) and accumulates kVec of the
// row's codes (consecutive lanes read consecutive bytes) into float32 registers with
// int8_accumulate (acc + w * bias + w * scale * code). Max pooling compares int8_value. Offsets are checked on the device as for the float kernel: a bad bag is
// clamped into [0, N) and raises the error flag that the host reads when validate=True.

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/dispatch.h"
#include "embedding/cuda/embedding_layout.cuh"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
#include "embedding/hashing.h"
#include "embedding/quantized.h"

namespace embedops {
namespace {

template <typename index_t, int kMode, bool kPsw>
__global__ void forward_int8_kernel(DeviceLayout L, const uint8_t* __restrict__ w, const index_t* __restrict__ vals,
                                    const int64_t* __restrict__ offs, int64_t num_values,
                                    const float* __restrict__ psw, float* __restrict__ out, int* __restrict__ error) {
  constexpr bool kMax = kMode == static_cast<int>(PoolMode::kMax);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t nbags = L.num_features * L.batch;
  const int64_t D = L.dim;
  const int64_t stride = D + kInt8RowExtraBytes;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp; j < nbags;
       j += warps) {
    int64_t start, end;
    if (!bag_bounds(offs, j, num_values, &start, &end) && lane == 0) atomicOr(error, 1);
    const int64_t f = j / L.batch, b = j - f * L.batch;
    const int64_t P = L.probes[f], q0 = L.pbase[f];
    const float ps = pool_scale<float>(kMode, end - start);
    const float cs = combine_scale<float>(L.combine, P);
    float* o = out + b * L.out_dim;
    for (int64_t d0 = 0; d0 < D; d0 += kWarp * kVec) {
      float total[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) total[v] = 0.0f;
      for (int64_t p = 0; p < P; ++p) {
        const uint64_t salt = L.salts[q0 + p];
        float acc[kVec];
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[v] = kMax ? -INFINITY : 0.0f;
#pragma unroll 4
        for (int64_t i = start; i < end; ++i) {
          const int64_t r = hash_row(static_cast<int64_t>(vals[i]), salt, static_cast<uint64_t>(L.num_rows));
          const uint8_t* row = w + r * stride;
          const Int8RowTerms tm = int8_row_terms(row, D, kPsw ? psw[i] : 1.0f);
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            const int64_t d = d0 + lane + v * kWarp;
            if (d < D) {
              const uint8_t c = row[d];
              if constexpr (kMax) {
                const float x = int8_value(tm, c);
                acc[v] = x > acc[v] ? x : acc[v];
              } else {
                acc[v] = int8_accumulate(acc[v], tm, static_cast<float>(c));
              }
            }
          }
        }
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const int64_t d = d0 + lane + v * kWarp;
          if (d < D) {
            const float pooled = kMax && end == start ? 0.0f : acc[v];  // an empty bag pools to 0
            if (L.combine == static_cast<int>(Combine::kConcat)) {
              o[(q0 + p) * D + d] = pooled * ps;
            } else {
              total[v] += pooled * ps;
            }
          }
        }
      }
      if (L.combine != static_cast<int>(Combine::kConcat)) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const int64_t d = d0 + lane + v * kWarp;
          if (d < D) o[f * D + d] = total[v] * cs;
        }
      }
    }
  }
}

void embedding_bag_forward_int8_cuda(const BagLayout& L, int64_t seed, const at::Tensor& w, const at::Tensor& v,
                                     const at::Tensor& offs, const at::Tensor& psw, bool validate, at::Tensor& out,
                                     at::Tensor& argmax) {
  (void)argmax;  // quantised tables have no backward: no argmax
  const c10::cuda::CUDAGuard guard(w.device());
  const bool has_psw = psw.defined();
  const int64_t nbags = L.num_features * L.batch;
  if (nbags == 0) {
    if (validate) check_offsets_cpu(kBagOp, offs.cpu(), v.numel());
    return;
  }
  DeviceLayoutHolder dl(L, seed, w.device());
  at::Tensor error = at::zeros({1}, w.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t warps_per_block = kThreads / kWarp;
  const int64_t blocks = std::min<int64_t>((nbags + warps_per_block - 1) / warps_per_block, 65535LL * 16);
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const float* pp = has_psw ? psw.const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t* o = offs.const_data_ptr<int64_t>();
  int* err = error.data_ptr<int>();
  EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "multiplexed_embedding_bag_int8_cuda", [&] {
    const index_t* vp = v.const_data_ptr<index_t>();
    const DeviceLayout d = dl.view();
    switch (L.mode) {
      case PoolMode::kSum:
        EMBEDOPS_BOOL_SWITCH(has_psw, kPsw, [&] {
          forward_int8_kernel<index_t, 0, kPsw><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              d, wp, vp, o, v.numel(), pp, op, err);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        break;
      case PoolMode::kMean:
        forward_int8_kernel<index_t, 1, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            d, wp, vp, o, v.numel(), pp, op, err);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      case PoolMode::kMax:
        forward_int8_kernel<index_t, 2, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            d, wp, vp, o, v.numel(), pp, op, err);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
    }
  });
  if (validate) raise_if_offsets_error(kBagOp, error, offs, v.numel());
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(embedding_bag_forward_int8_stub, &embedding_bag_forward_int8_cuda);

}  // namespace embedops
