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
