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

# ---- attention ---------------------------------------------------------------------------------
