"""Plain reference implementations of every embedops op: the tests' ground truth.

Written from the definitions with numpy / PyTorch (float64 where it matters), with no
embedops kernel involved.
"""

from __future__ import annotations

import numpy as np

# ---- embedding ---------------------------------------------------------------------------------

_M13_A = np.uint64(0xBF58476D1CE4E5B9)
_M13_B = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_MASK32 = np.uint64(0xFFFFFFFF)


def _mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (for the scalar salt)."""
    z &= _MASK64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M13_A
    z = z ^ (z >> np.uint64(27))
    z = z * _M13_B
    return z ^ (z >> np.uint64(31))


def hash_salt(seed: int, feature: int, probe: int) -> int:
    return _mix64_int(_mix64_int((seed & _MASK64) + _GOLDEN) ^ ((feature << 32) | probe))


def _mulhi64(a: np.ndarray, b: int) -> np.ndarray:
    """High 64 bits of a * b for uint64 arrays a and a scalar b < 2^64, by 32-bit halves."""
    b_lo, b_hi = np.uint64(b & 0xFFFFFFFF), np.uint64(b >> 32)
    a_lo, a_hi = a & _MASK32, a >> np.uint64(32)
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    lo_hi = a_lo * b_hi
    hi_hi = a_hi * b_hi
    cross = (lo_lo >> np.uint64(32)) + (hi_lo & _MASK32) + lo_hi
    return hi_hi + (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32))


def hash_ids(values, *, feature: int, probe: int, num_rows: int, seed: int = 0) -> np.ndarray:
    """numpy re-implementation of embedops.hash_ids (same bits); returns int64 rows."""
    v = np.asarray(values)
    if v.dtype.kind != "i":
        raise TypeError(f"reference.hash_ids: values must be signed integers, got {v.dtype}")
    u = v.astype(np.int64).view(np.uint64)
    salt = np.uint64(hash_salt(seed, feature, probe))
    with np.errstate(over="ignore"):
        h = _mix64_np(u ^ salt)
        return _mulhi64(h, num_rows).astype(np.int64)


def _srl(z, k: int):
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _as_signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _mix64_torch(z):
    z = z ^ _srl(z, 30)
    z = z * _as_signed(0xBF58476D1CE4E5B9)
    z = z ^ _srl(z, 27)
    z = z * _as_signed(0x94D049BB133111EB)
    return z ^ _srl(z, 31)


def hash_ids_torch(values, *, feature: int, probe: int, num_rows: int, seed: int = 0):
    """The same hash with torch int64 ops (wrapping multiply, masked shifts), on any device.

    This is what a user writes without embedops; it is the benchmarks' baseline for hashing.
    """
    import torch

    z = values.to(torch.int64) ^ _as_signed(hash_salt(seed, feature, probe))
    h = _mix64_torch(z)
    # high 64 bits of h * num_rows, by 32-bit halves
    m32 = 0xFFFFFFFF
    b_lo, b_hi = num_rows & m32, num_rows >> 32
    a_lo, a_hi = h & m32, _srl(h, 32)
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    cross = _srl(lo_lo, 32) + (hi_lo & m32) + a_lo * b_hi
    return a_hi * b_hi + _srl(hi_lo, 32) + _srl(cross, 32)


def multiplexed_embedding_bag(weight, values, offsets, num_probes, *, combine="concat", mode="sum",
                              per_sample_weights=None, seed=0):
    """Reference of embedops.multiplexed_embedding_bag in float64 from hash_ids + plain torch.

    weight (R, D) float tensor (may require grad; the result is differentiable through plain
    torch ops), values (N,) ints, offsets (F*B + 1,) feature-major, num_probes: one int per
    feature. Rows come from the numpy hash_ids; pooling from F.embedding_bag in float64.
    Returns (B, out_dim) float64.
    """
    import torch
    import torch.nn.functional as F

    w = weight.double() if weight.dtype != torch.float64 else weight
    psw = None if per_sample_weights is None else per_sample_weights.double()
    offs = offsets.cpu().long()
    vals = values.cpu().long().numpy()
    nf = len(num_probes)
    batch = (offs.numel() - 1) // nf
    blocks = []
    for f in range(nf):
        lo, hi = int(offs[f * batch]), int(offs[(f + 1) * batch])
        off_f = (offs[f * batch:(f + 1) * batch + 1] - lo).to(w.device)
        pooled = []
        for p in range(num_probes[f]):
            rows = torch.from_numpy(hash_ids(vals[lo:hi], feature=f, probe=p, num_rows=w.shape[0], seed=seed))
            pooled.append(F.embedding_bag(rows.to(w.device), w, off_f, mode=mode, include_last_offset=True,
                                          per_sample_weights=None if psw is None else psw[lo:hi]))
        if combine == "concat":
            blocks.extend(pooled)
        elif combine == "sum":
            blocks.append(torch.stack(pooled).sum(0))
        else:
            blocks.append(torch.stack(pooled).mean(0))
    if not blocks or batch == 0:
        width = (sum(num_probes) if combine == "concat" else nf) * w.shape[1]
        return w.new_zeros((batch, width))
    return torch.cat(blocks, dim=1)


# ---- matryoshka --------------------------------------------------------------------------------


def _mat_inv_norm(v, d):
    """float64 1/||v[:, :d]||: 0 for a zero prefix, NaN for a non-finite one (the kernels' rule)."""
    import torch

    sq = (v[:, :d] * v[:, :d]).sum(1)
    inv = 1.0 / sq.sqrt()
    inv = torch.where(sq == 0, torch.zeros_like(inv), inv)
    return torch.where(torch.isfinite(sq), inv, torch.full_like(inv, float("nan")))


def matryoshka_similarity(queries, corpus, dims, *, metric: str = "cosine"):
    """(len(dims), B, N) float64 scores at each prefix, computed per prefix from the definition.

    cosine at d: <q[:d], x[:d]> / (||q[:d]|| ||x[:d]||); 0 where either prefix is zero; NaN where
    either prefix holds inf/NaN (and the other is not zero). dot: the raw inner product.
    """
    import torch

    q = torch.as_tensor(queries).detach().cpu().double()
    x = torch.as_tensor(corpus).detach().cpu().double()
    out = []
    for d in dims:
        dot = q[:, :d] @ x[:, :d].T
        if metric == "cosine":
            a, b = _mat_inv_norm(q, d), _mat_inv_norm(x, d)
            zero = (a == 0)[:, None] | (b == 0)[None, :]
            dot = torch.where(zero, torch.zeros_like(dot), dot * a[:, None] * b[None, :])
        out.append(dot)
    return torch.stack(out) if out else q.new_empty((0, q.shape[0], x.shape[0]))


def topk_order(scores, k: int):
    """(values, indices) of the k best entries of each row of a float64 score matrix: score
    descending, NaN last, ties to the lower index (numpy lexsort, stable)."""
    s = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(s)
    key = np.where(nan, 0.0, -s)
    idx = np.empty(s.shape[:-1] + (k,), dtype=np.int64)
    flat_s, flat_nan, flat_key = s.reshape(-1, s.shape[-1]), nan.reshape(-1, s.shape[-1]), key.reshape(-1, s.shape[-1])
    flat_idx = idx.reshape(-1, k)
    for r in range(flat_s.shape[0]):
        order = np.lexsort((np.arange(flat_s.shape[1]), flat_key[r], flat_nan[r]))
        flat_idx[r] = order[:k]
    return np.take_along_axis(s, idx, axis=-1), idx


def matryoshka_topk(queries, corpus, k: int, dims, *, metric: str = "cosine"):
    """float64 (values, indices), each (len(dims), B, k), by sorting the reference scores."""
    return topk_order(matryoshka_similarity(queries, corpus, dims, metric=metric).numpy(), k)


def matryoshka_funnel(queries, corpus, dims, ks, *, metric: str = "cosine"):
    """float64 funnel: top ks[0] at dims[0], then each stage keeps the best ks[s] of the previous
    survivors rescored at dims[s]. Returns (values, indices), each (B, ks[-1])."""
    import torch

    q = torch.as_tensor(queries).detach().cpu().double()
    x = torch.as_tensor(corpus).detach().cpu().double()
    _, cand = matryoshka_topk(q, x, ks[0], [dims[0]], metric=metric)
    cand = cand[0]
    vals = None
    for d, kk in zip(dims[1:], ks[1:]):
        scores = np.stack([matryoshka_similarity(q[b:b + 1], x[cand[b]], [d], metric=metric)[0, 0].numpy()
                           for b in range(q.shape[0])])
        # rank by (score desc, NaN last, global index asc)
        new = np.empty((q.shape[0], kk), dtype=np.int64)
        vals = np.empty((q.shape[0], kk))
        for b in range(q.shape[0]):
            order = np.lexsort((cand[b], np.where(np.isnan(scores[b]), 0.0, -scores[b]), np.isnan(scores[b])))[:kk]
            new[b], vals[b] = cand[b][order], scores[b][order]
        cand = new
    if vals is None:
        vals, _ = matryoshka_topk(q, x, ks[0], [dims[0]], metric=metric)
        vals = vals[0]
    return vals, cand

# ---- attention ---------------------------------------------------------------------------------


def cross_attention(q, k, v, *, kv_lengths=None, q_lengths=None, scale=None, dtype=None):
    """Plain PyTorch attention with masks built from lengths; returns (out, lse).

    q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv). Computed in ``dtype`` (default
    float64; pass the inputs' dtype for "the same computation in that dtype by plain PyTorch").
    Keys j >= kv_lengths[b] are masked; rows i >= q_lengths[b], and rows without a valid key,
    give out 0 and lse -inf. out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) in ``dtype``.
    """
    import torch

    dtype = torch.float64 if dtype is None else dtype
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qh = q.to(dtype).transpose(1, 2)  # (B, Hq, Lq, D)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    valid = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if kv_lengths is not None:
        valid = valid & (torch.arange(Lk, device=q.device) < kv_lengths.to(q.device).view(B, 1, 1, 1))
    if q_lengths is not None:
        valid = valid & (torch.arange(Lq, device=q.device).view(1, 1, Lq, 1) < q_lengths.to(q.device).view(B, 1, 1, 1))
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s.float() if dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.where(valid.any(-1, keepdim=True), p, torch.zeros((), dtype=dtype, device=q.device))
    out = (p @ vh).transpose(1, 2)
    return out, lse.to(dtype if dtype == torch.float64 else lse.dtype)


def cross_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, dtype=None):
    """The varlen layout by a loop over sequences of :func:`cross_attention`; returns (out, lse).

    q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv); out (Tq, Hq, Dv), lse (Hq, Tq).
    """
    import torch

    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, l = cross_attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                               scale=scale, dtype=dtype)
        outs.append(o[0])
        lses.append(l[0])
    dtype = torch.float64 if dtype is None else dtype
    if not outs:
        return q.new_zeros((0, q.shape[1], v.shape[2]), dtype=dtype), q.new_zeros((q.shape[1], 0))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def co_attention(qx, ky, vx, vy, *, x_lengths=None, y_lengths=None, scale=None):
    """Two explicit softmaxes of one affinity, float64; returns (ox, oy, lse_x, lse_y).

    S = scale qx ky^T (B, H, Lx, Ly) over valid rows (i < x_lengths[b]) and columns
    (j < y_lengths[b]); ox = softmax over y of S times vy, oy = softmax over x of S^T times vx.
    Invalid rows/columns, and rows/columns with nothing valid on the other side, give 0 and lse -inf.
    """
    import torch

    B, Lx, H, D = qx.shape
    Ly = ky.shape[1]
    scale = D**-0.5 if scale is None else scale
    f = torch.float64
    s = torch.einsum("bihd,bjhd->bhij", qx.to(f), ky.to(f)) * scale
    xv = torch.ones(B, Lx, dtype=torch.bool, device=qx.device)
    yv = torch.ones(B, Ly, dtype=torch.bool, device=qx.device)
    if x_lengths is not None:
        xv = torch.arange(Lx, device=qx.device) < x_lengths.to(qx.device).view(B, 1)
    if y_lengths is not None:
        yv = torch.arange(Ly, device=qx.device) < y_lengths.to(qx.device).view(B, 1)
    valid = (xv[:, None, :, None] & yv[:, None, None, :]).expand(B, H, Lx, Ly)
    s = s.masked_fill(~valid, float("-inf"))
    zero = torch.zeros((), dtype=f, device=qx.device)
    pr = torch.where(valid.any(-1, keepdim=True), torch.softmax(s, -1), zero)
    pc = torch.where(valid.any(-2, keepdim=True), torch.softmax(s, -2), zero)
    ox = torch.einsum("bhij,bjhd->bihd", pr, vy.to(f))
    oy = torch.einsum("bhij,bihd->bjhd", pc, vx.to(f))
    return ox, oy, torch.logsumexp(s, -1), torch.logsumexp(s, -2)


