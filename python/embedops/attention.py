"""Attention family: fused cross-modal attention (queries from one modality, keys/values from
another), with key/query lengths, a varlen layout, GQA/MQA, forward and backward."""

from __future__ import annotations

import numbers

import torch

from ._utils import check_device, check_int


def _check_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(op, name, t)
    return t


def _check_optional_tensor(op: str, name: str, t):
    return None if t is None else _check_tensor(op, name, t)


def _check_scale(op: str, scale):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def cross_attention(q, k, v, *, kv_lengths=None, q_lengths=None, scale=None, return_lse=False):
    """Fused attention ``softmax(scale * q k^T, masked) v`` per head, for queries and keys of
    different lengths (cross-modal attention); the (Lq x Lk) score matrix is never stored.

    Args:
        q: queries, ``(B, Lq, Hq, D)``, float32 / float16 / bfloat16 / float64, CPU or CUDA. Any
            strides (a view such as ``x.transpose(1, 2)`` of a (B, H, L, D) tensor is read in place
            when its last dim is contiguous).
        k: keys, ``(B, Lk, Hkv, D)``, q's dtype and device. ``Hq % Hkv == 0`` (grouped-query /
            multi-query attention: query head h uses key/value head ``h // (Hq // Hkv)``).
        v: values, ``(B, Lk, Hkv, Dv)``, q's dtype and device; Dv may differ from D.
        kv_lengths: optional ``(B,)`` int32/int64 on q's device, each in ``[0, Lk]``: keys
            ``j >= kv_lengths[b]`` are ignored (key padding).
        q_lengths: optional ``(B,)`` int32/int64 on q's device, each in ``[0, Lq]``: rows
            ``i >= q_lengths[b]`` output 0 (and lse -inf, zero gradient).
        scale: multiplier of the scores; default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of the scaled, masked scores.

    Returns:
        ``out`` ``(B, Lq, Hq, Dv)`` in q's dtype; with ``return_lse=True`` the tuple
        ``(out, lse)`` with ``lse`` ``(B, Hq, Lq)`` float32 (float64 for float64 inputs).
        A row without any valid key (``kv_lengths[b] == 0``) outputs 0 with lse ``-inf`` and gets
        a zero gradient, never NaN.

    Differentiable in q, k, v (and through lse); the backward recomputes the probabilities from
    lse (flash-style). Softmax statistics and accumulators are float32 (float64 for float64).
    Errors (ValueError / TypeError naming the argument): wrong ranks, mismatched sizes,
    ``Hq % Hkv != 0``, lengths out of range or not integer, dtype or device mismatches.
    """
    op = "cross_attention"
    q = _check_tensor(op, "q", q)
    k = _check_tensor(op, "k", k)
    v = _check_tensor(op, "v", v)
    kv_lengths = _check_optional_tensor(op, "kv_lengths", kv_lengths)
    q_lengths = _check_optional_tensor(op, "q_lengths", q_lengths)
    scale = _check_scale(op, scale)
    return_lse = _check_bool(op, "return_lse", return_lse)
    out, lse = torch.ops.embedops.cross_attention(q, k, v, kv_lengths, q_lengths, scale)
    return (out, lse) if return_lse else out


def cross_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None,
                           return_lse=False):
    """:func:`cross_attention` on packed sequences (no padding), FlashAttention's varlen layout.

    Sequence b has queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and keys/values
    ``k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]``; queries attend only to keys of their own sequence.

    Args:
        q: ``(Tq, Hq, D)`` float32 / float16 / bfloat16 / float64, CPU or CUDA.
        k: ``(Tk, Hkv, D)``, q's dtype and device, ``Hq % Hkv == 0``.
        v: ``(Tk, Hkv, Dv)``, q's dtype and device.
        cu_seqlens_q: ``(B + 1,)`` int32/int64 on q's device: 0, non-decreasing, ending at Tq.
        cu_seqlens_k: ``(B + 1,)`` int32/int64 on q's device: 0, non-decreasing, ending at Tk.
        max_seqlen_q: Python int >= the longest query sequence (a Python int so that
            torch.compile needs no graph break).
        max_seqlen_k: Python int >= the longest key sequence.
        scale: multiplier of the scores; default ``1 / sqrt(D)``.
        return_lse: also return lse.

    Returns:
        ``out`` ``(Tq, Hq, Dv)`` in q's dtype, or ``(out, lse)`` with ``lse`` ``(Hq, Tq)`` float32
        (float64 for float64 inputs). A sequence with no keys gives out 0 and lse -inf.
    """
    op = "cross_attention_varlen"
    q = _check_tensor(op, "q", q)
    k = _check_tensor(op, "k", k)
    v = _check_tensor(op, "v", v)
    cu_seqlens_q = _check_tensor(op, "cu_seqlens_q", cu_seqlens_q)
    cu_seqlens_k = _check_tensor(op, "cu_seqlens_k", cu_seqlens_k)
    max_seqlen_q = check_int(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = check_int(op, "max_seqlen_k", max_seqlen_k)
    scale = _check_scale(op, scale)
    return_lse = _check_bool(op, "return_lse", return_lse)
    out, lse = torch.ops.embedops.cross_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k, scale)
    return (out, lse) if return_lse else out


