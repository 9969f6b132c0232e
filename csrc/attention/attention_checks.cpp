// Argument checks of the attention ops, shared by the CPU and CUDA backends. Lengths and
// cu_seqlens are validated on the host (a small device-to-host copy on CUDA), so a bad length
// raises a clear error instead of reading out of bounds.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/attention.h"
#include "common/checks.h"

namespace embedops {

namespace {

void check_qkv_common(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float_dtype(op, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
}

void check_heads_dims(const char* op, int64_t hq, int64_t hkv, int64_t d, int64_t dk, int64_t dv) {
  TORCH_CHECK_VALUE(hq > 0, op, ": q must have at least one head (Hq > 0), got Hq = ", hq);
  TORCH_CHECK_VALUE(hkv > 0, op, ": k must have at least one head (Hkv > 0), got Hkv = ", hkv);
  TORCH_CHECK_VALUE(hq % hkv == 0, op, ": the number of query heads Hq (", hq,
                    ") must be a multiple of the number of key/value heads Hkv (", hkv, ")");
  TORCH_CHECK_VALUE(d > 0, op, ": the head dim D of q must be > 0, got ", d);
  TORCH_CHECK_VALUE(dk == d, op, ": k's head dim must equal q's head dim D (", d, "), got ", dk);
  TORCH_CHECK_VALUE(dv > 0, op, ": the head dim Dv of v must be > 0, got ", dv);
}

at::Tensor host_int64(const at::Tensor& t) { return t.to(at::kCPU).to(at::kLong).contiguous(); }

}  // namespace

double resolve_scale(const char* op, std::optional<double> scale, int64_t head_dim) {
  if (!scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  TORCH_CHECK_VALUE(std::isfinite(*scale), op, ": scale must be a finite number, got ", *scale);
  return *scale;
}

at::ScalarType lse_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

SeqDesc make_seq_desc(int64_t B, const int64_t* q_len, int64_t q_slot, const int64_t* k_start, const int64_t* k_len) {
  SeqDesc s;
  s.batch = B;
  s.max_q_slot = q_slot;
  s.max_k = 0;
  s.desc = at::empty({5, B}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = s.desc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    p[b] = 0;
    p[B + b] = q_len[b];
    p[2 * B + b] = q_slot;
    p[3 * B + b] = k_start[b];
    p[4 * B + b] = k_len[b];
    s.max_k = std::max(s.max_k, k_len[b]);
  }
  return s;
}

SeqDesc check_cross_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const std::optional<at::Tensor>& kv_lengths,
                                   const std::optional<at::Tensor>& q_lengths) {
  check_dim(op, "q", q, 4, "(B, Lq, Hq, D)");
  check_dim(op, "k", k, 4, "(B, Lk, Hkv, D)");
  check_dim(op, "v", v, 4, "(B, Lk, Hkv, Dv)");
  check_qkv_common(op, q, k, v);
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  check_size(op, "k", k, 0, B, "the batch size B of q");
  check_size(op, "v", v, 0, B, "the batch size B of q");
  check_size(op, "v", v, 1, Lk, "the key length Lk of k");
  check_size(op, "v", v, 2, k.size(2), "the number of key/value heads Hkv of k");
  check_heads_dims(op, q.size(2), k.size(2), q.size(3), k.size(3), v.size(3));

  std::vector<int64_t> ql(B, Lq), ks(B, 0), kl(B, Lk);
  auto read_lengths = [&](const at::Tensor& len, const char* name, int64_t limit, int64_t* dst) {
    check_index_dtype(op, name, len);
    check_same_device(op, name, len, "q", q);
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == B, op, ": ", name,
                      " must have shape (B,) = (", B, ",), got ", len.sizes());
    const at::Tensor h = host_int64(len);
    const int64_t* p = h.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= limit, op, ": ", name, "[", b, "] must be in [0, ", limit,
                        "], got ", p[b]);
      dst[b] = p[b];
    }
  };
  if (kv_lengths.has_value()) read_lengths(*kv_lengths, "kv_lengths", Lk, kl.data());
  if (q_lengths.has_value()) read_lengths(*q_lengths, "q_lengths", Lq, ql.data());
  SeqDesc s = make_seq_desc(B, ql.data(), Lq, ks.data(), kl.data());
  s.uniform = !kv_lengths.has_value() && !q_lengths.has_value();
  return s;
}