def mixture_attention(q, k, v, segment_lengths, weights, *, scale=None):
    """Per-segment softmaxes, float64; returns (out, lse) with lse (B, Hq, Lq, M).

    Keys [start_m, start_m + len_m) of batch b form modality m (segments packed from 0 in order);
    out_i = sum_m weights[b, i, (h,) m] softmax_{j in m}(S_ij) v_j. An empty modality adds 0.
    """
    import torch

    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    M = segment_lengths.shape[1]
    scale = D**-0.5 if scale is None else scale
    f = torch.float64
    kh = k.to(f).repeat_interleave(Hq // Hkv, dim=2)
    vh = v.to(f).repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.to(f), kh) * scale
    w = weights.to(f)
    if w.dim() == 3:
        w = w[:, :, None, :].expand(B, Lq, Hq, M)
    seg = segment_lengths.to(torch.long).cpu()
    ends = seg.cumsum(1)
    starts = ends - seg
    pos = torch.arange(Lk)
    out = torch.zeros(B, Lq, Hq, v.shape[-1], dtype=f, device=q.device)
    lses = []
    for m in range(M):  # the modalities, each with its own softmax
        mask = ((pos[None] >= starts[:, m, None]) & (pos[None] < ends[:, m, None])).to(q.device)  # (B, Lk)
        sm = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = torch.where(mask.any(-1)[:, None, None, None], torch.softmax(sm, -1), torch.zeros((), dtype=f))
        om = torch.einsum("bhij,bjhd->bihd", p, vh)
        out = out + w[..., m, None] * om
        lses.append(torch.logsumexp(sm, -1))
    return out, torch.stack(lses, -1)
