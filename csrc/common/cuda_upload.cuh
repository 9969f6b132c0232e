#pragma once
// Small host-side descriptors (sequence tables, embedding layouts) to the device without a
// blocking pageable copy (a pageable host-to-device copy synchronises the stream, once per call,
// and cannot be captured in a CUDA graph).
//   upload_async:  pinned staging + non_blocking copy, for descriptors that change every call (the
//                  caching host allocator keeps the staging block until the copy has run).
//   upload_cached: descriptors that repeat call after call (a model's embedding layout, an
//                  attention call without lengths): one device copy per (device, contents), kept
//                  for the life of the process, so later calls copy nothing. The first copy is
//                  synchronous, except inside a CUDA graph capture, where it is a non_blocking
//                  copy from a pinned buffer kept with the entry (so the captured copy reads
//                  constant memory on every replay). At most kUploadCacheEntries entries; past
//                  that, upload_async.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace embedops {

inline at::Tensor upload_async(const at::Tensor& cpu, const c10::Device& device) {
  return cpu.pin_memory().to(device, cpu.scalar_type(), /*non_blocking=*/true);
}

constexpr size_t kUploadCacheEntries = 256;

inline at::Tensor upload_cached(std::vector<int64_t> host, const c10::Device& device) {
  struct Entry {
    at::Tensor pinned, dev;
  };
  static std::mutex mu;
  // never destroyed: device tensors must not be freed by static destructors after CUDA shuts down
  static auto* cache = new std::map<std::pair<int, std::vector<int64_t>>, Entry>();
  auto key = std::make_pair(static_cast<int>(device.index()), std::move(host));
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache->find(key); it != cache->end()) return it->second.dev;
  const std::vector<int64_t>& values = key.second;
  at::Tensor pinned = at::empty({static_cast<int64_t>(values.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), pinned.data_ptr<int64_t>());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  at::Tensor dev = pinned.to(device, at::kLong, /*non_blocking=*/capturing);
  if (cache->size() < kUploadCacheEntries) cache->emplace(std::move(key), Entry{pinned, dev});
  return dev;
}

}  // namespace embedops
