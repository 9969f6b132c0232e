// multiplexed_embedding_bag forward on CUDA: one warp per bag (f, b); every lane hashes the id
// with hashing.h (the same function as the CPU kernel) and accumulates its columns of the rows
// (fp32/opmath registers, kVec columns per lane, D-chunks of 32 * kVec). Offsets are checked on
// the device: a bad bag is clamped into [0, N) (never read out of bounds) and raises an error
// flag that the host reads when validate=True (one 4-byte device-to-host copy: a stream sync).

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
#include "embedding/cuda/embedding_layout.cuh"
#include "embedding/hashing.h"

namespace embedops {
namespace {

template <typename scalar_t, typename index_t, int kMode, bool kPsw>
__global__ void forward_kernel(DeviceLayout L, const scalar_t* __restrict__ w, const index_t* __restrict__ vals,
                               const int64_t* __restrict__ offs, int64_t num_values,
                               const scalar_t* __restrict__ psw, scalar_t* __restrict__ out,
                               int64_t* __restrict__ argmax, int* __restrict__ error) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t nbags = L.num_features * L.batch;
  const int64_t D = L.dim;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp; j < nbags;
       j += warps) {
    int64_t start, end;
    if (!bag_bounds(offs, j, num_values, &start, &end) && lane == 0) atomicOr(error, 1);
    const int64_t f = j / L.batch, b = j - f * L.batch;
    const int64_t P = L.probes[f], q0 = L.pbase[f];
    const acc_t ps = pool_scale<acc_t>(kMode, end - start);
    const acc_t cs = combine_scale<acc_t>(L.combine, P);
    scalar_t* o = out + b * L.out_dim;
    for (int64_t d0 = 0; d0 < D; d0 += kWarp * kVec) {
      acc_t total[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) total[v] = acc_t(0);
      for (int64_t p = 0; p < P; ++p) {
        const uint64_t salt = L.salts[q0 + p];
        acc_t acc[kVec];
        int64_t arg[kVec];
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          acc[v] = acc_t(0);
          arg[v] = -1;
        }
#pragma unroll 4
        for (int64_t i = start; i < end; ++i) {
          const int64_t r = hash_row(static_cast<int64_t>(vals[i]), salt, static_cast<uint64_t>(L.num_rows));
          const scalar_t* wr = w + r * D;
          const acc_t s = kPsw ? static_cast<acc_t>(psw[i]) : acc_t(1);
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            const int64_t d = d0 + lane + v * kWarp;
            if (d < D) {
              const acc_t x = static_cast<acc_t>(wr[d]);
              if constexpr (kMode == static_cast<int>(PoolMode::kMax)) {
                if (i == start || x > acc[v]) {
                  acc[v] = x;
                  arg[v] = r;
                }
              } else {
                acc[v] += s * x;
              }
            }
          }
        }
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const int64_t d = d0 + lane + v * kWarp;
          if (d < D) {
            if (L.combine == static_cast<int>(Combine::kConcat)) {
              o[(q0 + p) * D + d] = static_cast<scalar_t>(acc[v] * ps);
            } else {
              total[v] += acc[v] * ps;
            }
            if constexpr (kMode == static_cast<int>(PoolMode::kMax)) {
              argmax[b * L.num_blocks * D + (q0 + p) * D + d] = arg[v];
            }
          }
        }
      }
      if (L.combine != static_cast<int>(Combine::kConcat)) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const int64_t d = d0 + lane + v * kWarp;
          if (d < D) o[f * D + d] = static_cast<scalar_t>(total[v] * cs);
        }
      }
    }
  }
}

void embedding_bag_forward_cuda(const BagLayout& L, int64_t seed, const at::Tensor& w, const at::Tensor& v,
                                const at::Tensor& offs, const at::Tensor& psw, bool validate, at::Tensor& out,
                                at::Tensor& argmax) {
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
  EMBEDOPS_DISPATCH_FLOATING(w.scalar_type(), "multiplexed_embedding_bag_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* pp = has_psw ? psw.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t* ap = L.mode == PoolMode::kMax ? argmax.data_ptr<int64_t>() : nullptr;
    const int64_t* o = offs.const_data_ptr<int64_t>();
    int* err = error.data_ptr<int>();
    EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "multiplexed_embedding_bag_cuda", [&] {
      const index_t* vp = v.const_data_ptr<index_t>();
      const DeviceLayout d = dl.view();
      switch (L.mode) {
        case PoolMode::kSum:
          EMBEDOPS_BOOL_SWITCH(has_psw, kPsw, [&] {
            forward_kernel<scalar_t, index_t, 0, kPsw><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                d, wp, vp, o, v.numel(), pp, op, ap, err);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
          break;
        case PoolMode::kMean:
          forward_kernel<scalar_t, index_t, 1, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              d, wp, vp, o, v.numel(), pp, op, ap, err);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          break;
        case PoolMode::kMax:
          forward_kernel<scalar_t, index_t, 2, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              d, wp, vp, o, v.numel(), pp, op, ap, err);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          break;
      }
    });
  });
  if (validate) raise_if_offsets_error(kBagOp, error, offs, v.numel());
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(embedding_bag_forward_stub, &embedding_bag_forward_cuda);

}  // namespace embedops
