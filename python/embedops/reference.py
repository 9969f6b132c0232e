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

# ---- attention ---------------------------------------------------------------------------------