def co_attention(qx, ky, vx, vy, *, x_lengths=None, y_lengths=None, scale=None):
    """Bidirectional co-attention with ONE shared affinity: ``S = scale * qx ky^T`` per (batch, head),
    ``ox = softmax_y(S) vy`` and ``oy = softmax_x(S)^T vx``.

    S is computed once per tile and feeds both softmaxes (the column statistics are per-tile
    partial (max, sum, acc) states merged by a deterministic log-sum-exp combine); the backward
    uses one shared ``dS = Pr (dPr - Dr) + Pc (dPc - Dc)``. Neither (Lx x Ly) matrix is stored.

    Args:
        qx: queries of modality x, ``(B, Lx, H, D)``, float32 / float16 / bfloat16 / float64, CPU or
            CUDA (CUDA: head dims up to 256).
        ky: keys of modality y, ``(B, Ly, H, D)``, qx's dtype and device.
        vx: values of x (attended to by y), ``(B, Lx, H, Dvx)``.
        vy: values of y (attended to by x), ``(B, Ly, H, Dvy)``.
        x_lengths: optional ``(B,)`` int32/int64, each in ``[0, Lx]``: rows ``i >= x_lengths[b]`` are
            padding: excluded from the column softmax, and their ox is 0.
        y_lengths: optional ``(B,)`` int32/int64, each in ``[0, Ly]``: columns ``j >= y_lengths[b]``
            are padding: excluded from the row softmax, and their oy is 0.
        scale: multiplier of the affinity; default ``1 / sqrt(D)``.

    Returns:
        ``(ox, oy)``: ``ox`` ``(B, Lx, H, Dvy)``, ``oy`` ``(B, Ly, H, Dvx)``, in qx's dtype. A row
        (column) with nothing valid on the other side is 0, never NaN, with zero gradient.

    Differentiable in qx, ky, vx, vy. Errors (ValueError / TypeError naming the argument): ranks,
    mismatched sizes or heads, lengths out of range or not integer, dtype/device mismatches.
    On CUDA the affinity is computed once per direction (two passes of the cross_attention
    kernels); the single-pass shared-tile kernel is CPU-only so far.
    """
    op = "co_attention"
    qx = _check_tensor(op, "qx", qx)
    ky = _check_tensor(op, "ky", ky)
    vx = _check_tensor(op, "vx", vx)
    vy = _check_tensor(op, "vy", vy)
    x_lengths = _check_optional_tensor(op, "x_lengths", x_lengths)
    y_lengths = _check_optional_tensor(op, "y_lengths", y_lengths)
    scale = _check_scale(op, scale)
    ox, oy, _, _ = torch.ops.embedops.co_attention(qx, ky, vx, vy, x_lengths, y_lengths, scale)
    return ox, oy


def mixture_attention(q, k, v, segment_lengths, weights, *, scale=None):
    """Modality-mixture attention: K/V are M modalities concatenated along the key axis, each
    with its own softmax, mixed per query row by ``weights``:
    ``out_i = sum_m weights[b, i, (h,) m] * softmax_{j in m}(scale * q_i k_j^T) v_j``.

    One pass over the keys with a per-modality online-softmax state (no (Lq x Lk) matrix).

    Args:
        q: ``(B, Lq, Hq, D)``, float32 / float16 / bfloat16 / float64, CPU or CUDA.
        k: ``(B, Lk, Hkv, D)``, q's dtype and device, ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``(B, Lk, Hkv, Dv)``, q's dtype and device.
        segment_lengths: ``(B, M)`` int32/int64, each >= 0, each row summing to at most Lk:
            modality m of batch b is keys ``[sum_{m'<m} len, sum_{m'<=m} len)`` (segments packed from
            key 0 in order; the rest is padding). An empty modality contributes 0.
        weights: ``(B, Lq, M)`` (shared by the heads) or ``(B, Lq, Hq, M)``, q's dtype; used as given
            (not normalised by the op).
        scale: multiplier of the scores; default ``1 / sqrt(D)``.

    Returns:
        ``out`` ``(B, Lq, Hq, Dv)`` in q's dtype.

    Differentiable in q, k, v and weights (``dweights[b,i,(h,)m] = dO_i . O_{i,m}``). Errors
    (ValueError / TypeError naming the argument) for bad shapes, dtypes, devices and lengths.
    On CUDA: one cross_attention kernel pass per modality (not a single pass over the keys).
    """
    op = "mixture_attention"
    q = _check_tensor(op, "q", q)
    k = _check_tensor(op, "k", k)
    v = _check_tensor(op, "v", v)
    segment_lengths = _check_tensor(op, "segment_lengths", segment_lengths)
    weights = _check_tensor(op, "weights", weights)
    scale = _check_scale(op, scale)
    out, _, _ = torch.ops.embedops.mixture_attention(q, k, v, segment_lengths, weights, scale)
    return out
