// multiplexed_embedding_bag backward and fused optimizer update on CUDA, deterministic.
//
// 1. One (row, k) pair per contribution: k = i * maxP + p for (id i, probe p) with sum/mean
//    pooling, k = the argmax element for max pooling (rows hashed in-kernel with hashing.h).
// 2. cub::DeviceRadixSort sorts the pairs by row (stable: k ascending within a row), then
//    cub::DeviceRunLengthEncode + an exclusive scan give each distinct row its segment.
// 3. One warp per row sums its segment in that fixed order (fp32/opmath registers) and writes
//    the dense gradient row, or applies SGD / row-wise Adagrad to the row in place.
// No float atomics anywhere: identical bits run to run. Temporary storage comes from torch's
// caching allocator (at::empty byte tensors).

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
#include "embedding/cuda/embedding_layout.cuh"
#include "embedding/hashing.h"

namespace embedops {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;

enum class RowOp : int { kDense = 0, kSGD = 1, kAdagrad = 2 };

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, 65535LL * 16)));
}

__global__ void init_pairs_kernel(int64_t* __restrict__ keys, int64_t* __restrict__ vals, int64_t n, int64_t sentinel,
                                  const int64_t* __restrict__ argmax) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (argmax != nullptr) {
      const int64_t r = argmax[k];
      keys[k] = r >= 0 ? r : sentinel;
    } else {
      keys[k] = sentinel;
    }
    vals[k] = k;
  }
}

// Sum/mean pooling: warp per bag; keys[i * maxP + p] = row(i, p) for p < P_f; bag_of[i] = j.
template <typename index_t>
__global__ void hash_pairs_kernel(DeviceLayout L, const index_t* __restrict__ vals, const int64_t* __restrict__ offs,
                                  int64_t num_values, int64_t max_probes, int64_t* __restrict__ keys,
                                  int64_t* __restrict__ bag_of) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t nbags = L.num_features * L.batch;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp; j < nbags; j += warps) {
    int64_t start, end;
    bag_bounds(offs, j, num_values, &start, &end);
    const int64_t f = j / L.batch, P = L.probes[f], q0 = L.pbase[f];
    for (int64_t i = start + lane; i < end; i += kWarp) {
      bag_of[i] = j;
      for (int64_t p = 0; p < P; ++p)
        keys[i * max_probes + p] =
            hash_row(static_cast<int64_t>(vals[i]), L.salts[q0 + p], static_cast<uint64_t>(L.num_rows));
    }
  }
}

