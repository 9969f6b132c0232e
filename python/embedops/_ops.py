"""Fake (meta) kernels and autograd registrations for every torch.ops.embedops op.

Fakes let torch.compile / FakeTensor trace the ops without running them; autograd formulas
route gradients through the backward ops. Each op's registrations sit together.
"""

from __future__ import annotations

import torch

from ._load import _C  # noqa: F401  (the schemas must be registered first)

# ---- embedding ---------------------------------------------------------------------------------


@torch.library.register_fake("embedops::hash_ids")
def _hash_ids_fake(values, feature, probe, num_rows, seed=0):
    return torch.empty_like(values, dtype=torch.int64, memory_format=torch.contiguous_format)


def _bag_out_shape(weight, offsets, num_probes, combine):
    f = len(num_probes)
    batch = (offsets.shape[0] - 1) // f
    blocks = sum(num_probes) if combine == "concat" else f
    # a uint8 weight is an int8 row-quantised table (R, D + 8): D codes, float32 scale and bias
    dim = weight.shape[1] - 8 if weight.dtype == torch.uint8 else weight.shape[1]
    return batch, blocks * dim


@torch.library.register_fake("embedops::multiplexed_embedding_bag")
def _meb_fake(weight, values, offsets, num_probes, combine="concat", pooling="sum", per_sample_weights=None,
              seed=0, validate=True):
    torch._check(len(num_probes) > 0, lambda: "multiplexed_embedding_bag: num_probes must not be empty")
    batch, cols = _bag_out_shape(weight, offsets, num_probes, combine)
    if weight.dtype == torch.uint8:  # int8 row-quantised table: float32 out, no argmax (forward only)
        torch._check(weight.shape[1] > 8, lambda: "multiplexed_embedding_bag: a uint8 row-quantised weight "
                     "(num_rows, dim + 8) needs more than 8 columns")
        return weight.new_empty((batch, cols), dtype=torch.float32), weight.new_empty((0,), dtype=torch.int64)
    out = weight.new_empty((batch, cols))
    if pooling == "max":
        argmax = weight.new_empty((batch, sum(num_probes) * weight.shape[1]), dtype=torch.int64)
    else:
        argmax = weight.new_empty((0,), dtype=torch.int64)
    return out, argmax


@torch.library.register_fake("embedops::multiplexed_embedding_bag_backward")
def _meb_backward_fake(grad_out, weight, values, offsets, argmax, num_probes, combine, pooling, per_sample_weights,
                       seed, weight_grad=True, psw_grad=False):
    gw = weight.new_empty(weight.shape) if weight_grad else weight.new_empty((0,))
    gp = weight.new_empty((values.shape[0],)) if psw_grad else weight.new_empty((0,))
    return gw, gp


@torch.library.register_fake("embedops::multiplexed_embedding_bag_update")
def _meb_update_fake(weight, state, grad_out, values, offsets, argmax, num_probes, combine, pooling,
                     per_sample_weights, seed, optimizer, lr, eps):
    return None


def _meb_setup_context(ctx, inputs, output):
    weight, values, offsets, num_probes, combine, mode, per_sample_weights, seed, validate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.cfg = (list(num_probes), combine, mode, seed)
    ctx.psw_needs_grad = per_sample_weights is not None and ctx.needs_input_grad[6]
    ctx.save_for_backward(weight, values, offsets, output[1], per_sample_weights)


def _meb_backward(ctx, grad_out, _grad_argmax):
    weight, values, offsets, argmax, psw = ctx.saved_tensors
    num_probes, combine, mode, seed = ctx.cfg
    need_w = ctx.needs_input_grad[0]
    need_p = ctx.psw_needs_grad
    if not (need_w or need_p):
        return (None,) * 9
    gw, gp = torch.ops.embedops.multiplexed_embedding_bag_backward(
        grad_out, weight, values, offsets, argmax, num_probes, combine, mode, psw, seed, need_w, need_p)
    return (gw if need_w else None, None, None, None, None, None, gp if need_p else None, None, None)


torch.library.register_autograd("embedops::multiplexed_embedding_bag", _meb_backward,
                                setup_context=_meb_setup_context)


