"""Compressed embeddings: sentence-transformers-compatible quantisation and binary-code search.

``quantize_embeddings`` produces the same codes (values and bit order) as
``sentence_transformers.quantize_embeddings``, so codes users already have work here; numpy in ->
numpy out, torch in -> torch out. ``hamming_topk`` scans packed binary codes over a bit prefix (a
Matryoshka model's first dimensions carry the most information, so a short prefix shortlists
well) with a fused popcount + selection kernel that never materialises the (B, N) distances.
"""

from __future__ import annotations

import numpy as np
import torch

from ._utils import check_device, check_int, to_tensor

_PRECISIONS = ("int8", "uint8", "binary", "ubinary")


def _ranges_from(op: str, data: torch.Tensor, name: str) -> torch.Tensor:
    if data.dim() != 2 or data.shape[0] == 0:
        raise ValueError(f"{op}: {name} must be a non-empty (n, D) array to take per-dimension ranges from, "
                         f"got shape {tuple(data.shape)}")
    if data.shape[0] == 1:
        raise ValueError(f"{op}: int8/uint8 ranges from a single embedding are degenerate; give ranges= or "
                         f"calibration_embeddings=")
    return torch.stack([data.amin(0), data.amax(0)])


def quantize_embeddings(x, precision: str, *, ranges=None, calibration_embeddings=None):
    """Quantise float embeddings ``(n, D)`` exactly as sentence-transformers does.

    Args:
        x: float embeddings, numpy array or torch tensor (any float dtype, CPU or CUDA), ``(n, D)``.
        precision: ``"int8"`` / ``"uint8"``: per-dimension ranges ``[min, max]`` split into 255
            steps, ``floor((x - min) / step)`` clipped to [0, 255] (``int8`` subtracts 128);
            ``"ubinary"``: ``x > 0`` packed MSB-first into uint8 (``(n, ceil(D / 8))``; dimension i
            is bit ``7 - i % 8`` of byte ``i // 8``); ``"binary"``: ubinary - 128 as int8.
        ranges: ``(2, D)`` min/max rows for int8/uint8 (default: from ``calibration_embeddings``,
            else from ``x`` itself).
        calibration_embeddings: ``(m, D)`` embeddings to take the ranges from.

    Returns:
        The codes, numpy if ``x`` was numpy else a tensor on ``x``'s device. NaN inputs: int8/uint8
        follow numpy's float-to-int cast of NaN (undefined; clean your data); binary codes treat
        NaN as not > 0 (bit 0).
    """
    op = "quantize_embeddings"
    t, was_np = to_tensor(x, op, "x")
    if precision not in _PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {_PRECISIONS}, got {precision!r}")
    if t.dim() != 2:
        raise ValueError(f"{op}: x must have shape (n, D), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: x must be floating point embeddings, got {t.dtype}")
    if precision.endswith("binary"):
        bits = (t > 0).to(torch.uint8)
        pad = (-t.shape[1]) % 8
        if pad:
            bits = torch.nn.functional.pad(bits, (0, pad))
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=t.device)
        packed = (bits.view(t.shape[0], -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
        out = packed if precision == "ubinary" else (packed.to(torch.int16) - 128).to(torch.int8)
    else:
        if ranges is not None:
            r, _ = to_tensor(ranges, op, "ranges")
            if r.dim() != 2 or r.shape[0] != 2 or r.shape[1] != t.shape[1]:
                raise ValueError(f"{op}: ranges must have shape (2, D={t.shape[1]}), got {tuple(r.shape)}")
        elif calibration_embeddings is not None:
            c, _ = to_tensor(calibration_embeddings, op, "calibration_embeddings")
            if c.dim() != 2 or c.shape[1] != t.shape[1]:
                raise ValueError(f"{op}: calibration_embeddings must have shape (m, D={t.shape[1]}), got "
                                 f"{tuple(c.shape)}")
            r = _ranges_from(op, c.to(t.device, torch.float32), "calibration_embeddings")
        else:
            r = _ranges_from(op, t.to(torch.float32), "x")
        # float32 arithmetic, as sentence-transformers (numpy float32) does
        r = r.to(t.device, torch.float32)
        starts = r[0]
        steps = (r[1] - starts) / 255
        steps = torch.where(steps == 0, torch.ones_like(steps), steps)
        xv = t.to(torch.float32) if t.dtype != torch.float64 else t
        q = torch.clamp(torch.floor((xv - starts.to(xv.dtype)) / steps.to(xv.dtype)), 0, 255)
        out = q.to(torch.uint8) if precision == "uint8" else (q - 128).to(torch.int8)
    return out.cpu().numpy() if was_np else out


def hamming_topk(query_codes, corpus_codes, k: int, *, nbits: int | None = None):
    """The ``k`` nearest corpus codes of each query by Hamming distance over the first ``nbits`` bits.

    Args:
        query_codes: packed binary codes ``(B, nbytes)``, uint8 (``"ubinary"``) or int8
            (``"binary"``), numpy or torch (CPU or CUDA), e.g. from :func:`quantize_embeddings`.
        corpus_codes: ``(N, nbytes)``, the same dtype and device; or segment-major ``(P, N,
            piece_bytes)`` with ``P * piece_bytes = nbytes`` and ``piece_bytes`` a multiple of 8
            (piece ``p`` of every row holds its bytes ``[p * piece_bytes, (p + 1) * piece_bytes)``;
            any row stride: e.g. a row slice of a larger store), so that a short bit prefix reads
            only its own pieces (:class:`MatryoshkaIndex` stores its bits so, in 32-byte pieces).
        k: results per query, ``0 <= k <= N``.
        nbits: compare the first ``nbits`` bits (dimensions) only, in ``[1, 8 * nbytes]``; any
            value (not only multiples of 8: a partial last byte compares its high bits). Default:
            every bit.

    Returns:
        ``(distances, indices)``, each ``(B, k)``: int32 Hamming distances nearest first (ties to
        the lower index) and int64 corpus rows; numpy if the queries were numpy.

    The scan is fused (XOR + popcount + a bounded top-k per query); memory beyond the outputs is
    O(threads x B x k), never B x N.
    """
    op = "hamming_topk"
    q, was_np = to_tensor(query_codes, op, "query_codes")
    x, _ = to_tensor(corpus_codes, op, "corpus_codes")
    check_device(op, "query_codes", q)
    k = check_int(op, "k", k)
    nb = -1 if nbits is None else check_int(op, "nbits", nbits)
    d, i = torch.ops.embedops.hamming_topk(q, x, k, nb)
    return (d.cpu().numpy(), i.cpu().numpy()) if was_np else (d, i)


def _code_ranges(op: str, ranges, device: torch.device) -> torch.Tensor:
    if ranges is None:
        raise ValueError(f"{op}: ranges= is required: the (2, D) per-dimension min/max the codes were quantised "
                         "with (quantize_embeddings' ranges, or the min/max of its calibration embeddings)")
    r, _ = to_tensor(ranges, op, "ranges")
    if r.dim() != 2 or r.shape[0] != 2:
        raise ValueError(f"{op}: ranges must have shape (2, D) (min row, max row), got {tuple(r.shape)}")
    return r.to(device)


def int8_topk(queries, corpus_codes, k: int, *, ranges, dim: int | None = None, metric: str = "dot"):
    """Exact top-k of float queries against int8 / uint8 codes, dequantised on the fly (asymmetric).

    Args:
        queries: ``(B, D)`` float queries (numpy or torch; float32, float16, bfloat16 or float64;
            scores are float32, float64 for float64 queries).
        corpus_codes: ``(N, D)`` codes from :func:`quantize_embeddings` with precision ``"int8"``
            or ``"uint8"``, the queries' device.
        k: results per query, ``0 <= k <= N``.
        ranges: ``(2, D)`` the per-dimension ``[min; max]`` the codes were made with. Code ``c`` of
            dimension j stands for the midpoint of its step, ``min_j + (u + 0.5) * step_j`` with
            ``u = c + 128`` for int8 (``c`` for uint8) and ``step_j = (max_j - min_j) / 255``.
        dim: score the first ``dim`` dimensions only (a Matryoshka prefix; default D).
        metric: ``"dot"`` (default, sentence-transformers' rescoring) or ``"cosine"`` (each row's
            dequantised prefix renormalised).

    Returns:
        ``(values, indices)``, each ``(B, k)``: scores best first (ties to the lower index, NaN
        last) and int64 row ids; numpy if the queries were numpy.

    The codes are dequantised tile by tile inside the scan (never the whole corpus), and the
    selection is fused as in :func:`embedops.matryoshka_topk`.
    """
    op = "int8_topk"
    q, was_np = to_tensor(queries, op, "queries")
    x, _ = to_tensor(corpus_codes, op, "corpus_codes")
    check_device(op, "queries", q)
    k = check_int(op, "k", k)
    r = _code_ranges(op, ranges, q.device)
    d = q.shape[-1] if dim is None else check_int(op, "dim", dim)
    v, i = torch.ops.embedops.int8_topk(q, [x], r, k, [d], metric)
    v, i = v[0], i[0]
    return (v.cpu().numpy(), i.cpu().numpy()) if was_np else (v, i)


__all__ = ["hamming_topk", "int8_topk", "quantize_embeddings"]