// One warp per distinct row: sums the row's contributions in sorted (k ascending) order.
template <typename scalar_t, bool kMax, int kRowOp>
__global__ void segment_kernel(DeviceLayout L, const int64_t* __restrict__ unique_rows,
                               const int64_t* __restrict__ seg_count, const int64_t* __restrict__ seg_start,
                               const int64_t* __restrict__ num_runs, const int64_t* __restrict__ sorted_k,
                               const int64_t* __restrict__ bag_of, const int64_t* __restrict__ offs,
                               int64_t num_values, int64_t max_probes, const scalar_t* __restrict__ psw,
                               const scalar_t* __restrict__ g, scalar_t* __restrict__ dst,
                               at::opmath_type<scalar_t>* __restrict__ state, at::opmath_type<scalar_t> lr,
                               at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t runs = *num_runs;
  const int64_t D = L.dim, QD = L.num_blocks * L.dim;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp; s < runs; s += warps) {
    const int64_t row = unique_rows[s];
    if (row < 0 || row >= L.num_rows) continue;  // the sentinel: no contribution
    const int64_t first = seg_start[s], last = first + seg_count[s];
    // the row's gradient at columns d0 + lane + v * 32 (v < kVec), summed in sorted order
    auto chunk = [&](int64_t d0, acc_t (&acc)[kVec]) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[v] = acc_t(0);
      for (int64_t e = first; e < last; ++e) {
        const int64_t k = sorted_k[e];
        if constexpr (kMax) {
          const int64_t b = k / QD, c = k - b * QD, q = c / D, d = c - q * D;
          const int64_t f = L.feat_of_block[q];
          const int64_t rel = d - d0;
          if (rel >= 0 && rel < kWarp * kVec && rel % kWarp == lane) {
            const acc_t cs = combine_scale<acc_t>(L.combine, L.probes[f]);
            const int64_t src = b * L.out_dim + out_column(L.combine, q, f, d, D);
#pragma unroll
            for (int v = 0; v < kVec; ++v)
              if (rel / kWarp == v) acc[v] += cs * static_cast<acc_t>(g[src]);
          }
        } else {
          const int64_t i = k / max_probes, p = k - i * max_probes;
          const int64_t j = bag_of[i], f = j / L.batch, b = j - f * L.batch;
          int64_t start, end;
          bag_bounds(offs, j, num_values, &start, &end);
          acc_t scale = pool_scale<acc_t>(L.mode, end - start) * combine_scale<acc_t>(L.combine, L.probes[f]);
          if (psw != nullptr) scale *= static_cast<acc_t>(psw[i]);
          const scalar_t* gs = g + b * L.out_dim + out_column(L.combine, L.pbase[f] + p, f, 0, D);
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            const int64_t d = d0 + lane + v * kWarp;
            if (d < D) acc[v] += scale * static_cast<acc_t>(gs[d]);
          }
        }
      }
    };
    acc_t mult = lr;
    if constexpr (kRowOp == static_cast<int>(RowOp::kAdagrad)) {
      acc_t sq = 0;
      for (int64_t d0 = 0; d0 < D; d0 += kWarp * kVec) {
        acc_t acc[kVec];
        chunk(d0, acc);
#pragma unroll
        for (int v = 0; v < kVec; ++v) sq += acc[v] * acc[v];
      }
      for (int o = kWarp / 2; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
      acc_t st = state[row];
      mult = rowwise_adagrad_multiplier<acc_t>(st, sq / static_cast<acc_t>(D), lr, eps);
      __syncwarp();
      if (lane == 0) state[row] = st;
    }
    for (int64_t d0 = 0; d0 < D; d0 += kWarp * kVec) {
      acc_t acc[kVec];
      chunk(d0, acc);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t d = d0 + lane + v * kWarp;
        if (d < D) {
          scalar_t* p = dst + row * D + d;
          if constexpr (kRowOp == static_cast<int>(RowOp::kDense)) {
            *p = static_cast<scalar_t>(acc[v]);
          } else {
            *p = static_cast<scalar_t>(static_cast<acc_t>(*p) - mult * acc[v]);
          }
        }
      }
    }
  }
}

// d out / d psw[i] = combine_scale * sum_p <grad_out block, weight[row(i, p)]>: warp per bag.
template <typename scalar_t, typename index_t>
__global__ void psw_grad_kernel(DeviceLayout L, const index_t* __restrict__ vals, const int64_t* __restrict__ offs,
                                int64_t num_values, const scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                                scalar_t* __restrict__ gp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t nbags = L.num_features * L.batch, D = L.dim;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp; j < nbags; j += warps) {
    int64_t start, end;
    bag_bounds(offs, j, num_values, &start, &end);
    const int64_t f = j / L.batch, b = j - f * L.batch, P = L.probes[f], q0 = L.pbase[f];
    const acc_t cs = combine_scale<acc_t>(L.combine, P);
    for (int64_t i = start; i < end; ++i) {
      acc_t total = 0;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t r =
            hash_row(static_cast<int64_t>(vals[i]), L.salts[q0 + p], static_cast<uint64_t>(L.num_rows));
        const scalar_t* gs = g + b * L.out_dim + out_column(L.combine, q0 + p, f, 0, D);
        acc_t dot = 0;
        for (int64_t d = lane; d < D; d += kWarp) dot += static_cast<acc_t>(gs[d]) * static_cast<acc_t>(w[r * D + d]);
        for (int o = kWarp / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        total += dot;
      }
      if (lane == 0) gp[i] = static_cast<scalar_t>(total * cs);
    }
  }
}

// The (row, k) pairs of the sorted-row pass: one per (id, probe) for sum/mean pooling, one per
// argmax element for max pooling.
int64_t contribution_count(const BagLayout& L, int64_t num_values) {
  return L.mode == PoolMode::kMax ? L.batch * L.num_blocks * L.dim : num_values * L.max_probes;
}

// cub::DeviceRunLengthEncode::Encode takes its item count as int (CCCL 3.0): a larger count would
// be truncated (rows silently dropped from the gradient, or a negative count), so it is refused.
void check_contribution_count(const char* op, const BagLayout& L, int64_t num_values) {
  const int64_t K = contribution_count(L, num_values);
  TORCH_CHECK_VALUE(K <= std::numeric_limits<int>::max(), op, ": on CUDA the gradient reduction handles at most ",
                    std::numeric_limits<int>::max(), " ",
                    L.mode == PoolMode::kMax ? "argmax elements (B * Q * D)"
                                             : "(id, probe) pairs (len(values) * max(num_probes))",
                    " per call, got ", K, "; split the batch into smaller calls");
}

