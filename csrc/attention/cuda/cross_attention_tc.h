#pragma once
// The opt-in tensor-core forward (cross_attention_tc.cu), called by cross_attention_fwd.cu.

#include <ATen/core/Tensor.h>

#include "attention/attention.h"

namespace embedops {
namespace attn_cuda {

// True when EMBEDOPS_ATTN_TENSOR_CORES=1, q is float16/bfloat16, D and Dv are multiples of 16 up
// to 128, and the GPU is sm_80 or newer.
bool tensor_core_forward_enabled(const at::Tensor& q, int64_t D, int64_t Dv);

// Fills out (q's layout, Dv last) and lse (float32) like the CUDA-core forward.
void forward_tensor_cores(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, at::Tensor& lse, const SeqDesc& desc, double scale, bool varlen);

}  // namespace attn_cuda
}  // namespace embedops
