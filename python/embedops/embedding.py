"""Embedding family: the multiplexed (Unified Embedding) hash and hashed embedding bags."""

from __future__ import annotations

import numpy as np
import torch

from ._utils import check_device, check_int, check_int64, to_tensor


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
    # Python ints (the op's ranges are checked in C++)
    feature, probe, num_rows, seed = (check_int64(op, name, x) for name, x in
                                      (("feature", feature), ("probe", probe), ("num_rows", num_rows),
                                       ("seed", seed)))
    t, was_numpy = to_tensor(values, op, "values")
    check_device(op, "values", t)
    rows = torch.ops.embedops.hash_ids(t, feature, probe, num_rows, seed)
    return rows.numpy() if was_numpy else rows




def _probe_list(op: str, num_probes, num_features) -> list[int]:
    if isinstance(num_probes, (list, tuple)):
        probes = [check_int(op, "num_probes[i]", p) for p in num_probes]
        if not probes:
            raise ValueError(f"{op}: num_probes must not be empty")
        if num_features is not None and check_int(op, "num_features", num_features) != len(probes):
            raise ValueError(f"{op}: num_features={num_features} but num_probes lists {len(probes)} features")
    else:
        p = check_int(op, "num_probes", num_probes)
        nf = 1 if num_features is None else check_int(op, "num_features", num_features)
        if nf <= 0:
            raise ValueError(f"{op}: num_features must be > 0, got {nf}")
        probes = [p] * nf
    for f, p in enumerate(probes):
        if p <= 0:
            raise ValueError(f"{op}: num_probes[{f}] (the probe count of feature {f}) must be > 0, got {p}")
    return probes


def lengths_to_offsets(lengths: torch.Tensor, *, validate: bool = True, op: str = "lengths_to_offsets") -> torch.Tensor:
    """(M,) int bag lengths -> (M + 1,) int64 offsets starting at 0 (a cumulative sum).

    With ``validate`` (default) negative lengths raise ValueError; on CUDA this check reads one
    value back to the host (a synchronisation).
    """
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: lengths must be an integer tensor of dtype int32 or int64, got {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"{op}: lengths must have 1 dim (F*B,), got shape {tuple(lengths.shape)}")
    if validate and lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"{op}: lengths must be >= 0, got a negative length")
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int64), (1, 0))


