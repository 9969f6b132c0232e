// multiplexed_embedding_bag: argument checks and string parsing shared by the CPU and CUDA kernels.

#include <ATen/core/Tensor.h>

#include <limits>

#include "common/checks.h"
#include "embedding/embedding.h"
#include "embedding/quantized.h"

namespace embedops {

PoolMode parse_pool_mode(const char* op, c10::string_view mode) {
  if (mode == "sum") return PoolMode::kSum;
  if (mode == "mean") return PoolMode::kMean;
  if (mode == "max") return PoolMode::kMax;
  TORCH_CHECK_VALUE(false, op, ": mode must be \"sum\", \"mean\" or \"max\", got \"", mode, "\"");
}

Combine parse_combine(const char* op, c10::string_view combine) {
  if (combine == "concat") return Combine::kConcat;
  if (combine == "sum") return Combine::kSum;
  if (combine == "mean") return Combine::kMean;
  TORCH_CHECK_VALUE(false, op, ": combine must be \"concat\", \"sum\" or \"mean\", got \"", combine, "\"");
}

Optimizer parse_optimizer(const char* op, c10::string_view optimizer) {
  if (optimizer == "sgd") return Optimizer::kSGD;
  if (optimizer == "rowwise_adagrad") return Optimizer::kRowwiseAdagrad;
  TORCH_CHECK_VALUE(false, op, ": optimizer must be \"sgd\" or \"rowwise_adagrad\", got \"", optimizer, "\"");
}

BagLayout check_bag_args(const char* op, const at::Tensor& weight, const at::Tensor& values,
                         const at::Tensor& offsets, at::IntArrayRef num_probes, c10::string_view combine,
                         c10::string_view mode, const c10::optional<at::Tensor>& per_sample_weights) {
  BagLayout L;
  L.mode = parse_pool_mode(op, mode);
  L.combine = parse_combine(op, combine);
  // a uint8 weight is an int8 row-quantised table (quantized.h): (R, D + 8), forward only
  const bool quantized = weight.scalar_type() == at::kByte;
  TORCH_CHECK_TYPE(quantized || is_float_dtype(weight.scalar_type()), op,
                   ": weight must be float32, float16, bfloat16 or float64 (a float table), or uint8 (an int8 "
                   "row-quantised table, see embedops.quantize_table), got ", weight.scalar_type());
  if (quantized) {
    check_dim(op, "weight", weight, 2, "(num_rows, dim + 8) (a uint8 row-quantised table)");
    TORCH_CHECK_VALUE(weight.size(1) > kInt8RowExtraBytes, op,
                      ": weight is a uint8 row-quantised table (num_rows, dim + 8): every row holds dim codes, then "
                      "a float32 scale and a float32 bias, so it needs more than 8 columns, got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(weight.is_contiguous(), op,
                      ": weight (a uint8 row-quantised table) must be contiguous (its rows are fused byte records), "
                      "got shape ", weight.sizes(), " with strides ", weight.strides(), "; call .contiguous()");
  } else {
    check_dim(op, "weight", weight, 2, "(num_rows, dim)");
    TORCH_CHECK_VALUE(weight.size(1) > 0, op, ": weight must have dim > 0 columns, got shape ", weight.sizes());
  }
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight must have num_rows > 0 rows, got shape ", weight.sizes());
  check_index_dtype(op, "values", values);
  check_dim(op, "values", values, 1, "(N,)");
  check_index_dtype(op, "offsets", offsets);
  check_dim(op, "offsets", offsets, 1, "(F*B + 1,)");
  check_same_device(op, "values", values, "weight", weight);
  check_same_device(op, "offsets", offsets, "weight", weight);
  TORCH_CHECK_VALUE(!num_probes.empty(), op, ": num_probes must list one probe count per feature, got an empty list");
  L.num_features = static_cast<int64_t>(num_probes.size());
  L.probes.assign(num_probes.begin(), num_probes.end());
  L.pbase.assign(L.num_features + 1, 0);
  for (int64_t f = 0; f < L.num_features; ++f) {
    TORCH_CHECK_VALUE(L.probes[f] > 0, op, ": num_probes[", f, "] (the probe count of feature ", f,
                      ") must be > 0, got ", L.probes[f]);
    TORCH_CHECK_VALUE(L.probes[f] <= 1024, op, ": num_probes[", f, "] must be <= 1024, got ", L.probes[f]);
    L.pbase[f + 1] = L.pbase[f] + L.probes[f];
    L.max_probes = std::max(L.max_probes, L.probes[f]);
  }
  TORCH_CHECK_VALUE(L.num_features <= std::numeric_limits<uint32_t>::max(), op, ": too many features (",
                    L.num_features, ")");
  TORCH_CHECK_VALUE(offsets.numel() >= 1 && (offsets.numel() - 1) % L.num_features == 0, op,
                    ": offsets must have F*B + 1 entries with F = len(num_probes) = ", L.num_features,
                    " features, got ", offsets.numel(), " entries");
  L.batch = (offsets.numel() - 1) / L.num_features;
  L.num_rows = weight.size(0);
  L.dim = quantized ? weight.size(1) - kInt8RowExtraBytes : weight.size(1);
  L.num_blocks = L.pbase[L.num_features];
  L.out_dim = (L.combine == Combine::kConcat ? L.num_blocks : L.num_features) * L.dim;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    const at::Tensor& w = *per_sample_weights;
    TORCH_CHECK_VALUE(L.mode == PoolMode::kSum, op, ": per_sample_weights is only supported with mode=\"sum\", got mode=\"",
                      mode, "\"");
    if (quantized) {
      TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op,
                       ": per_sample_weights must be float32 (the output's dtype) with a uint8 row-quantised "
                       "weight, got ", w.scalar_type());
    } else {
      check_same_dtype(op, "per_sample_weights", w, "weight", weight);
    }
    check_dim(op, "per_sample_weights", w, 1, "(N,)");
    check_size(op, "per_sample_weights", w, 0, values.numel(), "the number of values N");
    check_same_device(op, "per_sample_weights", w, "weight", weight);
  }
  return L;
}

