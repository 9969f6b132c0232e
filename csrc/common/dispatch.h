#pragma once
// Dtype dispatch and compile-time switches shared by every family.

#include <ATen/Dispatch.h>

// float32 / float16 / bfloat16 / float64; the body sees `scalar_t`.
#define EMBEDOPS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// int32 / int64; the body sees `index_t`.
#define EMBEDOPS_DISPATCH_INDEX(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)

// Turns a runtime bool into a compile-time constant `CONST_NAME` inside the body:
//   EMBEDOPS_BOOL_SWITCH(has_weights, kHasWeights, [&] { kernel<kHasWeights>(...); });
#define EMBEDOPS_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                             \
    if (COND) {                                     \
      constexpr bool CONST_NAME = true;             \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr bool CONST_NAME = false;            \
      return __VA_ARGS__();                         \
    }                                               \
  }()
