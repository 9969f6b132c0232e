"""Matryoshka family: similarity and top-k search on prefixes of Matryoshka embeddings.

Every function scores several prefix sizes ``dims`` in ONE pass over the corpus: the dot
products are accumulated segment by segment (``[0, dims[0])``, ``[dims[0], dims[1])``, ...) and
checkpointed at each prefix, so scoring all prefixes costs one full-``dims[-1]`` pass.

Score rules (shared by the CPU and CUDA kernels):

* ``metric="cosine"``: ``<q[:d], x[:d]> / (||q[:d]|| ||x[:d]||)``, every prefix renormalised (as
  MatryoshkaLoss trains it). A prefix that is all zeros scores 0, never NaN.
* ``metric="dot"``: the raw inner product ``<q[:d], x[:d]>``.
* Non-finite inputs: an inf/NaN inside a prefix gives NaN cosine scores for that row/query (unless
  the other side's prefix is zero: 0); dot scores follow IEEE arithmetic.
* Top-k order: score descending, **NaN scores rank after every number** (they only appear in a
  top-k when fewer than k rows have a numeric score), ties go to the lower corpus index.

Scores are float32 (accumulated in float32) for float32/float16/bfloat16 inputs and float64 for
float64 inputs. numpy in -> numpy out; torch in -> torch out (on the input's device).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._utils import check_device, check_dims, check_int, check_metric, funnel_plan, to_tensor

def _pair(op: str, queries, corpus):
    q, q_np = to_tensor(queries, op, "queries")
    x, x_np = to_tensor(corpus, op, "corpus")
    for name, t in (("queries", q), ("corpus", x)):
        check_device(op, name, t)
        if t.dim() != 2:
            layout = "(B, D)" if name == "queries" else "(N, D)"
            raise ValueError(f"{op}: {name} must have 2 dims {layout}, got {t.dim()} (shape {tuple(t.shape)})")
    return q, x, q_np or x_np


def _out(t: torch.Tensor, as_numpy: bool):
    return t.cpu().numpy() if as_numpy else t


def matryoshka_similarity(queries, corpus, dims: Sequence[int], *, metric: str = "cosine"):
    """Scores of every query against every corpus row at several prefix sizes, in one pass.

    Args:
        queries: ``(B, D)`` float32/float16/bfloat16/float64 tensor (CPU or CUDA) or numpy array.
        corpus: ``(N, D)``, same dtype and device as ``queries``. Rows may be strided (e.g. a
            column slice of a wider matrix) as long as each row is contiguous.
        dims: strictly ascending prefix sizes, each in ``[1, D]`` (an int means ``[dims]``).
        metric: ``"cosine"`` (each prefix renormalised; zero prefix -> 0) or ``"dot"``.

    Returns:
        ``(len(dims), B, N)`` scores: float32 (float64 for float64 inputs); ``out[p, b, n]`` is the
        score of ``queries[b, :dims[p]]`` against ``corpus[n, :dims[p]]``. numpy if an input was
        numpy. Differentiable in ``queries`` and ``corpus``.

    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, dims or metric.
    """
    op = "matryoshka_similarity"
    metric = check_metric(op, metric)
    q, x, as_np = _pair(op, queries, corpus)
    dims = check_dims(op, dims, q.shape[1])
    return _out(torch.ops.embedops.matryoshka_similarity(q, x, dims, metric), as_np)


def matryoshka_topk(queries, corpus, k: int, dims: Sequence[int], *, metric: str = "cosine",
                    corpus_inv_norms=None):
    """The k best corpus rows of every query at several prefix sizes, fused with the scoring.

    Streams the corpus in tiles and keeps one top-k per (prefix, query): extra memory is
    O(len(dims) * B * k + tile), never a B x N score matrix.

    Args:
        queries: ``(B, D)`` float32/float16/bfloat16/float64 tensor or numpy array.
        corpus: ``(N, D)``, same dtype and device (rows may be strided, each row contiguous).
        k: results per (prefix, query), ``0 <= k <= N``.
        dims: strictly ascending prefix sizes in ``[1, D]``.
        metric: ``"cosine"`` or ``"dot"``.
        corpus_inv_norms: optional ``(len(dims), N)`` precomputed ``1/||corpus[:, :dims[p]]||``
            (from :func:`matryoshka_inv_norms`; float32, float64 for a float64 corpus). Used for
            cosine only; saves recomputing the norms on every call.

    Returns:
        ``(values, indices)``, each ``(len(dims), B, k)``: scores (float32, float64 for float64
        inputs) sorted best first and int64 corpus row indices. Ties go to the lower index; NaN
        scores rank last. numpy if an input was numpy. Not differentiable (use
        :func:`matryoshka_similarity` on the selected rows for gradients).

    Raises:
        ValueError if ``k > N`` or ``k < 0``, and for bad shapes, dims or metric.
    """
    op = "matryoshka_topk"
    metric = check_metric(op, metric)
    q, x, as_np = _pair(op, queries, corpus)
    dims = check_dims(op, dims, q.shape[1])
    k = check_int(op, "k", k)
    if not 0 <= k <= x.shape[0]:
        raise ValueError(f"{op}: k must be in [0, N={x.shape[0]}], got {k}")
    inv = None
    if corpus_inv_norms is not None:
        inv, _ = to_tensor(corpus_inv_norms, op, "corpus_inv_norms")
    v, i = torch.ops.embedops.matryoshka_topk(q, x, k, dims, metric, inv)
    return _out(v, as_np), _out(i, as_np)


def matryoshka_funnel(queries, corpus, k: int, stages: Sequence[tuple[int, int]], *, dim: int | None = None,
                      metric: str = "cosine", corpus_inv_norms=None):
    """Funnel (adaptive) retrieval: shortlist with a small prefix, rerank with larger ones.

    Stage 0 scores all N rows at ``stages[0][0]`` and keeps the best ``stages[0][1]``; every later
    stage ``(d, kk)`` extends the survivors' partial dot products (and norms) from the previous
    prefix to ``d``, reading only the new segment of each survivor, and keeps the best ``kk``. A
    last stage ``(dim, k)`` (``dim`` defaults to D) gives the result.

    Args:
        queries: ``(B, D)`` float tensor or numpy array; corpus: ``(N, D)``, same dtype/device.
        k: results per query, at most the last stage's ``kk``.
        stages: ``[(d1, k1), (d2, k2), ...]`` with ascending ``d`` (< ``dim``) and non-increasing
            ``k`` (``k1 <= N``), e.g. ``[(64, 200), (256, 50)]``.
        dim: the final prefix (default D).
        metric: ``"cosine"`` or ``"dot"``.
        corpus_inv_norms: optional ``(1, N)`` inverse norms of the corpus at ``d1`` (cosine only).

    Returns:
        ``(values, indices)``, each ``(B, k)``: scores at ``dim`` best first, int64 row indices.
    """
    op = "matryoshka_funnel"
    metric = check_metric(op, metric)
    q, x, as_np = _pair(op, queries, corpus)
    D = q.shape[1]
    dim = D if dim is None else check_int(op, "dim", dim)
    dims, ks = funnel_plan(op, stages, k, dim, D, x.shape[0])
    inv = None
    if corpus_inv_norms is not None:
        inv, _ = to_tensor(corpus_inv_norms, op, "corpus_inv_norms")
    v, i = torch.ops.embedops.matryoshka_funnel(q, x, dims, ks, metric, inv)
    return _out(v, as_np), _out(i, as_np)


def matryoshka_inv_norms(corpus, dims: Sequence[int]):
    """Per-prefix inverse norms ``1/||corpus[:, :dims[p]]||`` (0 for a zero prefix), one pass.

    Args:
        corpus: ``(N, D)`` float tensor or numpy array.
        dims: strictly ascending prefix sizes in ``[1, D]``.

    Returns:
        ``(len(dims), N)`` float32 (float64 for a float64 corpus), for ``corpus_inv_norms``.
    """
    op = "matryoshka_inv_norms"
    x, as_np = to_tensor(corpus, op, "corpus")
    check_device(op, "corpus", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: corpus must have 2 dims (N, D), got {x.dim()} (shape {tuple(x.shape)})")
    dims = check_dims(op, dims, x.shape[1])
    return _out(torch.ops.embedops.matryoshka_inv_norms(x, dims), as_np)


__all__ = ["matryoshka_funnel", "matryoshka_inv_norms", "matryoshka_similarity", "matryoshka_topk"]