void check_offsets_cpu(const char* op, const at::Tensor& offsets64, int64_t num_values) {
  const int64_t* o = offsets64.const_data_ptr<int64_t>();
  const int64_t n = offsets64.numel();
  TORCH_CHECK_VALUE(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t j = 0; j + 1 < n; ++j) {
    if (C10_UNLIKELY(o[j + 1] < o[j])) {
      TORCH_CHECK_VALUE(false, op, ": offsets must be non-decreasing, got offsets[", j, "] = ", o[j], " > offsets[",
                        j + 1, "] = ", o[j + 1]);
    }
  }
  TORCH_CHECK_INDEX(o[n - 1] <= num_values, op, ": offsets[-1] = ", o[n - 1],
                    " points past the end of values (len(values) = ", num_values, ")");
}

BagBackwardInputs prepare_bag_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& weight,
                                       const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& argmax,
                                       at::IntArrayRef num_probes, c10::string_view combine, c10::string_view mode,
                                       const c10::optional<at::Tensor>& per_sample_weights) {
  BagBackwardInputs in;
  TORCH_CHECK_TYPE(weight.scalar_type() != at::kByte, op,
                   ": weight is a uint8 row-quantised table, which is for inference only (forward); a backward or "
                   "an optimizer update needs a float table (embedops.dequantize_table gives one)");
  in.L = check_bag_args(op, weight, values, offsets, num_probes, combine, mode, per_sample_weights);
  check_same_dtype(op, "grad_out", grad_out, "weight", weight);
  check_same_device(op, "grad_out", grad_out, "weight", weight);
  check_dim(op, "grad_out", grad_out, 2, "(B, out_dim)");
  check_size(op, "grad_out", grad_out, 0, in.L.batch, "the batch size B");
  check_size(op, "grad_out", grad_out, 1, in.L.out_dim, "the output width out_dim");
  in.offs = offsets.to(at::kLong).contiguous();
  in.v = values.contiguous();
  in.g = grad_out.contiguous();
  in.has_psw = per_sample_weights.has_value() && per_sample_weights->defined();
  if (in.has_psw) in.psw = per_sample_weights->contiguous();
  if (in.L.mode == PoolMode::kMax) {
    TORCH_CHECK_VALUE(argmax.scalar_type() == at::kLong && argmax.dim() == 2 && argmax.size(0) == in.L.batch &&
                          argmax.size(1) == in.L.num_blocks * in.L.dim && argmax.device() == weight.device(),
                      op, ": argmax must be the (B, Q*D) int64 tensor the forward returned for mode=\"max\", got ",
                      argmax.scalar_type(), " of shape ", argmax.sizes(), " on ", argmax.device());
    in.argmax = argmax.contiguous();
  }
  return in;
}

void check_hash_ids_args(const at::Tensor& values, int64_t feature, int64_t probe, int64_t num_rows) {
  check_index_dtype("hash_ids", "values", values);
  TORCH_CHECK_VALUE(feature >= 0 && feature <= UINT32_MAX, "hash_ids: feature must be in [0, 2^32), got ",
                    feature);
  TORCH_CHECK_VALUE(probe >= 0 && probe <= UINT32_MAX, "hash_ids: probe must be in [0, 2^32), got ", probe);
  check_positive("hash_ids", "num_rows", num_rows);
}

}  // namespace embedops
