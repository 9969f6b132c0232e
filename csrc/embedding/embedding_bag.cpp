// multiplexed_embedding_bag (forward, backward, fused update), the host side of both backends
// (compiled once): argument checks, contiguous operands, the outputs, and the kernel of the
// weight's device (cpu/embedding_bag_kernel.cpp at the CPU level in use, cuda/embedding_bag_*.cu).
// How the offsets are validated is the backend's: the CPU kernels check them on the host, always;
// the CUDA kernels flag bad offsets on the device and raise when validate=True.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "common/memory.h"
#include "embedding/embedding.h"
#include "embedding/embedding_kernels.h"

namespace embedops {

EMBEDOPS_DEFINE_STUB(embedding_bag_forward_stub, EmbeddingBagForwardKernel);
EMBEDOPS_DEFINE_STUB(embedding_bag_forward_int8_stub, EmbeddingBagForwardKernel);
EMBEDOPS_DEFINE_STUB(embedding_bag_backward_stub, EmbeddingBagBackwardKernel);
EMBEDOPS_DEFINE_STUB(embedding_bag_update_stub, EmbeddingBagUpdateKernel);

namespace {

constexpr const char* kOp = "multiplexed_embedding_bag";

std::tuple<at::Tensor, at::Tensor> forward_host(const at::Tensor& weight, const at::Tensor& values,
                                                const at::Tensor& offsets, at::IntArrayRef num_probes,
                                                c10::string_view combine, c10::string_view mode,
                                                const c10::optional<at::Tensor>& per_sample_weights, int64_t seed,
                                                bool validate) {
  const BagLayout L = check_bag_args(kOp, weight, values, offsets, num_probes, combine, mode, per_sample_weights);
  const at::Tensor offs = offsets.to(at::kLong).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor v = values.contiguous();
  const bool has_psw = per_sample_weights.has_value() && per_sample_weights->defined();
  const at::Tensor psw = has_psw ? per_sample_weights->contiguous() : at::Tensor();
  // (B, out_dim): tens of MB for a production batch, fresh (page-faulted) on every call
  // a uint8 weight is an int8 row-quantised table (quantized.h): float32 out, no argmax (no backward)
  const bool quantized = weight.scalar_type() == at::kByte;
  at::Tensor out = empty_output({L.batch, L.out_dim}, quantized ? weight.options().dtype(at::kFloat) : weight.options());
  at::Tensor argmax = L.mode == PoolMode::kMax && !quantized
                          ? at::empty({L.batch, L.num_blocks * L.dim}, weight.options().dtype(at::kLong))
                          : at::empty({0}, weight.options().dtype(at::kLong));
  const auto& stub = quantized ? embedding_bag_forward_int8_stub : embedding_bag_forward_stub;
  stub(weight.device().type(), L, seed, w, v, offs, psw, validate, out, argmax);
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor> backward_host(const at::Tensor& grad_out, const at::Tensor& weight,
                                                 const at::Tensor& values, const at::Tensor& offsets,
                                                 const at::Tensor& argmax, at::IntArrayRef num_probes,
                                                 c10::string_view combine, c10::string_view mode,
                                                 const c10::optional<at::Tensor>& per_sample_weights, int64_t seed,
                                                 bool weight_grad, bool psw_grad) {
  constexpr const char* op = "multiplexed_embedding_bag_backward";
  BagBackwardInputs in = prepare_bag_backward(op, grad_out, weight, values, offsets, argmax, num_probes, combine, mode,
                                              per_sample_weights);
  // a dense (R, D) gradient: hundreds of MB, fresh on every call
  at::Tensor grad_weight = weight_grad ? zeros_output(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_psw = psw_grad ? at::zeros({values.numel()}, weight.options()) : at::empty({0}, weight.options());
  const at::Tensor w = weight.contiguous();
  embedding_bag_backward_stub(weight.device().type(), in.L, seed, in, w, grad_weight, grad_psw);
  return {grad_weight, grad_psw};
}

void update_host(const at::Tensor& weight, const at::Tensor& state, const at::Tensor& grad_out,
                 const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& argmax,
                 at::IntArrayRef num_probes, c10::string_view combine, c10::string_view mode,
                 const c10::optional<at::Tensor>& per_sample_weights, int64_t seed, c10::string_view optimizer,
                 double lr, double eps) {
  constexpr const char* op = "multiplexed_embedding_bag_update";
  const Optimizer opt = parse_optimizer(op, optimizer);
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous (it is updated in place)");
  BagBackwardInputs in = prepare_bag_backward(op, grad_out, weight, values, offsets, argmax, num_probes, combine, mode,
                                              per_sample_weights);
  const BagLayout& L = in.L;
  const at::ScalarType state_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (opt == Optimizer::kRowwiseAdagrad) {
    TORCH_CHECK_VALUE(state.scalar_type() == state_dtype && state.dim() == 1 && state.size(0) == L.num_rows &&
                          state.is_contiguous() && state.device() == weight.device(),
                      op, ": state must be a contiguous (num_rows,) = (", L.num_rows, ",) ", state_dtype,
                      " tensor on the weight's device for rowwise_adagrad, got ", state.scalar_type(), " of shape ",
                      state.sizes(), " on ", state.device());
  }
  at::Tensor w = weight, st = state;
  embedding_bag_update_stub(weight.device().type(), L, seed, in, w, st, opt, lr, eps);
}

void register_embedding_bag_ops(torch::Library& m) {
  m.impl("multiplexed_embedding_bag", &forward_host);
  m.impl("multiplexed_embedding_bag_backward", &backward_host);
  m.impl("multiplexed_embedding_bag_update", &update_host);
}

}  // namespace

EMBEDOPS_HOST_OPS(register_embedding_bag_ops)

}  // namespace embedops