class FusedEmbeddingBagUpdate(torch.autograd.Function):
    """multiplexed_embedding_bag with the optimizer fused into its backward (UnifiedEmbedding with
    optimizer="sgd"/"rowwise_adagrad"). Forward: the lookup. Backward: the optimizer step on the
    touched rows, in place (multiplexed_embedding_bag_update).

    The weight gets no .grad (there is no dense gradient); per_sample_weights still get theirs.
    """

    @staticmethod
    def forward(ctx, weight, state, values, offsets, per_sample_weights, cfg):
        num_probes, combine, mode, seed, validate, optimizer, lr, eps = cfg
        if weight.dtype == torch.uint8:
            raise TypeError("FusedEmbeddingBagUpdate: weight is a uint8 row-quantised table, which is for inference "
                            f"only; the fused {optimizer} update needs a float table (embedops.dequantize_table)")
        with torch.no_grad():
            out, argmax = torch.ops.embedops.multiplexed_embedding_bag(
                weight, values, offsets, num_probes, combine, mode, per_sample_weights, seed, validate)
        ctx.weight = weight.detach()  # updated in the backward; not a saved tensor (no version check)
        ctx.state = state
        ctx.cfg = cfg
        ctx.save_for_backward(values, offsets, argmax, per_sample_weights)
        ctx.mark_non_differentiable(argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, offsets, argmax, psw = ctx.saved_tensors
        num_probes, combine, mode, seed, _validate, optimizer, lr, eps = ctx.cfg
        grad_psw = None
        if psw is not None and ctx.needs_input_grad[4]:
            _, grad_psw = torch.ops.embedops.multiplexed_embedding_bag_backward(
                grad_out, ctx.weight, values, offsets, argmax, num_probes, combine, mode, psw, seed, False, True)
        torch.ops.embedops.multiplexed_embedding_bag_update(
            ctx.weight, ctx.state, grad_out, values, offsets, argmax, num_probes, combine, mode, psw, seed,
            optimizer, lr, eps)
        return None, None, None, None, grad_psw, None


# ---- matryoshka --------------------------------------------------------------------------------


def _mat_acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("embedops::matryoshka_similarity")
def _matryoshka_similarity_fake(queries, corpus, dims, metric="cosine"):
    return queries.new_empty((len(dims), queries.shape[0], corpus.shape[0]), dtype=_mat_acc_dtype(queries))


@torch.library.register_fake("embedops::matryoshka_topk")
def _matryoshka_topk_fake(queries, corpus, k, dims, metric="cosine", corpus_inv_norms=None):
    shape = (len(dims), queries.shape[0], k)
    return (queries.new_empty(shape, dtype=_mat_acc_dtype(queries)), queries.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("embedops::matryoshka_funnel")
def _matryoshka_funnel_fake(queries, corpus, dims, ks, metric="cosine", corpus_inv_norms=None):
    shape = (queries.shape[0], ks[-1])
    return (queries.new_empty(shape, dtype=_mat_acc_dtype(queries)), queries.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("embedops::matryoshka_topk_blocks")
def _matryoshka_topk_blocks_fake(queries, blocks, k, dims, metric="cosine", corpus_inv_norms=None):
    shape = (len(dims), queries.shape[0], k)
    return (queries.new_empty(shape, dtype=_mat_acc_dtype(queries)), queries.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("embedops::matryoshka_funnel_blocks")
def _matryoshka_funnel_blocks_fake(queries, blocks, dims, ks, metric="cosine", corpus_inv_norms=None):
    shape = (queries.shape[0], ks[-1])
    return (queries.new_empty(shape, dtype=_mat_acc_dtype(queries)), queries.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("embedops::matryoshka_inv_norms")
def _matryoshka_inv_norms_fake(corpus, dims):
    return corpus.new_empty((len(dims), corpus.shape[0]), dtype=_mat_acc_dtype(corpus))


def _prefix_inv_norm(v, d):
    """1/||v[:, :d]|| with 0 for a zero prefix (the kernels' rule), in v's dtype."""
    n = v[:, :d].norm(dim=1)
    return torch.where(n == 0, torch.zeros_like(n), 1.0 / n)


def _matryoshka_similarity_setup(ctx, inputs, output):
    queries, corpus, dims, metric = inputs
    ctx.save_for_backward(queries, corpus, output)
    ctx.dims, ctx.metric = list(dims), metric


def _matryoshka_similarity_backward(ctx, grad):
    # s_p = <q_p, x_p> (dot) or <q_p, x_p> a_q b_x (cosine, a = 1/||q_p||, b = 1/||x_p||):
    #   ds_p/dq_p = b x_p a - s_p a^2 q_p (rows with a zero prefix get 0, as their score is const 0)
    queries, corpus, out = ctx.saved_tensors
    acc = out.dtype
    q, x = queries.to(acc), corpus.to(acc)
    gq = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
    gx = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
    for p, d in enumerate(ctx.dims):
        g = grad[p].to(acc)
        if ctx.metric == "cosine":
            a, b = _prefix_inv_norm(q, d), _prefix_inv_norm(x, d)
            gs = g * out[p]
            gd = g * a[:, None] * b[None, :]
            if gq is not None:
                gq[:, :d] += gd @ x[:, :d] - (gs.sum(1) * a * a)[:, None] * q[:, :d]
            if gx is not None:
                gx[:, :d] += gd.T @ q[:, :d] - (gs.sum(0) * b * b)[:, None] * x[:, :d]
        else:
            if gq is not None:
                gq[:, :d] += g @ x[:, :d]
            if gx is not None:
                gx[:, :d] += g.T @ q[:, :d]
    return (gq.to(queries.dtype) if gq is not None else None,
            gx.to(corpus.dtype) if gx is not None else None, None, None)


torch.library.register_autograd("embedops::matryoshka_similarity", _matryoshka_similarity_backward,
                                setup_context=_matryoshka_similarity_setup)


# ---- compressed codes ---------------------------------------------------------------------------


@torch.library.register_fake("embedops::hamming_topk")
def _hamming_topk_fake(query_codes, corpus_codes, k, nbits=-1):
    return (query_codes.new_empty((query_codes.shape[0], k), dtype=torch.int32),
            query_codes.new_empty((query_codes.shape[0], k), dtype=torch.int64))


@torch.library.register_fake("embedops::int8_topk")
def _int8_topk_fake(queries, blocks, ranges, k, dims, metric="dot", corpus_inv_norms=None):
    shape = (len(dims), queries.shape[0], k)
    return (queries.new_empty(shape, dtype=_mat_acc_dtype(queries)), queries.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("embedops::matryoshka_rescore")
def _matryoshka_rescore_fake(queries, blocks, candidates, k, dim, metric="cosine", ranges=None):
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=_mat_acc_dtype(queries)), queries.new_empty(shape, dtype=torch.int64))


# ---- attention ---------------------------------------------------------------------------------


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("embedops::cross_attention")
def _cross_attention_fake(q, k, v, kv_lengths=None, q_lengths=None, scale=None):
    B, Lq, Hq, _ = q.shape
    out = q.new_empty((B, Lq, Hq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("embedops::cross_attention_varlen")
def _cross_attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None):
    Tq, Hq, _ = q.shape
    out = q.new_empty((Tq, Hq, v.shape[-1]))
    lse = q.new_empty((Hq, Tq), dtype=_lse_dtype(q))
    return out, lse


def _grads_fake(q, k, v):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.register_fake("embedops::cross_attention_backward")
def _cross_attention_backward_fake(dout, q, k, v, out, lse, dlse, kv_lengths, q_lengths, scale):
    return _grads_fake(q, k, v)


@torch.library.register_fake("embedops::cross_attention_varlen_backward")
def _cross_attention_varlen_backward_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, scale):
    return _grads_fake(q, k, v)


def _cross_attention_setup(ctx, inputs, output):
    q, k, v, kv_lengths, q_lengths, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lengths, q_lengths)
    ctx.scale = scale  # None: the backward op resolves the default as the forward did


def _cross_attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_lengths, q_lengths = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.embedops.cross_attention_backward(
        dout, q, k, v, out, lse, dlse, kv_lengths, q_lengths, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("embedops::cross_attention", _cross_attention_backward,
                                setup_context=_cross_attention_setup)


def _cross_attention_varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
    ctx.scale = scale  # None: the backward op resolves the default as the forward did


def _cross_attention_varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.embedops.cross_attention_varlen_backward(
        dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("embedops::cross_attention_varlen", _cross_attention_varlen_backward,
                                setup_context=_cross_attention_varlen_setup)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("cross_attention: double backward (gradients of gradients) is not supported")


def _no_setup(ctx, inputs, output):
    pass


for _name in ("embedops::cross_attention_backward", "embedops::cross_attention_varlen_backward"):
    torch.library.register_autograd(_name, _no_double_backward, setup_context=_no_setup)


# co_attention / mixture_attention (issue 6) --------------------------------------------------


@torch.library.register_fake("embedops::co_attention")
def _co_attention_fake(qx, ky, vx, vy, x_lengths=None, y_lengths=None, scale=None):
    B, Lx, H, _ = qx.shape
    Ly = ky.shape[1]
    return (qx.new_empty((B, Lx, H, vy.shape[-1])), qx.new_empty((B, Ly, H, vx.shape[-1])),
            qx.new_empty((B, H, Lx), dtype=_lse_dtype(qx)), qx.new_empty((B, H, Ly), dtype=_lse_dtype(qx)))


@torch.library.register_fake("embedops::co_attention_backward")
def _co_attention_backward_fake(dox, doy, qx, ky, vx, vy, ox, oy, lse_x, lse_y, dlse_x, dlse_y, x_lengths,
                                y_lengths, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (qx, ky, vx, vy))


def _co_attention_setup(ctx, inputs, output):
    qx, ky, vx, vy, x_lengths, y_lengths, scale = inputs
    ox, oy, lse_x, lse_y = output
    ctx.save_for_backward(qx, ky, vx, vy, ox, oy, lse_x, lse_y, x_lengths, y_lengths)
    ctx.scale = scale  # None: the backward op resolves the default as the forward did


def _co_attention_backward(ctx, dox, doy, dlse_x, dlse_y):
    qx, ky, vx, vy, ox, oy, lse_x, lse_y, x_lengths, y_lengths = ctx.saved_tensors
    dox = torch.zeros_like(ox) if dox is None else dox
    doy = torch.zeros_like(oy) if doy is None else doy
    grads = torch.ops.embedops.co_attention_backward(dox, doy, qx, ky, vx, vy, ox, oy, lse_x, lse_y, dlse_x, dlse_y,
                                                     x_lengths, y_lengths, ctx.scale)
    return (*grads, None, None, None)


torch.library.register_autograd("embedops::co_attention", _co_attention_backward, setup_context=_co_attention_setup)


@torch.library.register_fake("embedops::mixture_attention")
def _mixture_attention_fake(q, k, v, segment_lengths, weights, scale=None):
    B, Lq, Hq, _ = q.shape
    M, Dv = segment_lengths.shape[1], v.shape[-1]
    return (q.new_empty((B, Lq, Hq, Dv)), q.new_empty((B, Hq, Lq, M), dtype=_lse_dtype(q)),
            q.new_empty((B, Lq, Hq, M, Dv)))


@torch.library.register_fake("embedops::mixture_attention_backward")
def _mixture_attention_backward_fake(dout, q, k, v, segment_lengths, weights, seg_out, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, weights))


def _mixture_attention_setup(ctx, inputs, output):
    q, k, v, segment_lengths, weights, scale = inputs
    out, lse, seg_out = output
    ctx.save_for_backward(q, k, v, segment_lengths, weights, seg_out, lse)
    ctx.scale = scale  # None: the backward op resolves the default as the forward did


def _mixture_attention_backward(ctx, dout, dlse, dseg_out):
    # lse and seg_out are auxiliary outputs (the public API returns only out): their gradients
    # are not propagated.
    q, k, v, segment_lengths, weights, seg_out, lse = ctx.saved_tensors
    dout = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device) if dout is None else dout
    dq, dk, dv, dw = torch.ops.embedops.mixture_attention_backward(dout, q, k, v, segment_lengths, weights, seg_out,
                                                                   lse, ctx.scale)
    return dq, dk, dv, None, dw, None


torch.library.register_autograd("embedops::mixture_attention", _mixture_attention_backward,
                                setup_context=_mixture_attention_setup)

def _no_double_backward_named(op):
    def fn(ctx, *grads):
        raise NotImplementedError(f"{op}: double backward (gradients of gradients) is not supported")
    return fn


for _op in ("co_attention", "mixture_attention"):
    torch.library.register_autograd(f"embedops::{_op}_backward", _no_double_backward_named(_op),
                                    setup_context=_no_setup)
