#pragma once
// co_attention / mixture_attention (issue 6): the argument checks and problem descriptions the
// CPU (attention_beyond_cpu.cpp) and CUDA (attention_beyond_cuda.cu) backends share.

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention/attention.h"

namespace embedops {

// Valid rows of x and columns of y per batch (host).
struct CoDesc {
  std::vector<int64_t> xlen, ylen;
};

CoDesc check_co_attention_args(const char* op, const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                               const at::Tensor& vy, const std::optional<at::Tensor>& x_lengths,
                               const std::optional<at::Tensor>& y_lengths);

// Segment m of batch b is keys [start[b * M + m], start + len[b * M + m]) (host).
struct MixDesc {
  int64_t M = 0;
  std::vector<int64_t> start, len;
};

MixDesc check_mixture_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& seg, const at::Tensor& w);

// lse-like tensor: lse_dtype(q), q's device, the given shape.
void check_lse_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                    at::IntArrayRef shape);
// t: ref's dtype and device, the given shape.
void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref, at::IntArrayRef shape);

// A padded-layout SeqDesc (q_start = 0) with per-batch query lengths / slots and key ranges.
SeqDesc make_seq_desc(int64_t B, const int64_t* q_len, int64_t q_slot, const int64_t* k_start, const int64_t* k_len);

}  // namespace embedops
