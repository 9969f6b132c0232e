#pragma once
// Host-side declarations shared by the embedding family's CPU and CUDA files.

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace embedops {

// Validates hash_ids' arguments (device independent); raises with the op and argument name.
void check_hash_ids_args(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows);

}  // namespace embedops
