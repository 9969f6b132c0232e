// Argument checks of co_attention / mixture_attention, shared by the CPU and CUDA backends.
// Lengths are validated on the host (a small device-to-host copy on CUDA).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "attention/co_mixture_attention.h"
#include "common/checks.h"

namespace embedops {

namespace {

std::vector<int64_t> read_lengths(const char* op, const char* name, const std::optional<at::Tensor>& len,
                                  const at::Tensor& like, int64_t B, int64_t limit) {
  std::vector<int64_t> out(B, limit);
  if (!len.has_value()) return out;
  check_index_dtype(op, name, *len);
  check_same_device(op, name, *len, "qx", like);
  TORCH_CHECK_VALUE(len->dim() == 1 && len->size(0) == B, op, ": ", name, " must have shape (B,) = (", B,
                    ",), got ", len->sizes());
  const at::Tensor h = len->to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* p = h.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= limit, op, ": ", name, "[", b, "] must be in [0, ", limit, "], got ",
                      p[b]);
    out[b] = p[b];
  }
  return out;
}

// lse-like tensor: lse_dtype(q), q's device, the given shape.
void check_lse_like(const char* op, const char* name, const at::Tensor& t, const char* q_name, const at::Tensor& q,
                    at::IntArrayRef shape) {
  check_same_device(op, name, t, q_name, q);
  TORCH_CHECK_TYPE(t.scalar_type() == lse_dtype(q.scalar_type()), op, ": ", name, " must have dtype ",
                   lse_dtype(q.scalar_type()), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// t: ref's dtype and device, the given shape.
void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref, at::IntArrayRef shape) {
  check_same_dtype(op, name, t, ref_name, ref);
  check_same_device(op, name, t, ref_name, ref);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace

CoDesc check_co_attention_args(const char* op, const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                               const at::Tensor& vy, const std::optional<at::Tensor>& x_lengths,
                               const std::optional<at::Tensor>& y_lengths) {
  check_dim(op, "qx", qx, 4, "(B, Lx, H, D)");
  check_dim(op, "ky", ky, 4, "(B, Ly, H, D)");
  check_dim(op, "vx", vx, 4, "(B, Lx, H, Dvx)");
  check_dim(op, "vy", vy, 4, "(B, Ly, H, Dvy)");
  check_float_dtype(op, "qx", qx);
  check_same_dtype(op, "ky", ky, "qx", qx);
  check_same_dtype(op, "vx", vx, "qx", qx);
  check_same_dtype(op, "vy", vy, "qx", qx);
  check_same_device(op, "ky", ky, "qx", qx);
  check_same_device(op, "vx", vx, "qx", qx);
  check_same_device(op, "vy", vy, "qx", qx);
  const int64_t B = qx.size(0), Lx = qx.size(1), H = qx.size(2), Ly = ky.size(1);
  check_size(op, "ky", ky, 0, B, "the batch size B of qx");
  check_size(op, "vx", vx, 0, B, "the batch size B of qx");
  check_size(op, "vy", vy, 0, B, "the batch size B of qx");
  check_size(op, "vx", vx, 1, Lx, "the length Lx of qx");
  check_size(op, "vy", vy, 1, Ly, "the length Ly of ky");
  check_size(op, "ky", ky, 2, H, "the number of heads H of qx");
  check_size(op, "vx", vx, 2, H, "the number of heads H of qx");
  check_size(op, "vy", vy, 2, H, "the number of heads H of qx");
  check_size(op, "ky", ky, 3, qx.size(3), "the head dim D of qx");
  TORCH_CHECK_VALUE(H > 0, op, ": qx must have at least one head (H > 0), got H = ", H);
  TORCH_CHECK_VALUE(qx.size(3) > 0, op, ": the head dim D of qx must be > 0, got ", qx.size(3));
  TORCH_CHECK_VALUE(vx.size(3) > 0, op, ": the head dim Dvx of vx must be > 0, got ", vx.size(3));
  TORCH_CHECK_VALUE(vy.size(3) > 0, op, ": the head dim Dvy of vy must be > 0, got ", vy.size(3));
  return {read_lengths(op, "x_lengths", x_lengths, qx, B, Lx), read_lengths(op, "y_lengths", y_lengths, qx, B, Ly)};
}


MixDesc check_mixture_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& seg, const at::Tensor& w) {
  check_dim(op, "q", q, 4, "(B, Lq, Hq, D)");
  check_dim(op, "k", k, 4, "(B, Lk, Hkv, D)");
  check_dim(op, "v", v, 4, "(B, Lk, Hkv, Dv)");
  check_float_dtype(op, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_dtype(op, "weights", w, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_same_device(op, "weights", w, "q", q);
  check_same_device(op, "segment_lengths", seg, "q", q);
  check_index_dtype(op, "segment_lengths", seg);
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), Lk = k.size(1), Hkv = k.size(2);
  check_size(op, "k", k, 0, B, "the batch size B of q");
  check_size(op, "v", v, 0, B, "the batch size B of q");
  check_size(op, "v", v, 1, Lk, "the key length Lk of k");
  check_size(op, "v", v, 2, Hkv, "the number of key/value heads Hkv of k");
  check_size(op, "k", k, 3, q.size(3), "the head dim D of q");
  TORCH_CHECK_VALUE(Hq > 0 && Hkv > 0 && Hq % Hkv == 0, op, ": the number of query heads Hq (", Hq,
                    ") must be a positive multiple of the number of key/value heads Hkv (", Hkv, ")");
  TORCH_CHECK_VALUE(q.size(3) > 0, op, ": the head dim D of q must be > 0, got ", q.size(3));
  TORCH_CHECK_VALUE(v.size(3) > 0, op, ": the head dim Dv of v must be > 0, got ", v.size(3));
  TORCH_CHECK_VALUE(seg.dim() == 2 && seg.size(0) == B && seg.size(1) >= 1, op,
                    ": segment_lengths must have shape (B, M) = (", B, ", M) with M >= 1, got ", seg.sizes());
  const int64_t M = seg.size(1);
  const bool per_head = w.dim() == 4;
  TORCH_CHECK_VALUE(
      (w.dim() == 3 && w.size(0) == B && w.size(1) == Lq && w.size(2) == M) ||
          (per_head && w.size(0) == B && w.size(1) == Lq && w.size(2) == Hq && w.size(3) == M),
      op, ": weights must have shape (B, Lq, M) = (", B, ", ", Lq, ", ", M, ") or (B, Lq, Hq, M) = (", B, ", ", Lq,
      ", ", Hq, ", ", M, "), got ", w.sizes());
  MixDesc d;
  d.M = M;
  d.start.resize(B * M);
  d.len.resize(B * M);
  const at::Tensor h = seg.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* p = h.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t total = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = p[b * M + m];
      TORCH_CHECK_VALUE(n >= 0, op, ": segment_lengths[", b, ", ", m, "] must be >= 0, got ", n);
      d.start[b * M + m] = total;
      d.len[b * M + m] = n;
      total += n;
      TORCH_CHECK_VALUE(total <= Lk, op, ": segment_lengths[", b, "] must sum to at most Lk = ", Lk, ", got ",
                        total, " after segment ", m);
    }
  }
  return d;
}

