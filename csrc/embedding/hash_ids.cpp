// hash_ids: the multiplexed-embedding hash as an op (CPU kernel + the shared argument checks).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/hashing.h"

namespace embedops {

void check_hash_ids_args(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows) {
  check_index_dtype("hash_ids", "values", values);
  TORCH_CHECK_VALUE(feature >= 0 && feature <= UINT32_MAX, "hash_ids: feature must be in [0, 2^32), got ",
                    feature);
  TORCH_CHECK_VALUE(probe >= 0 && probe <= UINT32_MAX, "hash_ids: probe must be in [0, 2^32), got ", probe);
  check_positive("hash_ids", "num_rows", num_rows);
}

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
