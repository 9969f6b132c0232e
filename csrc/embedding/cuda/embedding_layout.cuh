#pragma once
// Pieces shared by the embedding family's CUDA files (device-side layout, offsets checks).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

#include "common/cuda_upload.cuh"
#include "embedding/embedding.h"
#include "embedding/hashing.h"

namespace embedops {

// The bag kernels' shape (forward, int8 forward, backward): a warp per (bag, probe), each lane
// kVec columns per step, kThreads threads a block.
constexpr const char* kBagOp = "multiplexed_embedding_bag";
constexpr int kWarp = 32;
constexpr int kVec = 4;
constexpr int kThreads = 128;

// BagLayout as kernels see it: per-feature arrays live in one small device tensor.
struct DeviceLayout {
  int64_t num_features, batch, num_rows, dim, num_blocks, out_dim;
  int mode, combine;
  const int64_t* probes;  // (F,)
  const int64_t* pbase;   // (F + 1,)
  const uint64_t* salts;  // (Q,) hash_salt(seed, f, p) of block q = pbase[f] + p
  const int64_t* feat_of_block;  // (Q,)
};

class DeviceLayoutHolder {
 public:
  DeviceLayoutHolder(const BagLayout& L, int64_t seed, const c10::Device& device) {
    const int64_t F = L.num_features, Q = L.num_blocks;
    std::vector<int64_t> host(F + (F + 1) + 2 * Q);
    for (int64_t f = 0; f < F; ++f) host[f] = L.probes[f];
    for (int64_t f = 0; f <= F; ++f) host[F + f] = L.pbase[f];
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t p = 0; p < L.probes[f]; ++p) {
        const int64_t q = L.pbase[f] + p;
        host[2 * F + 1 + q] =
            static_cast<int64_t>(hash_salt(seed, static_cast<uint32_t>(f), static_cast<uint32_t>(p)));
        host[2 * F + 1 + Q + q] = f;
      }
    }
    dev_ = upload_cached(std::move(host), device);  // a model's layout repeats: no copy after the first call
    view_.num_features = F;
    view_.batch = L.batch;
    view_.num_rows = L.num_rows;
    view_.dim = L.dim;
    view_.num_blocks = Q;
    view_.out_dim = L.out_dim;
    view_.mode = static_cast<int>(L.mode);
    view_.combine = static_cast<int>(L.combine);
    const int64_t* base = dev_.const_data_ptr<int64_t>();
    view_.probes = base;
    view_.pbase = base + F;
    view_.salts = reinterpret_cast<const uint64_t*>(base + 2 * F + 1);
    view_.feat_of_block = base + 2 * F + 1 + Q;
  }
  const DeviceLayout& view() const { return view_; }

 private:
  at::Tensor dev_;
  DeviceLayout view_{};
};

// Bag j's [start, end), clamped into [0, n] so nothing is read out of bounds; false when the
// offsets around bag j are invalid (offsets[0] != 0, decreasing, or past n).
__device__ inline bool bag_bounds(const int64_t* __restrict__ offs, int64_t j, int64_t n, int64_t* start,
                                  int64_t* end) {
  int64_t a = offs[j], b = offs[j + 1];
  const bool ok = (j != 0 || a == 0) && b >= a && b <= n;
  a = a < 0 ? 0 : (a > n ? n : a);
  b = b < a ? a : (b > n ? n : b);
  *start = a;
  *end = b;
  return ok;
}

// Reads the device error flag (a stream synchronisation) and raises the CPU check's message.
inline void raise_if_offsets_error(const char* op, const at::Tensor& error, const at::Tensor& offsets64,
                                   int64_t num_values) {
  if (error.item<int>() != 0) {
    check_offsets_cpu(op, offsets64.cpu(), num_values);  // throws the precise message
    TORCH_CHECK_VALUE(false, op, ": offsets are invalid (detected on the device)");
  }
}

}  // namespace embedops
