"""Embedding family: the multiplexed (Unified Embedding) hash and hashed embedding bags."""

from __future__ import annotations

import numpy as np
import torch

from ._utils import check_device, check_int, to_tensor

_U32 = 2**32


def hash_ids(values, *, feature: int, probe: int, num_rows: int, seed: int = 0):
    """Rows of a shared table for raw categorical ids: THE hash of embedops' embedding family.

    Every lookup kernel of the family hashes ids with exactly this function, inside the kernel;
    ``hash_ids`` exposes it so users can inspect or precompute rows.

    Args:
        values: raw ids, any shape, ``torch.int32``/``torch.int64`` tensor (CPU or CUDA) or a
            numpy ``int32``/``int64`` array. Any 64-bit value is valid, negative ones included;
            int32 ids are sign-extended, so int32 ``-1`` and int64 ``-1`` hash alike.
        feature: feature number f, in [0, 2**32).
        probe: probe number p, in [0, 2**32) (Unified Embedding's "chunk").
        num_rows: R, the number of rows of the table, in [1, 2**63).
        seed: any int64; changes every row assignment.

    Returns:
        int64 rows in ``[0, num_rows)`` with the shape of ``values``; a numpy array if ``values``
        was one, else a tensor on ``values``' device.

    The formula (unsigned 64-bit arithmetic, modulo 2**64; v and seed as two's complement)::

        mix64(z)      = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
                        z *= 0x94D049BB133111EB; z ^= z >> 31            (splitmix64 finaliser)
        salt(s, f, p) = mix64(mix64(s + 0x9E3779B97F4A7C15) ^ (f << 32 | p))
        row(v)        = (mix64(v ^ salt(seed, feature, probe)) * num_rows) >> 64

    For one (seed, feature, probe) the map from id to 64-bit hash is a bijection; the row is
    the hash's high bits scaled into [0, num_rows) (Lemire's multiply-shift).
    """
    op = "hash_ids"
    feature = check_int(op, "feature", feature)
    probe = check_int(op, "probe", probe)
    num_rows = check_int(op, "num_rows", num_rows)
    seed = check_int(op, "seed", seed)
    if not 0 <= feature < _U32:
        raise ValueError(f"{op}: feature must be in [0, 2^32), got {feature}")
    if not 0 <= probe < _U32:
        raise ValueError(f"{op}: probe must be in [0, 2^32), got {probe}")
    if not 0 < num_rows < 2**63:
        raise ValueError(f"{op}: num_rows must be in [1, 2^63), got {num_rows}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{op}: seed must fit in int64, got {seed}")
    t, was_numpy = to_tensor(values, op, "values")
    check_device(op, "values", t)
    rows = torch.ops.embedops.hash_ids(t, feature, probe, num_rows, seed)
    return rows.numpy() if was_numpy else rows


__all__ = ["hash_ids"]