at::Tensor temp_bytes(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// Steps 1-3 of the header comment; dst is the dense gradient (kDense) or the weight (updates).
template <typename scalar_t, typename index_t>
void sorted_row_pass(const BagLayout& L, const DeviceLayout& dl, RowOp op, const at::Tensor& v, const at::Tensor& offs,
                     const scalar_t* psw, const at::Tensor& argmax, const scalar_t* g, scalar_t* dst,
                     at::opmath_type<scalar_t>* state, double lr, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool is_max = L.mode == PoolMode::kMax;
  const int64_t n = v.numel();
  const int64_t K = contribution_count(L, n);
  TORCH_INTERNAL_ASSERT(K <= std::numeric_limits<int>::max());  // check_contribution_count ran
  if (K == 0) return;
  const at::TensorOptions lopt = v.options().dtype(at::kLong);
  at::Tensor keys = at::empty({K}, lopt), kidx = at::empty({K}, lopt);
  at::Tensor keys_sorted = at::empty({K}, lopt), kidx_sorted = at::empty({K}, lopt);
  at::Tensor bag_of = at::empty({is_max ? 1 : n}, lopt);
  const int64_t sentinel = L.num_rows;
  init_pairs_kernel<<<grid_for(K, 256), 256, 0, stream>>>(keys.data_ptr<int64_t>(), kidx.data_ptr<int64_t>(), K,
                                                          sentinel, is_max ? argmax.const_data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t nbags = L.num_features * L.batch;
  if (!is_max) {
    hash_pairs_kernel<index_t><<<grid_for(nbags, kWarpsPerBlock), kThreads, 0, stream>>>(
        dl, v.const_data_ptr<index_t>(), offs.const_data_ptr<int64_t>(), n, L.max_probes, keys.data_ptr<int64_t>(),
        bag_of.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  int end_bit = 1;
  while (end_bit < 63 && (sentinel >> end_bit) != 0) ++end_bit;
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys.const_data_ptr<int64_t>(),
                                                 keys_sorted.data_ptr<int64_t>(), kidx.const_data_ptr<int64_t>(),
                                                 kidx_sorted.data_ptr<int64_t>(), K, 0, end_bit, stream));
  at::Tensor tmp = temp_bytes(bytes, keys);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp.data_ptr(), bytes, keys.const_data_ptr<int64_t>(),
                                                 keys_sorted.data_ptr<int64_t>(), kidx.const_data_ptr<int64_t>(),
                                                 kidx_sorted.data_ptr<int64_t>(), K, 0, end_bit, stream));
  at::Tensor unique_rows = keys;  // reuse: the unsorted keys are no longer needed
  at::Tensor counts = at::zeros({K}, lopt);  // zeros past num_runs: the scan reads no uninitialised memory
  at::Tensor starts = at::empty({K}, lopt);
  at::Tensor num_runs = at::empty({1}, lopt);
  bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, bytes, keys_sorted.const_data_ptr<int64_t>(),
                                                    unique_rows.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                                    num_runs.data_ptr<int64_t>(), K, stream));
  tmp = temp_bytes(bytes, keys);
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(tmp.data_ptr(), bytes, keys_sorted.const_data_ptr<int64_t>(),
                                                    unique_rows.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                                    num_runs.data_ptr<int64_t>(), K, stream));
  bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, counts.const_data_ptr<int64_t>(),
                                               starts.data_ptr<int64_t>(), K, stream));
  tmp = temp_bytes(bytes, keys);
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), bytes, counts.const_data_ptr<int64_t>(),
                                               starts.data_ptr<int64_t>(), K, stream));
  // K is an upper bound of the number of runs; the kernel reads the real count on the device
  const unsigned grid = grid_for(K, kWarpsPerBlock);
  const acc_t alr = static_cast<acc_t>(lr), aeps = static_cast<acc_t>(eps);
  const int64_t* bo = is_max ? nullptr : bag_of.const_data_ptr<int64_t>();
  const int64_t* o = offs.const_data_ptr<int64_t>();
  EMBEDOPS_BOOL_SWITCH(is_max, kMax, [&] {
    switch (op) {
      case RowOp::kDense:
        segment_kernel<scalar_t, kMax, 0><<<grid, kThreads, 0, stream>>>(
            dl, unique_rows.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), num_runs.const_data_ptr<int64_t>(), kidx_sorted.const_data_ptr<int64_t>(),
            bo, o, n, L.max_probes, psw, g, dst, state, alr, aeps);
        break;
      case RowOp::kSGD:
        segment_kernel<scalar_t, kMax, 1><<<grid, kThreads, 0, stream>>>(
            dl, unique_rows.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), num_runs.const_data_ptr<int64_t>(), kidx_sorted.const_data_ptr<int64_t>(),
            bo, o, n, L.max_probes, psw, g, dst, state, alr, aeps);
        break;
      case RowOp::kAdagrad:
        segment_kernel<scalar_t, kMax, 2><<<grid, kThreads, 0, stream>>>(
            dl, unique_rows.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), num_runs.const_data_ptr<int64_t>(), kidx_sorted.const_data_ptr<int64_t>(),
            bo, o, n, L.max_probes, psw, g, dst, state, alr, aeps);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void embedding_bag_backward_cuda(const BagLayout& L, int64_t seed, const BagBackwardInputs& in,
                                 const at::Tensor& w, at::Tensor& grad_weight, at::Tensor& grad_psw) {
  constexpr const char* op = "multiplexed_embedding_bag_backward";
  const c10::cuda::CUDAGuard guard(w.device());
  const bool weight_grad = grad_weight.numel() > 0, psw_grad = grad_psw.numel() > 0;
  if (weight_grad) check_contribution_count(op, L, in.v.numel());
  const int64_t nbags = L.num_features * L.batch;
  if (nbags == 0) return;
  DeviceLayoutHolder dl(L, seed, w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EMBEDOPS_DISPATCH_FLOATING(w.scalar_type(), "multiplexed_embedding_bag_backward_cuda", [&] {
    const scalar_t* g = in.g.const_data_ptr<scalar_t>();
    const scalar_t* psw = in.has_psw ? in.psw.const_data_ptr<scalar_t>() : nullptr;
    EMBEDOPS_DISPATCH_INDEX(in.v.scalar_type(), "multiplexed_embedding_bag_backward_cuda", [&] {
      if (weight_grad) {
        sorted_row_pass<scalar_t, index_t>(L, dl.view(), RowOp::kDense, in.v, in.offs, psw, in.argmax, g,
                                           grad_weight.data_ptr<scalar_t>(), nullptr, 0.0, 0.0);
      }
      if (psw_grad && L.mode == PoolMode::kSum) {
        psw_grad_kernel<scalar_t, index_t><<<grid_for(nbags, kWarpsPerBlock), kThreads, 0, stream>>>(
            dl.view(), in.v.const_data_ptr<index_t>(), in.offs.const_data_ptr<int64_t>(), in.v.numel(),
            w.const_data_ptr<scalar_t>(), g, grad_psw.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void embedding_bag_update_cuda(const BagLayout& L, int64_t seed, const BagBackwardInputs& in, at::Tensor& weight,
                               at::Tensor& state, Optimizer opt, double lr, double eps) {
  constexpr const char* op = "multiplexed_embedding_bag_update";
  const c10::cuda::CUDAGuard guard(weight.device());
  check_contribution_count(op, L, in.v.numel());
  if (L.num_features * L.batch == 0) return;
  DeviceLayoutHolder dl(L, seed, weight.device());
  EMBEDOPS_DISPATCH_FLOATING(weight.scalar_type(), "multiplexed_embedding_bag_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = in.g.const_data_ptr<scalar_t>();
    const scalar_t* psw = in.has_psw ? in.psw.const_data_ptr<scalar_t>() : nullptr;
    acc_t* st = opt == Optimizer::kRowwiseAdagrad ? state.data_ptr<acc_t>() : nullptr;
    EMBEDOPS_DISPATCH_INDEX(in.v.scalar_type(), "multiplexed_embedding_bag_update_cuda", [&] {
      sorted_row_pass<scalar_t, index_t>(L, dl.view(), opt == Optimizer::kSGD ? RowOp::kSGD : RowOp::kAdagrad, in.v,
                                         in.offs, psw, in.argmax, g, weight.data_ptr<scalar_t>(), st, lr, eps);
    });
  });
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(embedding_bag_backward_stub, &embedding_bag_backward_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(embedding_bag_update_stub, &embedding_bag_update_cuda);

}  // namespace embedops