def multiplexed_embedding_bag(weight, values, offsets=None, *, lengths=None, num_probes=1, num_features=None,
                              combine: str = "concat", mode: str = "sum", per_sample_weights=None, seed: int = 0,
                              validate: bool = True) -> torch.Tensor:
    """Embedding bags over one shared table with multiplexed hashing (Unified Embedding), fused.

    F categorical features share the table ``weight``; every raw id ``v`` of feature ``f`` is
    looked up ``P_f`` times, at rows ``hash_ids(v, feature=f, probe=p, num_rows=R, seed=seed)``
    for ``p < P_f``. The hash is computed inside the lookup kernel: no hashed index tensor is
    ever materialised.

    Args:
        weight: (R, D) float32/float16/bfloat16/float64 table (CPU or CUDA). Differentiable
            (dense, deterministic gradient: identical bits run to run). Or, for inference, an
            int8 row-quantised table: a contiguous uint8 tensor (R, D + 8) in FBGEMM's fused
            layout (see :func:`quantize_table`), each row D codes then its float32 scale and
            float32 bias; element value = scale * code + bias, pooled in float32. The uint8
            dtype selects this layout (D = columns - 8); it has no gradient (the backward and
            the fused optimizer update raise TypeError), and all modes, ``per_sample_weights``
            (float32) and the hashing work as for a float table.
        values: (N,) int32/int64 raw ids, any 64-bit value (negative ones too).
        offsets: (F*B + 1,) int32/int64, feature-major bags like TorchRec's KeyedJaggedTensor:
            bag (f, b) is ``values[offsets[f*B + b] : offsets[f*B + b + 1]]``. Must start at 0,
            be non-decreasing and end at most at N (ids after ``offsets[-1]`` are ignored).
        lengths: (F*B,) int32/int64 bag lengths instead of ``offsets`` (exactly one of the two).
        num_probes: P_f: an int (the same for every feature) or a list with one int per feature.
            F is ``len(num_probes)`` for a list; for an int, F is ``num_features`` (default 1).
            B is then ``(len(offsets) - 1) / F``.
        num_features: F when ``num_probes`` is an int.
        combine: how a feature's probes combine: ``"concat"`` (feature f gives P_f*D columns,
            probe p in its p-th D-block), ``"sum"`` or ``"mean"`` (D columns per feature).
        mode: pooling over a bag: ``"sum"``, ``"mean"`` or ``"max"``. Empty bags give zeros.
        per_sample_weights: (N,) weights of the ids (dtype of ``weight``; float32 with a uint8
            table), only with mode ``"sum"``; differentiable (float tables).
        seed: int64 hash seed; changes every row assignment.
        validate: check offsets on the data. On CPU the checks always run (O(F*B)). On CUDA they
            run on the device inside the kernels and raise a RuntimeError naming the problem
            afterwards, which costs one device-to-host read of an error flag (a stream
            synchronisation) per call; ``validate=False`` skips the flag read (bad offsets are
            then clamped on the device, never read out of bounds, but give wrong results).

    Returns:
        (B, out_dim) tensor of ``weight``'s dtype (float32 for a uint8 table), out_dim =
        ``sum(P_f) * D`` for ``"concat"``, ``F * D`` otherwise; features in order, each its block.

    Raises:
        TypeError / ValueError / IndexError naming the argument for wrong dtypes, shapes, modes,
        probe counts, bad offsets or negative lengths.
    """
    op = "multiplexed_embedding_bag"
    for name, t in (("weight", weight), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(op, "weight", weight)
    if (offsets is None) == (lengths is None):
        raise ValueError(f"{op}: give exactly one of offsets and lengths")
    if lengths is not None:
        offsets = lengths_to_offsets(lengths, validate=validate, op=op)
    elif not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{op}: offsets must be a torch.Tensor, got {type(offsets).__name__}")
    for name, x in (("combine", combine), ("mode", mode)):  # their values are checked in C++
        if not isinstance(x, str):
            raise TypeError(f"{op}: {name} must be a str, got {type(x).__name__}")
    probes = _probe_list(op, num_probes, num_features)
    seed = check_int64(op, "seed", seed)
    out, _ = torch.ops.embedops.multiplexed_embedding_bag(weight, values, offsets, probes, combine, mode,
                                                          per_sample_weights, seed, validate)
    return out


# ---- int8 row-quantised tables -------------------------------------------------------------------
# FBGEMM's fused 8-bit row-wise layout (SparseType.INT8 in its inference TBE): a uint8 (R, D + 8)
# tensor, row r = D codes, then float32 scale_r and float32 bias_r (little-endian, 4 bytes each);
# value(r, d) = scale_r * code[r, d] + bias_r.

_ROW_EXTRA = 8  # the float32 scale and bias after a row's codes


def quantize_table(weight: torch.Tensor, precision: str = "int8") -> torch.Tensor:
    """A float embedding table as an int8 row-quantised table (FBGEMM's fused row-wise layout).

    Per row, in float32, exactly as FBGEMM's ``FloatToFused8BitRowwiseQuantized`` (same bytes):
    ``bias = min(row)``, ``scale = (max(row) - min(row)) / 255``,
    ``code = round((x - bias) * (255 / (max - min + 1e-8)))`` (round half to even; the 1e-8 keeps
    a constant row from dividing by zero: it gets ``scale = 0``, codes 0 and is exactly ``bias``).
    That is ``round((x - bias) / scale)`` up to the 1e-8: every element comes back within
    ``scale / 2`` (plus float32 rounding) of its float32 value. The result is what
    :func:`multiplexed_embedding_bag` (and FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``
    with ``SparseType.INT8``) reads: 4x less memory than float32 plus 8 bytes a row.

    Args:
        weight: (R, D) float32/float16/bfloat16/float64 tensor, finite, on any device; not
            modified.
        precision: ``"int8"`` (the only row-quantised format; for fp16/bf16 tables use
            ``weight.to(torch.float16)`` / ``torch.bfloat16``).

    Returns:
        (R, D + 8) uint8 tensor on ``weight``'s device: row r = D codes, then scale_r and bias_r
        as little-endian float32.

    Raises:
        TypeError for a non-tensor or non-float weight, ValueError for a bad shape, precision or
        non-finite values.
    """
    op = "quantize_table"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(precision, str) or precision != "int8":
        raise ValueError(f"{op}: precision must be 'int8' (fp16/bf16 tables: weight.to(dtype)), got {precision!r}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{op}: weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(f"{op}: weight must have 2 dims (num_rows, dim) with dim > 0, got shape "
                         f"{tuple(weight.shape)}")
    x = weight.detach().to(torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{op}: weight must be finite (got inf or nan)")
    if x.shape[0] == 0:
        return torch.empty((0, x.shape[1] + _ROW_EXTRA), dtype=torch.uint8, device=x.device)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = hi - lo
    scale = span / 255.0
    inverse_scale = 255.0 / (span + 1e-8)  # float32, as FBGEMM (kEpsilon = 1e-8f)
    codes = torch.round((x - lo) * inverse_scale).clamp_(0, 255).to(torch.uint8)
    scale_bias = torch.cat([scale, lo], dim=1).contiguous().view(torch.uint8)  # (R, 8), little-endian
    return torch.cat([codes, scale_bias], dim=1)


def _check_quantized_table(op: str, table) -> int:
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{op}: table must be a torch.Tensor, got {type(table).__name__}")
    if table.dtype != torch.uint8:
        raise TypeError(f"{op}: table must be a uint8 row-quantised table (embedops.quantize_table), got "
                        f"{table.dtype}")
    if table.dim() != 2 or table.shape[1] <= _ROW_EXTRA:
        raise ValueError(f"{op}: table must have 2 dims (num_rows, dim + 8) with more than 8 columns (each row: "
                         f"dim codes, float32 scale, float32 bias), got shape {tuple(table.shape)}")
    return table.shape[1] - _ROW_EXTRA


def dequantize_table(table: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float table an int8 row-quantised table stands for: ``scale * code + bias`` per row.

    Args:
        table: (R, D + 8) uint8 tensor in the fused row layout (:func:`quantize_table`); any
            strides; not modified.
        dtype: of the result: float32 (default: computed in float32, as a float32 lookup sees
            the values), float64 (computed exactly in float64: the reference the tests use),
            float16 or bfloat16 (computed in float32, then rounded).

    Returns:
        (R, D) tensor of ``dtype`` on ``table``'s device.
    """
    op = "dequantize_table"
    dim = _check_quantized_table(op, table)
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale_bias = table[:, dim:].contiguous().view(torch.float32).to(compute)  # (R, 2)
    out = table[:, :dim].to(compute) * scale_bias[:, :1] + scale_bias[:, 1:]
    return out.to(dtype)


__all__ = ["hash_ids", "lengths_to_offsets", "multiplexed_embedding_bag", "quantize_table", "dequantize_table"]
