// hash_ids: the multiplexed-embedding hash as an op, CPU (the checks: embedding_bag_checks.cpp).
// A scalar loop of 64-bit multiplies: compiled once, it runs at the same speed on every CPU level.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/hashing.h"

namespace embedops {

namespace {

at::Tensor hash_ids_cpu(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows,
                        int64_t seed) {
  check_hash_ids_args(values, feature, probe, num_rows);
  const at::Tensor v = values.contiguous();
  at::Tensor rows = at::empty(values.sizes(), values.options().dtype(at::kLong));
  const uint64_t salt = hash_salt(seed, static_cast<uint32_t>(feature), static_cast<uint32_t>(probe));
  const uint64_t r = static_cast<uint64_t>(num_rows);
  int64_t* out = rows.data_ptr<int64_t>();
  EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "hash_ids_cpu", [&] {
    const index_t* in = v.const_data_ptr<index_t>();
    at::parallel_for(0, v.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = hash_row(static_cast<int64_t>(in[i]), salt, r);
      }
    });
  });
  return rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedops, CPU, m) { m.impl("hash_ids", &hash_ids_cpu); }

}  // namespace embedops
