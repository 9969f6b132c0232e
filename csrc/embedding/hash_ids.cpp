// hash_ids: the multiplexed-embedding hash as an op. The host side of both backends (checks in
// embedding_bag_checks.cpp, the output) and the CPU kernel: a scalar loop of 64-bit multiplies,
// compiled once (it runs at the same speed on every CPU level); CUDA: cuda/hash_ids.cu.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"
#include "embedding/hashing.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(hash_ids_stub, HashIdsKernel);

namespace {

void hash_ids_cpu(const at::Tensor& v, uint64_t salt, uint64_t num_rows, at::Tensor& rows) {
  int64_t* out = rows.data_ptr<int64_t>();
  EMBEDOPS_DISPATCH_INDEX(v.scalar_type(), "hash_ids_cpu", [&] {
    const index_t* in = v.const_data_ptr<index_t>();
    at::parallel_for(0, v.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = hash_row(static_cast<int64_t>(in[i]), salt, num_rows);
      }
    });
  });
}

const KernelRegistrar register_hash_ids_cpu(hash_ids_stub, CpuCapability::kDefault, &hash_ids_cpu);

at::Tensor hash_ids_host(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows, int64_t seed) {
  check_hash_ids_args(values, feature, probe, num_rows);
  const at::Tensor v = values.contiguous();
  at::Tensor rows = at::empty(values.sizes(), values.options().dtype(at::kLong));
  if (v.numel() == 0) return rows;
  const uint64_t salt = hash_salt(seed, static_cast<uint32_t>(feature), static_cast<uint32_t>(probe));
  hash_ids_stub(values.device().type(), v, salt, static_cast<uint64_t>(num_rows), rows);
  return rows;
}

void register_hash_ids_ops(torch::Library& m) { m.impl("hash_ids", &hash_ids_host); }

}  // namespace

EMBEDOPS_HOST_OPS(register_hash_ids_ops)

}  // namespace embedops
