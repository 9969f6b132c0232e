"""MatryoshkaIndex: a flat (exact) index over Matryoshka embeddings with multi-prefix search,
funnel retrieval (float, and binary / int8 codes with fused rescoring) and a documented file format."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Sequence

import numpy as np
import torch

from ._load import _C
from ._utils import (_WITH_CUDA, ProgressBar, check_dims, check_int, check_metric, code_funnel_plan, funnel_plan,
                     has_precision_stages, show_progress, to_tensor)
from .compressed import _ranges_from, quantize_embeddings

# ---- matryoshka --------------------------------------------------------------------------------

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_OF_CODE = {v: k for k, v in _DTYPES.items()}
_METRIC_CODE = {"cosine": 0, "dot": 1}
_METRIC_OF_CODE = {v: k for k, v in _METRIC_CODE.items()}
# magic, version, dim, n, num_dims, metric code, dtype code, storage flags (version 2; 0 in
# version 1), 1 pad byte, payload crc32
_HEADER = struct.Struct("<8sIIQIBBBxI")
_FLOAT, _BINARY, _INT8 = 1, 2, 4  # storage flags
_CODES = ("binary", "int8")


class MatryoshkaIndex:
    """An exact index over Matryoshka embeddings, searchable at any prefix size.

    Args:
        dim: D, the full embedding dimension.
        dims: the prefix sizes whose per-row inverse norms are computed once at :meth:`add`
            (strictly ascending, in ``[1, D]``; ``D`` itself is always added). Searches at other
            prefixes work too, computing those norms on the fly. Default: the powers of two from 16
            below D, and D.
        metric: ``"cosine"`` (every prefix renormalised) or ``"dot"``.
        dtype: storage dtype of the vectors: float32, float16, bfloat16 or float64. Scores are
            float32 (float64 for a float64 index).
        device: where the vectors live (``"cpu"`` or a CUDA device).
        codes: compressed codes to keep as well, computed at :meth:`add`: any of ``"binary"``
            (sign bits ``x > 0``, packed MSB-first: ``ceil(D / 8)`` bytes per row, searched by
            Hamming distance over a bit prefix) and ``"int8"`` (per-dimension ranges, 255 steps:
            ``D`` bytes per row, scored against float queries dequantised on the fly); the same codes
            as :func:`embedops.quantize_embeddings` / sentence-transformers.
        keep_float: keep the float vectors (default). ``False`` stores codes only (then every
            search and funnel stage is a code stage); needs ``codes``.
        ranges: ``(2, D)`` per-dimension ``[min; max]`` for the int8 codes. Default: from
            ``calibration_embeddings``, else from the rows of the first :meth:`add` (which then needs
            at least 2 rows).
        calibration_embeddings: ``(m, D)`` embeddings to take the int8 ranges from.

    Vectors are kept raw (not normalised), so any prefix can be scored exactly. numpy queries give
    numpy results; torch queries give torch results on the index's device. Scores of an int8
    search are those of the dequantised vectors (cosine: each dequantised prefix renormalised);
    a binary search returns Hamming distances (int32, smallest first).

    File format (:meth:`save` / :meth:`load`), little-endian::

        offset 0   8 bytes  magic b"EMBMATRY"
               8   u32      format version (2; version-1 files load too)
              12   u32      D
              16   u64      n (number of vectors)
              24   u32      m = len(dims)
              28   u8       metric (0 cosine, 1 dot)
              29   u8       dtype (0 float32, 1 float16, 2 bfloat16, 3 float64)
              30   u8       storage flags: 1 float vectors, 2 binary codes, 4 int8 codes
                            (version 1: 0, meaning float vectors only)
              31   u8       zero
              32   u32      CRC-32 (zlib) of everything after the dims
              36   m * u32  dims
              ...  if int8 codes: 2 * D float32, the ranges (min row, max row)
              ...  if float: n * D * itemsize bytes, the vectors, row-major, in the storage dtype
              ...  if binary: n * ceil(D / 8) bytes, the packed sign bits (uint8, MSB first)
              ...  if int8: n * D bytes, the int8 codes

    :meth:`load` checks the magic, version, codes, sizes against the file length and the CRC,
    and raises ``ValueError`` naming the file and what is wrong.
    """

    MAGIC = b"EMBMATRY"
    VERSION = 2

    def __init__(self, dim: int, dims: Sequence[int] | None = None, metric: str = "cosine",
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                 codes: Sequence[str] = (), keep_float: bool = True, ranges=None, calibration_embeddings=None):
        op = "MatryoshkaIndex"
        dim = check_int(op, "dim", dim)
        if dim < 1:
            raise ValueError(f"{op}: dim must be >= 1, got {dim}")
        if dtype not in _DTYPES:
            raise TypeError(f"{op}: dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        if dims is None:
            dims = [d for d in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if d < dim] + [dim]
        dims = check_dims(op, list(dims), dim)
        if dims[-1] != dim:
            dims.append(dim)
        self.dim = dim
        self.dims = dims
        self.metric = check_metric(op, metric)
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and not _WITH_CUDA:
            raise RuntimeError(f"{op}: device {self.device} requested, but this embedops build has no CUDA "
                               "kernels (see embedops.build_info())")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: device must be cpu or cuda, got {self.device}")
        if isinstance(codes, str):
            codes = (codes,)
        codes = tuple(codes)
        for c in codes:
            if c not in _CODES:
                raise ValueError(f"{op}: codes must be any of {_CODES}, got {c!r}")
        if len(set(codes)) != len(codes):
            raise ValueError(f"{op}: codes lists a precision twice: {codes}")
        if not isinstance(keep_float, bool):
            raise TypeError(f"{op}: keep_float must be a bool, got {type(keep_float).__name__}")
        if not keep_float and not codes:
            raise ValueError(f"{op}: keep_float=False stores no vectors at all without codes; give codes=(\"binary\", "
                             "\"int8\") or keep the float vectors")
        if (ranges is not None or calibration_embeddings is not None) and "int8" not in codes:
            raise ValueError(f"{op}: ranges / calibration_embeddings are for int8 codes; add \"int8\" to codes")
        self.codes = codes
        self.keep_float = keep_float
        self._ranges = None
        if ranges is not None:
            r, _ = to_tensor(ranges, op, "ranges")
            if r.shape != (2, dim) or not r.is_floating_point():
                raise ValueError(f"{op}: ranges must be a float (2, D={dim}) [min; max] array, got "
                                 f"{tuple(r.shape)} {r.dtype}")
            self._ranges = r.to(self.device, torch.float32).contiguous()
        elif calibration_embeddings is not None:
            c, _ = to_tensor(calibration_embeddings, op, "calibration_embeddings")
            if c.dim() != 2 or c.shape[1] != dim or not c.is_floating_point():
                raise ValueError(f"{op}: calibration_embeddings must be float (m, D={dim}), got {tuple(c.shape)}")
            self._ranges = _ranges_from(op, c.to(self.device, torch.float32), "calibration_embeddings")
        self._n = 0
        self._cap = 0
        # Segment-major storage on every device: one contiguous (capacity, d_i - d_{i-1}) block per
        # prefix segment, so that scanning a prefix reads contiguous memory (as fast as a dedicated
        # prefix copy, without the copy); the _blocks ops read it on CPU and CUDA. The int8 codes
        # use the same segments merged left to right into blocks of >= 256 columns (a scan pays per
        # block and row: narrow blocks cost more than the bytes they save); the sign bits are
        # stored in pieces of 256 bits, (P, capacity, 32)
        # (hamming_topk's blocked layout; the last piece zero-padded; codes under 256 bits: one
        # piece of ceil(D / 64) words), so a bit prefix reads only its own pieces.
        bounds = [0] + dims
        self._bounds = bounds
        self._blocks = [torch.empty((0, e - a), dtype=dtype, device=self.device) for a, e in zip(bounds, bounds[1:])
                        if keep_float]
        nb = (dim + 7) // 8
        self._piece = 32 if nb >= 32 else 8 * ((nb + 7) // 8)
        self._bits = torch.empty((-(-nb // self._piece), 0, self._piece), dtype=torch.uint8, device=self.device)
        # and, where the pieces are wider, a copy of the first 128 bits as (capacity, 16) rows: a
        # scan of a prefix of at most 128 bits with a few queries reads 16 bytes per row instead of
        # the 32 of the first piece (a 128-bit binary -> int8 funnel over 1M rows, one query:
        # 1.50 ms against 2.04 ms through the pieces, AVX2 Zen 3). Blocks of 8 or more queries keep
        # the pieces: their scan is bound by the popcounts, and VPOPCNTDQ CPUs run it there.
        self._head = (torch.empty((0, self._HEAD_BYTES), dtype=torch.uint8, device=self.device)
                      if "binary" in codes and self._piece > self._HEAD_BYTES else None)
        b8 = [0]
        for e in dims:
            if e - b8[-1] >= self._INT8_BLOCK or e == dim:
                b8.append(e)
        self._bounds8 = b8
        self._codes8 = [torch.empty((0, e - a), dtype=torch.int8, device=self.device)
                        for a, e in zip(b8, b8[1:]) if "int8" in codes]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        self._inv = torch.empty((len(dims), 0), dtype=acc, device=self.device)

    @classmethod
    def from_model(cls, model, sentences, *, dims=None, batch_size: int = 32, show_progress_bar=None,
                   metric: str = "cosine", encode_kwargs=None, **index_kwargs) -> "MatryoshkaIndex":
        """A new index of ``model``'s raw embeddings of ``sentences`` (a sentence-transformers model;
        the raw, unnormalised vectors are stored, so every prefix is exact). Progress: a bar on stderr
        when it is a terminal (``show_progress_bar=None``), always (True) or never (False). See
        :func:`embedops.integrations.sentence_transformers.index_from_model`."""
        from .integrations.sentence_transformers import index_from_model

        return index_from_model(model, sentences, dims=dims, batch_size=batch_size,
                                show_progress_bar=show_progress_bar, metric=metric, encode_kwargs=encode_kwargs,
                                **index_kwargs)

    # -- contents ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        extra = f", codes={self.codes}, keep_float={self.keep_float}" if self.codes else ""
        return (f"MatryoshkaIndex(dim={self.dim}, dims={self.dims}, metric={self.metric!r}, "
                f"dtype={self.dtype}, device={self.device}{extra}, n={self._n})")

    def memory(self) -> dict[str, int]:
        """Bytes held per storage for the stored rows (capacity reserved ahead is not counted):
        ``float`` (the vectors), ``inv_norms`` (their per-prefix inverse norms), ``binary``,
        ``int8`` (the codes), ``binary_head`` (the copy of the first 128 bits that short binary
        prefixes scan, for codes of 256 bits and more) and ``ranges`` (the int8 ranges)."""
        n = self._n
        out = {}
        if self.keep_float:
            out["float"] = n * self.dim * torch.empty((), dtype=self.dtype).element_size()
            out["inv_norms"] = n * len(self.dims) * self._inv.element_size()
        if "binary" in self.codes:
            out["binary"] = n * self._bits.shape[0] * self._piece  # the stored pieces, padding included
            if self._head is not None:
                out["binary_head"] = n * self._HEAD_BYTES
        if "int8" in self.codes:
            out["int8"] = n * self.dim
            out["ranges"] = 0 if self._ranges is None else 2 * self.dim * 4
        return out

    @property
    def nbytes(self) -> int:
        """Total bytes of :meth:`memory` (the stored rows)."""
        return sum(self.memory().values())

    @property
    def ranges(self) -> torch.Tensor | None:
        """The int8 codes' ``(2, D)`` per-dimension ``[min; max]`` (None until known)."""
        return self._ranges

    def _need_float(self, op: str) -> None:
        if not self.keep_float:
            raise ValueError(f"{op}: this index keeps no float vectors (keep_float=False); search its codes "
                             f"(precision=\"int8\" / \"binary\", or code funnel stages)")

    @property
    def vectors(self) -> torch.Tensor:
        """The stored vectors, ``(len(self), D)`` (a copy: they are stored per prefix segment)."""
        self._need_float("MatryoshkaIndex.vectors")
        blocks = self._views()
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def _views(self) -> list[torch.Tensor]:
        return [b[: self._n] for b in self._blocks]

    def _views8(self) -> list[torch.Tensor]:
        return [b[: self._n] for b in self._codes8]

    def _bit_rows(self) -> torch.Tensor:
        """The packed sign bits as ``(len(self), ceil(D / 8))`` rows (a copy)."""
        p, n, w = self._bits.shape
        return self._bits[:, : self._n].transpose(0, 1).reshape(self._n, p * w)[:, : (self.dim + 7) // 8]

    def _int8_rows(self) -> torch.Tensor:
        """The int8 codes as ``(len(self), D)`` rows (a copy)."""
        return torch.cat(self._views8(), dim=1)

    def add(self, vectors, *, show_progress_bar: bool | None = None) -> None:
        """Appends ``(n, D)`` vectors (tensor or numpy, any float dtype; converted to the index's
        dtype and device). Their per-prefix inverse norms are computed here, once. Inputs of a
        million rows or more show a progress bar on stderr when it is a terminal
        (``show_progress_bar=None``; True / False: always / never)."""
        if (isinstance(vectors, (torch.Tensor, np.ndarray)) and vectors.ndim == 2 and vectors.shape[1] == self.dim
                and vectors.shape[0] >= self._PROGRESS_ROWS and show_progress(show_progress_bar)):
            self._reserve(self._n + vectors.shape[0])
            with ProgressBar("adding", vectors.shape[0], True) as bar:
                for r0 in range(0, vectors.shape[0], self._PROGRESS_ROWS // 4):
                    part = vectors[r0: r0 + self._PROGRESS_ROWS // 4]
                    self._add(part)
                    bar.advance(part.shape[0])
            return
        self._add(vectors)

    _PROGRESS_ROWS = 1 << 20
    _INT8_BLOCK = 256  # the narrowest int8 code block (columns), see __init__
    _HEAD_BYTES = 16  # the binary head: the first 128 bits of every code, see __init__
    _HEAD_MAX_QUERIES = 8  # fewer queries than this scan a short prefix in the head (hamming_topk's query block)

    def _add(self, vectors) -> None:
        op = "MatryoshkaIndex.add"
        v, _ = to_tensor(vectors, op, "vectors")
        if v.dim() != 2 or v.shape[1] != self.dim:
            raise ValueError(f"{op}: vectors must have shape (n, D={self.dim}), got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{op}: vectors must be floating point, got {v.dtype}")
        v = v.to(device=self.device, dtype=self.dtype)
        if v.shape[0] == 0:
            return
        bits = quantize_embeddings(v, "ubinary") if "binary" in self.codes else None
        codes8 = None
        if "int8" in self.codes:
            if self._ranges is None:
                self._ranges = _ranges_from(op, v.to(torch.float32), "vectors (the first add, which sets the int8 "
                                            "ranges)").contiguous()
            codes8 = quantize_embeddings(v, "int8", ranges=self._ranges)
        self._append(v if self.keep_float else None, bits, codes8)

    def _append(self, v, bits, codes8) -> None:
        """Appends rows to every storage: float vectors (or None with keep_float=False) and the codes."""
        n = next(t.shape[0] for t in (v, bits, codes8) if t is not None)
        need = self._n + n
        self._reserve(need)
        if v is not None:
            for blk, a, e in zip(self._blocks, self._bounds, self._bounds[1:]):
                blk[self._n: need] = v[:, a:e]
            self._inv[:, self._n: need] = torch.ops.embedops.matryoshka_inv_norms(v, self.dims)
        if bits is not None:
            p, _, w = self._bits.shape
            bits = torch.nn.functional.pad(bits, (0, p * w - bits.shape[1]))
            self._bits[:, self._n: need] = bits.view(n, p, w).transpose(0, 1)
            if self._head is not None:
                self._head[self._n: need] = bits[:, : self._HEAD_BYTES]
        if codes8 is not None:
            for blk, a, e in zip(self._codes8, self._bounds8, self._bounds8[1:]):
                blk[self._n: need] = codes8[:, a:e]
        self._n = need

    def _reserve(self, need: int) -> None:
        """Capacity for ``need`` rows (amortised doubling)."""
        if need <= self._cap:
            return
        cap = max(need, 2 * self._cap, 1024)

        def grow(t: torch.Tensor, rows_dim: int = 0) -> torch.Tensor:
            shape = list(t.shape)
            shape[rows_dim] = cap
            g = torch.empty(shape, dtype=t.dtype, device=self.device)
            if g.device.type == "cpu" and g.nbytes >= 1 << 21:  # before first touch: the scans stream this memory
                _C.advise_huge_pages(g.data_ptr(), g.nbytes)
            g.narrow(rows_dim, 0, self._n).copy_(t.narrow(rows_dim, 0, self._n))
            return g

        self._blocks = [grow(b) for b in self._blocks]
        if self.keep_float:
            self._inv = grow(self._inv, 1)
        if "binary" in self.codes:
            self._bits = grow(self._bits, 1)
            if self._head is not None:
                self._head = grow(self._head)
        self._codes8 = [grow(b) for b in self._codes8]
        self._cap = cap

    # -- search --------------------------------------------------------------------------------

    def _queries(self, op: str, queries):
        q, was_np = to_tensor(queries, op, "queries")
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"{op}: queries must have shape (B, D={self.dim}), got {tuple(q.shape)}")
        if not q.is_floating_point():
            raise TypeError(f"{op}: queries must be floating point, got {q.dtype}")
        return q.to(device=self.device, dtype=self.dtype), was_np

    def _inv_rows(self, dims: list[int]):
        if self.metric != "cosine" or any(d not in self.dims for d in dims):
            return None
        rows = [self.dims.index(d) for d in dims]
        return self._inv[rows, : self._n]

    def search(self, queries, k: int, dim: int | Sequence[int] | None = None, precision: str = "float"):
        """Exact top-k at prefix ``dim`` (default D), or at several prefixes in one pass.

        Args:
            queries: ``(B, D)`` float tensor or numpy array (converted to the index's dtype/device).
            k: results per query, ``0 <= k <= len(self)``.
            dim: an int prefix size, or a list of ascending sizes (all scored in one pass; float
                and int8 only).
            precision: ``"float"`` (the stored vectors), ``"int8"`` (the int8 codes, dequantised:
                see :func:`embedops.int8_topk`) or ``"binary"`` (Hamming distance between the
                queries' sign bits and the codes over the first ``dim`` bits).

        Returns:
            ``(values, indices)``: ``(B, k)`` each for an int ``dim``, ``(len(dim), B, k)`` for a
            list; scores best first (ties to the lower index, NaN last), int64 row ids. Binary:
            int32 Hamming distances, nearest first.
        """
        op = "MatryoshkaIndex.search"
        q, was_np = self._queries(op, queries)
        single = dim is None or isinstance(dim, (int, np.integer))
        dims = check_dims(op, [self.dim] if dim is None else dim, self.dim)
        k = check_int(op, "k", k)
        if not 0 <= k <= self._n:
            raise ValueError(f"{op}: k must be in [0, len(index)={self._n}], got {k}")
        self._check_precision(op, precision)
        if precision == "binary":
            if not single:
                raise ValueError(f"{op}: a binary search takes one prefix (an int dim), got dims {dims}")
            return self._result(*self._binary_topk(q, k, dims[0]), was_np)
        if precision == "int8":
            v, i = torch.ops.embedops.int8_topk(q, self._views8(), self._ranges_or_empty(), k, dims, self.metric)
        else:
            inv = self._inv_rows(dims)
            v, i = torch.ops.embedops.matryoshka_topk_blocks(q, self._views(), k, dims, self.metric, inv)
        if single:
            v, i = v[0], i[0]
        return self._result(v, i, was_np)

    def _check_precision(self, op: str, precision) -> None:
        if precision == "float":
            self._need_float(op)
        elif precision in _CODES:
            if precision not in self.codes:
                raise ValueError(f"{op}: precision {precision!r} needs {precision} codes; this index holds "
                                 f"codes={self.codes} (MatryoshkaIndex(..., codes=(\"binary\", \"int8\")))")
        else:
            raise ValueError(f"{op}: precision must be \"float\", \"int8\" or \"binary\", got {precision!r}")

    def _ranges_or_empty(self) -> torch.Tensor:
        if self._ranges is not None:
            return self._ranges
        # an empty index: any valid ranges (k = 0)
        return torch.zeros((2, self.dim), dtype=torch.float32, device=self.device)

    def _binary_topk(self, q: torch.Tensor, k: int, nbits: int):
        p, _, w = self._bits.shape
        qbits = quantize_embeddings(q, "ubinary")
        if self._head is not None and nbits <= 8 * self._HEAD_BYTES and q.shape[0] < self._HEAD_MAX_QUERIES:
            return torch.ops.embedops.hamming_topk(qbits[:, : self._HEAD_BYTES], self._head[: self._n], k, nbits)
        use = -(-nbits // (8 * w))  # the pieces holding the prefix
        qbits = torch.nn.functional.pad(qbits, (0, p * w - qbits.shape[1]))[:, : use * w]
        return torch.ops.embedops.hamming_topk(qbits, self._bits[:use, : self._n], k, nbits)

    def funnel_search(self, queries, k: int, stages: Sequence[tuple] = ((64, 200), (256, 50)),
                      dim: int | None = None):
        """Funnel retrieval, in one call.

        Float stages ``[(d1, k1), (d2, k2), ...]``: top ``k1`` at ``d1`` over the whole index, then
        each stage ``(d, kk)`` extends the survivors' partial dot products to ``d`` and keeps the
        best ``kk``; the final stage ranks at ``dim`` (default D) and returns ``k``. See
        :func:`embedops.matryoshka_funnel`.

        Stages over compressed codes ``[(precision, prefix_dim, shortlist_size), ...]`` (e.g.
        ``[("binary", 512, 400), ("int8", 1024, 40)]``; a ``(d, kk)`` stage among them means
        ``("float", d, kk)``): the first stage scores every row (binary: Hamming distance over the
        first ``prefix_dim`` bits), each later stage rescores the previous stage's survivors at its
        precision and prefix (int8 dequantised, float exact) and keeps ``shortlist_size``; the
        result is the best ``k`` (``<= the last shortlist_size``) of the last stage, ``dim`` unused.

        Returns:
            ``(values, indices)``, each ``(B, k)``: the last stage's scores (Hamming distances if
            it is the binary stage) and row ids, best first.
        """
        op = "MatryoshkaIndex.funnel_search"
        q, was_np = self._queries(op, queries)
        if has_precision_stages(stages):
            if dim is not None:
                raise ValueError(f"{op}: dim is for float funnels; with (precision, dim, k) stages the last "
                                 "stage's prefix is the final ranking")
            available = (("float",) if self.keep_float else ()) + self.codes
            plan = code_funnel_plan(op, stages, k, self.dim, self._n, available)
            return self._result(*self._code_funnel(q, k, plan), was_np)
        self._need_float(op)
        dim = self.dim if dim is None else check_int(op, "dim", dim)
        dims, ks = funnel_plan(op, stages, k, dim, self.dim, self._n)
        inv = self._inv_rows(dims[:1])
        v, i = torch.ops.embedops.matryoshka_funnel_blocks(q, self._views(), dims, ks, self.metric, inv)
        return self._result(v, i, was_np)

    def _code_funnel(self, q: torch.Tensor, k: int, plan: list[tuple[str, int, int]]):
        prec, d, kk = plan[0]
        if prec == "binary":
            v, i = self._binary_topk(q, kk, d)
        elif prec == "int8":
            v, i = torch.ops.embedops.int8_topk(q, self._views8(), self._ranges_or_empty(), kk, [d], self.metric)
            v, i = v[0], i[0]
        else:
            v, i = torch.ops.embedops.matryoshka_topk_blocks(q, self._views(), kk, [d], self.metric,
                                                             self._inv_rows([d]))
            v, i = v[0], i[0]
        for prec, d, kk in plan[1:]:
            if prec == "int8":
                v, i = torch.ops.embedops.matryoshka_rescore(q, self._views8(), i, kk, d, self.metric,
                                                             self._ranges_or_empty())
            else:
                v, i = torch.ops.embedops.matryoshka_rescore(q, self._views(), i, kk, d, self.metric, None)
        return v[:, :k], i[:, :k]

    @staticmethod
    def _result(v, i, was_np):
        if was_np:
            return v.cpu().numpy(), i.cpu().numpy()
        return v, i

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to ``path`` in the format described in the class docstring (version 2)."""
        parts = []
        flags = 0
        if "int8" in self.codes:
            flags |= _INT8
            parts.append(self._ranges_or_empty().cpu().numpy().astype("<f4").tobytes())
        if self.keep_float:
            flags |= _FLOAT
            raw = self.vectors.detach().cpu().contiguous()
            if self.dtype == torch.bfloat16:
                raw = raw.view(torch.int16)
            parts.append(raw.numpy().astype(raw.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
        if "binary" in self.codes:
            flags |= _BINARY
            parts.append(self._bit_rows().cpu().numpy().tobytes())
        if "int8" in self.codes:
            parts.append(self._int8_rows().cpu().numpy().tobytes())
        payload = b"".join(parts)
        header = _HEADER.pack(self.MAGIC, self.VERSION, self.dim, self._n, len(self.dims),
                              _METRIC_CODE[self.metric], _DTYPES[self.dtype], flags, zlib.crc32(payload))
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(struct.pack(f"<{len(self.dims)}I", *self.dims))
            f.write(payload)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "MatryoshkaIndex":
        """Reads an index written by :meth:`save` (format version 2, or 1); raises ``ValueError``
        for a corrupt, truncated or foreign file (naming the file and the problem)."""
        name = f"MatryoshkaIndex.load: {os.fspath(path)}"
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _HEADER.size or data[:8] != cls.MAGIC:
            raise ValueError(f"{name}: not an embedops MatryoshkaIndex file (bad magic {data[:8]!r})")
        magic, version, dim, n, m, metric, dtype, flags, crc = _HEADER.unpack_from(data)
        if version not in (1, 2):
            raise ValueError(f"{name}: format version {version} is not supported (this embedops reads "
                             f"versions 1 and {cls.VERSION})")
        if version == 1:
            if flags != 0:
                raise ValueError(f"{name}: corrupt header (version 1 with storage flags {flags})")
            flags = _FLOAT
        if metric not in _METRIC_OF_CODE or dtype not in _DTYPE_OF_CODE or flags == 0 or flags & ~7:
            raise ValueError(f"{name}: corrupt header (metric code {metric}, dtype code {dtype}, storage flags "
                             f"{flags})")
        if dim < 1 or m < 1:
            raise ValueError(f"{name}: corrupt header (D={dim}, {m} dims)")
        torch_dtype = _DTYPE_OF_CODE[dtype]
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        nb = (dim + 7) // 8
        dims_end = _HEADER.size + 4 * m
        sizes = [("ranges", 2 * dim * 4 if flags & _INT8 else 0),
                 ("float", n * dim * itemsize if flags & _FLOAT else 0),
                 ("binary", n * nb if flags & _BINARY else 0),
                 ("int8", n * dim if flags & _INT8 else 0)]
        expected = dims_end + sum(sz for _, sz in sizes)
        if len(data) != expected:
            raise ValueError(f"{name}: size mismatch: the header says D={dim}, n={n}, {m} dims, dtype "
                             f"{torch_dtype}, storage flags {flags} ({expected} bytes), the file has {len(data)} "
                             "bytes (truncated or corrupt)")
        dims = list(struct.unpack_from(f"<{m}I", data, _HEADER.size))
        payload = data[dims_end:]
        if zlib.crc32(payload) != crc:
            raise ValueError(f"{name}: checksum mismatch: the stored vectors or codes are corrupt")
        sections, off = {}, 0
        for what, sz in sizes:
            sections[what] = payload[off: off + sz]
            off += sz
        codes = tuple(c for c, bit in (("binary", _BINARY), ("int8", _INT8)) if flags & bit)
        ranges = None
        if flags & _INT8:
            ranges = torch.from_numpy(np.frombuffer(sections["ranges"], dtype="<f4").astype(np.float32)).view(2, dim)
        try:
            index = cls(dim, dims=dims, metric=_METRIC_OF_CODE[metric], dtype=torch_dtype, device=device,
                        codes=codes, keep_float=bool(flags & _FLOAT), ranges=ranges)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: corrupt header: {e}") from None
        if n == 0:
            return index
        v = bits = codes8 = None
        if flags & _FLOAT:
            np_dtype = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2",
                        torch.float64: "<f8"}[torch_dtype]
            arr = np.frombuffer(sections["float"], dtype=np_dtype).reshape(n, dim).astype(np_dtype[1:], copy=True)
            v = torch.from_numpy(arr)
            if torch_dtype == torch.bfloat16:
                v = v.view(torch.bfloat16)
            v = v.to(index.device)
        if flags & _BINARY:
            bits = torch.from_numpy(np.frombuffer(sections["binary"], dtype=np.uint8).reshape(n, nb).copy())
            bits = bits.to(index.device)
        if flags & _INT8:
            codes8 = torch.from_numpy(np.frombuffer(sections["int8"], dtype=np.int8).reshape(n, dim).copy())
            codes8 = codes8.to(index.device)
        index._append(v, bits, codes8)
        return index


__all__ = ["MatryoshkaIndex"]
