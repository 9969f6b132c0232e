"""sentence-transformers integration: ``semantic_search`` in their output format, over embeddings or a
:class:`~embedops.MatryoshkaIndex`, and building an index from a sentence-transformers model.

``import embedops`` never imports sentence-transformers; this module does not either (it only calls
``model.encode``), so :func:`semantic_search` works without the library installed.

Example::

    from sentence_transformers import SentenceTransformer
    from embedops.integrations.sentence_transformers import index_from_model, semantic_search

    model = SentenceTransformer("all-MiniLM-L6-v2")
    index = index_from_model(model, passages, dims=[64, 128, 384])   # raw embeddings, every prefix exact
    hits = semantic_search(model.encode(queries), index, top_k=10, dim=128)
    hits[0][0]  # {"corpus_id": 17, "score": 0.83}
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._utils import ProgressBar, check_metric, rich_available, show_progress
from ..matryoshka import matryoshka_topk
from ..search import MatryoshkaIndex

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_tensor(fn: str, name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {x.dtype}")
        return torch.from_numpy(np.array(x, copy=True) if not x.flags.writeable else np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if x.is_sparse or x.layout != torch.strided:
            raise TypeError(f"{fn}: {name} must be a dense tensor, got layout {x.layout}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
        return x
    raise TypeError(f"{fn}: {name} must be a torch.Tensor or a numpy.ndarray"
                    + (" or a MatryoshkaIndex" if name == "corpus_embeddings" else "")
                    + f", got {type(x).__name__}")


def _int(fn: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    return int(v)


def semantic_search(query_embeddings, corpus_embeddings, top_k: int = 10, dim: int | None = None, *,
                    metric: str | None = None) -> list[list[dict[str, Any]]]:
    """Top-k search with the output of ``sentence_transformers.util.semantic_search``, on embedops'
    fused prefix top-k kernel (the corpus is streamed in tiles; no queries x corpus score matrix).

    Args:
        query_embeddings: ``(B, D)`` or ``(D,)`` (one query) float tensor or numpy array. When
            ``dim`` is given the queries may also be already truncated to ``(B, dim)``.
        corpus_embeddings: ``(N, D)`` float tensor or numpy array, or a :class:`~embedops.MatryoshkaIndex`
            (searched with its metric, its dtype and device, its precomputed prefix norms).
        top_k: results per query, ``>= 0``; ``min(top_k, N)`` are returned (as sentence-transformers does).
        dim: search the prefix ``[:dim]`` of every embedding (default: all D). With cosine every prefix
            is renormalised, i.e. the result equals sentence-transformers' ``semantic_search`` on
            ``normalize(x[:, :dim])``.
        metric: ``"cosine"`` (default for embeddings; sentence-transformers' ``cos_sim``) or ``"dot"``
            (``dot_score``). For an index, ``None`` or the index's own metric.

    Returns:
        ``list[list[dict]]``: one list per query (a 1-D query gives a list of one list), each of
        ``{"corpus_id": int, "score": float}`` sorted by score, highest first. Ties (equal float32
        scores) are ordered by ascending ``corpus_id``, and at the ``top_k`` boundary the lower
        ``corpus_id`` is kept: deterministic, whereas sentence-transformers' order among equal
        scores follows ``torch.topk`` and its heap (unspecified). NaN scores rank last. A zero
        (prefix) vector scores 0 under cosine, never NaN.

    Queries are moved to the corpus' device and converted to its dtype. Scores are float32
    (float64 for a float64 corpus), computed with float32 accumulation.

    Raises:
        TypeError / ValueError naming ``semantic_search`` and the argument: wrong types, shapes
        (1-D or 2-D queries, 2-D corpus, matching widths), ``top_k < 0``, ``dim`` outside ``[1, D]``,
        an unknown metric or one that differs from the index's.
    """
    fn = "semantic_search"
    q = _as_tensor(fn, "query_embeddings", query_embeddings)
    if q.dim() == 1:
        q = q[None]
    elif q.dim() != 2:
        raise ValueError(f"{fn}: query_embeddings must be 1-D (D,) or 2-D (B, D), got shape {tuple(q.shape)}")
    top_k = _int(fn, "top_k", top_k)
    if top_k < 0:
        raise ValueError(f"{fn}: top_k must be >= 0, got {top_k}")

    if isinstance(corpus_embeddings, MatryoshkaIndex):
        index = corpus_embeddings
        if metric is not None and check_metric(fn, metric) != index.metric:
            raise ValueError(f"{fn}: metric={metric!r} differs from the index's metric {index.metric!r}")
        metric = index.metric
        D, N, device, dtype = index.dim, len(index), index.device, index.dtype
        corpus = None
    else:
        index = None
        corpus = _as_tensor(fn, "corpus_embeddings", corpus_embeddings)
        if corpus.dim() != 2:
            raise ValueError(f"{fn}: corpus_embeddings must be 2-D (N, D), got shape {tuple(corpus.shape)}")
        metric = "cosine" if metric is None else check_metric(fn, metric)
        (N, D), device, dtype = corpus.shape, corpus.device, corpus.dtype

    if dim is not None:
        dim = _int(fn, "dim", dim)
        if not 1 <= dim <= D:
            raise ValueError(f"{fn}: dim must be in [1, D={D}], got {dim}")
    width = q.shape[1]
    if width != D and not (dim is not None and width == dim):
        hint = f"; pass dim={width} to search the corpus' {width}-prefix" if dim is None and width < D else ""
        raise ValueError(f"{fn}: query_embeddings have {width} columns but the corpus has D={D}"
                         + (f" (and dim={dim})" if dim is not None else "") + hint)
    k = min(top_k, N)
    B = q.shape[0]
    if k == 0 or B == 0:
        return [[] for _ in range(B)]
    q = q.to(device=device, dtype=dtype)
    if width != D:  # already-truncated queries: zero-pad; only the [:dim] prefix is scored
        q = torch.nn.functional.pad(q, (0, D - width))
    q = q.contiguous()
    if index is not None:
        values, ids = index.search(q, k, dim=D if dim is None else dim)
    else:
        if corpus.stride(1) != 1:
            corpus = corpus.contiguous()
        values, ids = matryoshka_topk(q, corpus, k, [D if dim is None else dim], metric=metric)
        values, ids = values[0], ids[0]
    values, ids = values.cpu().tolist(), ids.cpu().tolist()
    return [[{"corpus_id": c, "score": s} for c, s in zip(row_ids, row_vals)]
            for row_ids, row_vals in zip(ids, values)]


def index_from_model(model, sentences: Sequence[str], *, dims: Sequence[int] | None = None, batch_size: int = 32,
                     show_progress_bar: bool | None = None, metric: str = "cosine",
                     encode_kwargs: dict[str, Any] | None = None, **index_kwargs) -> MatryoshkaIndex:
    """Encodes ``sentences`` with a sentence-transformers model and returns a
    :class:`~embedops.MatryoshkaIndex` of the raw embeddings (``normalize_embeddings=False``: the
    index renormalises every prefix itself under cosine, so a search at any prefix is exact).
    ``MatryoshkaIndex.from_model`` is this function.

    Args:
        model: a ``SentenceTransformer`` (anything with its ``encode``).
        sentences: a list (sequence) of strings; row ``i`` of the index is ``sentences[i]``.
        dims: prefix sizes whose norms the index precomputes (see :class:`~embedops.MatryoshkaIndex`;
            default: the powers of two from 16 below D, and D).
        batch_size: the encoder's batch size.
        show_progress_bar: a progress bar on stderr (rich's when rich is installed, else
            sentence-transformers' tqdm). ``None`` (default): only when stderr is a terminal, so logs
            and CI output stay quiet.
        metric: ``"cosine"`` or ``"dot"``.
        encode_kwargs: more keyword arguments for ``model.encode`` (e.g. ``prompt_name``).
        **index_kwargs: ``dtype``, ``device`` of the index.

    Sentences are encoded longest first in chunks of ``16 * batch_size`` (the bar advances per
    chunk); the index keeps the input order.

    Raises:
        TypeError for a model without ``encode`` or sentences that are not a sequence of strings;
        ValueError for bad ``batch_size``, ``dims`` or ``metric``, or an empty input whose width the
        model does not report.
    """
    fn = "index_from_model"
    if not callable(getattr(model, "encode", None)):
        raise TypeError(f"{fn}: model must be a sentence-transformers model (with .encode), got {type(model).__name__}")
    if isinstance(sentences, (str, bytes)) or not isinstance(sentences, Sequence):
        raise TypeError(f"{fn}: sentences must be a list of strings (wrap one text as [text]), got "
                        f"{type(sentences).__name__}")
    sentences = list(sentences)
    bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
    if bad is not None:
        raise TypeError(f"{fn}: sentences[{bad}] must be a str, got {type(sentences[bad]).__name__}")
    batch_size = _int(fn, "batch_size", batch_size)
    if batch_size <= 0:
        raise ValueError(f"{fn}: batch_size must be > 0, got {batch_size}")
    metric = check_metric(fn, metric)
    kwargs = dict(encode_kwargs or {})
    for reserved in ("batch_size", "show_progress_bar", "normalize_embeddings", "convert_to_numpy",
                     "convert_to_tensor", "output_value"):
        if reserved in kwargs:
            raise ValueError(f"{fn}: encode_kwargs may not set {reserved!r} (set by index_from_model)")

    def encode(batch, bar: bool) -> torch.Tensor:
        emb = model.encode(batch, batch_size=batch_size, show_progress_bar=bar, convert_to_tensor=True,
                           normalize_embeddings=False, **kwargs)
        emb = torch.as_tensor(emb)
        if emb.dim() != 2 or emb.shape[0] != len(batch):
            raise ValueError(f"{fn}: model.encode returned shape {tuple(emb.shape)} for {len(batch)} sentences")
        return emb

    if not sentences:
        get_dim = (getattr(model, "get_embedding_dimension", None)  # the newer name
                   or getattr(model, "get_sentence_embedding_dimension", None))
        D = get_dim() if callable(get_dim) else None
        if D is None:
            raise ValueError(f"{fn}: sentences is empty and the model does not report its embedding dimension")
        return MatryoshkaIndex(D, dims=dims, metric=metric, **index_kwargs)

    show = show_progress(show_progress_bar)
    if show and not rich_available():  # one encode call with sentence-transformers' own bar
        emb = encode(sentences, True)
        index = MatryoshkaIndex(emb.shape[1], dims=dims, metric=metric, **index_kwargs)
        index.add(emb)
        return index

    # longest first (as encode sorts within a call), in chunks, so the bar moves; rows put back in order
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    chunk = 16 * batch_size
    parts = []
    with ProgressBar("encoding", len(sentences), show) as bar:
        for start in range(0, len(order), chunk):
            idx = order[start: start + chunk]
            parts.append(encode([sentences[i] for i in idx], False))
            bar.advance(len(idx))
    emb = torch.cat(parts) if len(parts) > 1 else parts[0]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    emb = emb[inverse.to(emb.device)]
    index = MatryoshkaIndex(emb.shape[1], dims=dims, metric=metric, **index_kwargs)
    index.add(emb)
    return index


__all__ = ["index_from_model", "semantic_search"]