SeqDesc check_cross_attention_varlen_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                          const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k) {
  check_dim(op, "q", q, 3, "(Tq, Hq, D)");
  check_dim(op, "k", k, 3, "(Tk, Hkv, D)");
  check_dim(op, "v", v, 3, "(Tk, Hkv, Dv)");
  check_qkv_common(op, q, k, v);
  const int64_t Tq = q.size(0), Tk = k.size(0);
  check_size(op, "v", v, 0, Tk, "the number of key tokens Tk of k");
  check_size(op, "v", v, 1, k.size(1), "the number of key/value heads Hkv of k");
  check_heads_dims(op, q.size(1), k.size(1), q.size(2), k.size(2), v.size(2));
  check_nonnegative(op, "max_seqlen_q", max_seqlen_q);
  check_nonnegative(op, "max_seqlen_k", max_seqlen_k);
  for (auto [name, cu] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &cu_seqlens_q},
                          {"cu_seqlens_k", &cu_seqlens_k}}) {
    check_index_dtype(op, name, *cu);
    check_same_device(op, name, *cu, "q", q);
    TORCH_CHECK_VALUE(cu->dim() == 1 && cu->size(0) >= 1, op, ": ", name,
                      " must have shape (B + 1,) with B >= 0, got ", cu->sizes());
  }
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op,
                    ": cu_seqlens_k must have the length of cu_seqlens_q (", cu_seqlens_q.size(0), "), got ",
                    cu_seqlens_k.size(0));
  const int64_t B = cu_seqlens_q.size(0) - 1;
  SeqDesc s;
  s.batch = B;
  s.desc = at::empty({5, B}, at::TensorOptions().dtype(at::kLong));
  int64_t* qs = s.desc.data_ptr<int64_t>();
  int64_t *ql = qs + B, *qslot = qs + 2 * B, *ks = qs + 3 * B, *kl = qs + 4 * B;
  auto read_cu = [&](const at::Tensor& cu, const char* name, int64_t total, int64_t max_len,
                     const char* max_name, int64_t* start, int64_t* len) {
    const at::Tensor h = host_int64(cu);
    const int64_t* p = h.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(p[0] == 0, op, ": ", name, "[0] must be 0, got ", p[0]);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(p[b + 1] >= p[b], op, ": ", name, " must be non-decreasing, got ", name, "[", b,
                        "] = ", p[b], " > ", name, "[", b + 1, "] = ", p[b + 1]);
      TORCH_CHECK_VALUE(p[b + 1] - p[b] <= max_len, op, ": sequence ", b, " has length ", p[b + 1] - p[b],
                        " > ", max_name, " = ", max_len);
      start[b] = p[b];
      len[b] = p[b + 1] - p[b];
    }
    TORCH_CHECK_VALUE(p[B] == total, op, ": ", name, " must end at the number of tokens (", total, "), got ",
                      name, "[", B, "] = ", p[B]);
  };
  read_cu(cu_seqlens_q, "cu_seqlens_q", Tq, max_seqlen_q, "max_seqlen_q", qs, ql);
  read_cu(cu_seqlens_k, "cu_seqlens_k", Tk, max_seqlen_k, "max_seqlen_k", ks, kl);
  s.max_q_slot = 0;
  s.max_k = 0;
  for (int64_t b = 0; b < B; ++b) {
    qslot[b] = ql[b];
    s.max_q_slot = std::max(s.max_q_slot, ql[b]);
    s.max_k = std::max(s.max_k, kl[b]);
  }
  return s;
}

void check_cross_attention_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& dlse, bool varlen) {
  check_same_dtype(op, "dout", dout, "q", q);
  check_same_dtype(op, "out", out, "q", q);
  check_same_device(op, "dout", dout, "q", q);
  check_same_device(op, "out", out, "q", q);
  check_same_device(op, "lse", lse, "q", q);
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = v.size(-1);
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape), op, ": dout must have shape ",
                    at::IntArrayRef(out_shape), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), op, ": out must have shape ",
                    at::IntArrayRef(out_shape), ", got ", out.sizes());
  std::vector<int64_t> lse_shape;
  if (varlen) {
    lse_shape = {q.size(1), q.size(0)};
  } else {
    lse_shape = {q.size(0), q.size(2), q.size(1)};
  }
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": lse must have dtype ",
                   lse_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), op, ": lse must have shape ",
                    at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  if (dlse.has_value()) {
    check_same_device(op, "dlse", *dlse, "q", q);
    TORCH_CHECK_TYPE(dlse->scalar_type() == lse.scalar_type(), op, ": dlse must have dtype ",
                     lse.scalar_type(), ", got ", dlse->scalar_type());
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), op, ": dlse must have shape ", lse.sizes(), ", got ",
                      dlse->sizes());
  }
}

}  // namespace embedops
