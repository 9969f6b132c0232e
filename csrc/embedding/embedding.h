#pragma once
// Host-side declarations and the shared host/device math of the embedding family's CPU and CUDA
// files (the hash itself lives in hashing.h).

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace embedops {

// Validates hash_ids' arguments (device independent); raises with the op and argument name.
void check_hash_ids_args(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows);

// ---- multiplexed_embedding_bag ---------------------------------------------------------------
//
// Layout. F features, B bags per feature, bag j = f*B + b = values[offsets[j] : offsets[j+1]].
// Feature f has P_f probes; "probe block" q = pbase[f] + p (pbase = exclusive prefix sum of P_f,
// Q = sum P_f blocks in all). For every id v of bag (f, b) and probe p the row is
//   row = hash_row(v, hash_salt(seed, f, p), R)
// pooled(b, q, :) = pool_{i in bag} w_i * weight[row(i, p)]   (pool: sum | mean | max; w_i =
// per_sample_weights[i] or 1; mean divides by the bag length; an empty bag pools to 0). Then
//   combine "concat": out[b, q*D : (q+1)*D]            = pooled(b, q)
//   combine "sum"   : out[b, f*D : (f+1)*D]            = sum_p pooled(b, pbase[f] + p)
//   combine "mean"  : out[b, f*D : (f+1)*D]            = (1/P_f) sum_p pooled(b, pbase[f] + p)
// argmax (mode "max" only): (B, Q*D) int64, the weight row holding the max of pooled(b, q, d)
// (first position on ties), -1 for an empty bag; its gradient goes there.

enum class PoolMode : int { kSum = 0, kMean = 1, kMax = 2 };
enum class Combine : int { kConcat = 0, kSum = 1, kMean = 2 };

PoolMode parse_pool_mode(const char* op, c10::string_view mode);
Combine parse_combine(const char* op, c10::string_view combine);

// Everything the kernels need to know about the bag layout, checked once on the host.
struct BagLayout {
  int64_t num_features = 0;  // F
  int64_t batch = 0;         // B
  int64_t num_rows = 0;      // R
  int64_t dim = 0;           // D
  int64_t num_blocks = 0;    // Q = sum P_f
  int64_t max_probes = 0;    // max P_f
  int64_t out_dim = 0;       // columns of out
  PoolMode mode = PoolMode::kSum;
  Combine combine = Combine::kConcat;
  std::vector<int64_t> probes;  // P_f
  std::vector<int64_t> pbase;   // exclusive prefix sum of P_f (F + 1 entries)
};

// Checks every device-independent argument of the op family (names the op and the argument) and
// returns the layout. Data-dependent offset checks are separate (per backend).
BagLayout check_bag_args(const char* op, const at::Tensor& weight, const at::Tensor& values,
                         const at::Tensor& offsets, at::IntArrayRef num_probes, c10::string_view combine,
                         c10::string_view mode, const c10::optional<at::Tensor>& per_sample_weights);

// The backward / fused-update inputs both backends use: arguments checked (as check_bag_args,
// plus grad_out's and argmax's dtype, device and shape), tensors made contiguous, offsets as int64.
struct BagBackwardInputs {
  BagLayout L;
  at::Tensor offs, v, g, psw, argmax;
  bool has_psw = false;
};
BagBackwardInputs prepare_bag_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& weight,
                                       const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& argmax,
                                       at::IntArrayRef num_probes, c10::string_view combine, c10::string_view mode,
                                       const c10::optional<at::Tensor>& per_sample_weights);

// Host-side offsets check (CPU tensors): offsets[0] == 0, non-decreasing, offsets[-1] <= N.
void check_offsets_cpu(const char* op, const at::Tensor& offsets64, int64_t num_values);

// The column of out that block q (feature f), element d of bag b goes to, and its combine scale.
C10_HOST_DEVICE inline int64_t out_column(int combine, int64_t q, int64_t f, int64_t d, int64_t dim) {
  return (combine == static_cast<int>(Combine::kConcat) ? q : f) * dim + d;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t combine_scale(int combine, int64_t probes_f) {
  return combine == static_cast<int>(Combine::kMean) ? acc_t(1) / static_cast<acc_t>(probes_f) : acc_t(1);
}

// The weight a pooled element gets from one id: per-sample weight (sum), 1/L (mean) or 1.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t pool_scale(int mode, int64_t bag_len) {
  return mode == static_cast<int>(PoolMode::kMean) && bag_len > 0 ? acc_t(1) / static_cast<acc_t>(bag_len)
                                                                 : acc_t(1);
}

// Row-wise optimizer steps, applied to one row's gradient g (already summed over the batch).
enum class Optimizer : int { kSGD = 0, kRowwiseAdagrad = 1 };
Optimizer parse_optimizer(const char* op, c10::string_view optimizer);

// Row-wise Adagrad (FBGEMM's ROWWISE_ADAGRAD): state += mean_d(g^2); the row moves by
// -lr * g / (sqrt(state) + eps). Returns the multiplier applied to g.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rowwise_adagrad_multiplier(acc_t& state, acc_t mean_sq, acc_t lr, acc_t eps) {
  state += mean_sq;
  return lr / (std::sqrt(state) + eps);
}

}  // namespace embedops
