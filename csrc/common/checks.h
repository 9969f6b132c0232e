#pragma once
// Argument checks shared by every op. Each message starts with the op name, names the argument,
// and says what was expected and what was found, e.g.
//   "cross_attention: k must have 4 dims (B, Lk, Hkv, D), got 3"
// The TORCH_CHECK_{VALUE,TYPE,INDEX} variants raise ValueError / TypeError / IndexError in Python.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>

namespace embedops {

// Requires t.dim() == ndim. `layout` documents the expected shape, e.g. "(B, Lq, Hq, D)".
inline void check_dim(const char* op, std::string_view name, const at::Tensor& t, int64_t ndim,
                      std::string_view layout) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dims ", layout, ", got ",
                    t.dim(), " (shape ", t.sizes(), ")");
}

// Requires t.size(d) == expected; `what` names the size, e.g. "the batch size B of q".
inline void check_size(const char* op, std::string_view name, const at::Tensor& t, int64_t d,
                       int64_t expected, std::string_view what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, op, ": ", name, ".size(", d, ") must equal ", what, " (",
                    expected, "), got ", t.size(d), " (shape ", t.sizes(), ")");
}

inline bool is_index_dtype(at::ScalarType s) { return s == at::kInt || s == at::kLong; }
inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

inline void check_index_dtype(const char* op, std::string_view name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_index_dtype(t.scalar_type()), op, ": ", name,
                   " must be an integer tensor of dtype int32 or int64, got ", t.scalar_type());
}

inline void check_float_dtype(const char* op, std::string_view name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, std::string_view name, const at::Tensor& t,
                             std::string_view ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, std::string_view name, const at::Tensor& t,
                              std::string_view ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_positive(const char* op, std::string_view name, int64_t v) {
  TORCH_CHECK_VALUE(v > 0, op, ": ", name, " must be > 0, got ", v);
}

inline void check_nonnegative(const char* op, std::string_view name, int64_t v) {
  TORCH_CHECK_VALUE(v >= 0, op, ": ", name, " must be >= 0, got ", v);
}

}  // namespace embedops
