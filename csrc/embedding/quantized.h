#pragma once
// int8 row-quantised embedding tables: the layout and the math the CPU and CUDA lookups share.
//
// Layout (FBGEMM's fused 8-bit row-wise layout: FloatToFused8BitRowwiseQuantized, PyTorch's
// quantized::embedding_bag_byte_rowwise_offsets): a uint8 tensor (R, D + 8). Row r
// holds D codes c[0..D), then its float32 scale and float32 bias, little-endian, 4 bytes each, at
// byte offsets D and D + 4 of the row (unaligned in general). The value of element d is
//   value(r, d) = scale_r * c[d] + bias_r.
// A pooled sum over ids i with weights w_i (per_sample_weights, or 1) adds w_i * value(r_i, d) to a
// float32 accumulator per element, one multiply-add each, with the id's weight folded into its row's
// terms once per id (int8_row_terms: w * scale, w * bias):
//   acc[d] = (acc[d] + w_i * bias_i) + (w_i * scale_i) * c_i[d]          (int8_accumulate)
// The accumulator holds a sum of the values themselves, so the float32 error is that of a float
// table's lookup. (Summing w * scale * c and w * bias apart saves one add per element but sums two
// large partial sums of opposite sign, bias = the row minimum: on a 5000-id bag it measured an
// absolute error of 0.036 where the float lookup of the same values errs by 4e-4.) Max pooling
// compares int8_value.

#include <c10/macros/Macros.h>

#include <bit>
#include <cstdint>
#include <cstring>

namespace embedops {

// bytes after the D codes of a row: the float32 scale and the float32 bias
constexpr int64_t kInt8RowExtraBytes = 8;

static_assert(std::endian::native == std::endian::little,
              "the fused int8 row layout stores scale and bias little-endian");

struct Int8RowTerms {
  float code_scale;  // w * scale: multiplies every code of the row
  float bias;        // w * bias: added once per id
};

// The row's scale and bias (row = the first code of the row, dim = D), times the id's weight w.
C10_HOST_DEVICE inline Int8RowTerms int8_row_terms(const uint8_t* row, int64_t dim, float w) {
  float scale, bias;
  memcpy(&scale, row + dim, sizeof(float));
  memcpy(&bias, row + dim + sizeof(float), sizeof(float));
  return Int8RowTerms{w * scale, w * bias};
}

// acc + w * value(r, d) from the row terms (t = int8_row_terms(row, D, w)) and the code c[d];
// T: float, or a float vector type of the CPU kernels (lane by lane)
template <typename T>
C10_HOST_DEVICE inline T int8_accumulate(T acc, const Int8RowTerms& t, T code) {
  return (acc + t.bias) + t.code_scale * code;
}

// value(r, d) itself (row terms with w = 1), for max pooling
C10_HOST_DEVICE inline float int8_value(const Int8RowTerms& t, uint8_t code) {
  return t.code_scale * static_cast<float>(code) + t.bias;
}

}  // namespace embedops