CoDesc check_co_attention_backward_args(const char* op, const at::Tensor& dox, const at::Tensor& doy,
                                        const at::Tensor& qx, const at::Tensor& ky, const at::Tensor& vx,
                                        const at::Tensor& vy, const at::Tensor& ox, const at::Tensor& oy,
                                        const at::Tensor& lse_x, const at::Tensor& lse_y,
                                        const std::optional<at::Tensor>& dlse_x,
                                        const std::optional<at::Tensor>& dlse_y,
                                        const std::optional<at::Tensor>& x_lengths,
                                        const std::optional<at::Tensor>& y_lengths) {
  CoDesc cd = check_co_attention_args(op, qx, ky, vx, vy, x_lengths, y_lengths);
  const int64_t B = qx.size(0), Lx = qx.size(1), H = qx.size(2), Ly = ky.size(1);
  const int64_t Dvx = vx.size(3), Dvy = vy.size(3);
  check_same_shape(op, "dox", dox, "qx", qx, {B, Lx, H, Dvy});
  check_same_shape(op, "ox", ox, "qx", qx, {B, Lx, H, Dvy});
  check_same_shape(op, "doy", doy, "qx", qx, {B, Ly, H, Dvx});
  check_same_shape(op, "oy", oy, "qx", qx, {B, Ly, H, Dvx});
  check_lse_like(op, "lse_x", lse_x, "qx", qx, {B, H, Lx});
  check_lse_like(op, "lse_y", lse_y, "qx", qx, {B, H, Ly});
  if (dlse_x.has_value()) check_lse_like(op, "dlse_x", *dlse_x, "qx", qx, {B, H, Lx});
  if (dlse_y.has_value()) check_lse_like(op, "dlse_y", *dlse_y, "qx", qx, {B, H, Ly});
  return cd;
}

MixDesc check_mixture_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& seg, const at::Tensor& w,
                                    const at::Tensor& seg_out, const at::Tensor& lse) {
  MixDesc md = check_mixture_args(op, q, k, v, seg, w);
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), Dv = v.size(3), M = md.M;
  check_same_shape(op, "dout", dout, "q", q, {B, Lq, Hq, Dv});
  check_same_shape(op, "seg_out", seg_out, "q", q, {B, Lq, Hq, M, Dv});
  check_lse_like(op, "lse", lse, "q", q, {B, Hq, Lq, M});
  return md;
}

}  // namespace embedops
