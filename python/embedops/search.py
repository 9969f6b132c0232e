"""MatryoshkaIndex: a flat (exact) index over Matryoshka embeddings with multi-prefix search,
funnel retrieval and a documented file format."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Sequence

import numpy as np
import torch

from ._load import _C
from ._utils import _WITH_CUDA, ProgressBar, check_dims, check_int, check_metric, funnel_plan, show_progress, to_tensor

# ---- matryoshka --------------------------------------------------------------------------------

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_OF_CODE = {v: k for k, v in _DTYPES.items()}
_METRIC_CODE = {"cosine": 0, "dot": 1}
_METRIC_OF_CODE = {v: k for k, v in _METRIC_CODE.items()}
# magic, version, dim, n, num_dims, metric code, dtype code, 2 pad bytes, payload crc32
_HEADER = struct.Struct("<8sIIQIBB2xI")


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

    Vectors are kept raw (not normalised), so any prefix can be scored exactly. numpy queries give
    numpy results; torch queries give torch results on the index's device.

    File format (:meth:`save` / :meth:`load`), little-endian::

        offset 0   8 bytes  magic b"EMBMATRY"
               8   u32      format version (1)
              12   u32      D
              16   u64      n (number of vectors)
              24   u32      m = len(dims)
              28   u8       metric (0 cosine, 1 dot)
              29   u8       dtype (0 float32, 1 float16, 2 bfloat16, 3 float64)
              30   2 bytes  zero
              32   u32      CRC-32 (zlib) of the vector payload
              36   m * u32  dims
              ...  n * D * itemsize bytes: the vectors, row-major, in the storage dtype

    :meth:`load` checks the magic, version, codes, sizes against the file length and the CRC,
    and raises ``ValueError`` naming the file and what is wrong.
    """

    MAGIC = b"EMBMATRY"
    VERSION = 1

    def __init__(self, dim: int, dims: Sequence[int] | None = None, metric: str = "cosine",
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
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
        self._n = 0
        # Segment-major storage on every device: one contiguous (capacity, d_i - d_{i-1}) block per
        # prefix segment, so that scanning a prefix reads contiguous memory (as fast as a dedicated
        # prefix copy, without the copy); the _blocks ops read it on CPU and CUDA.
        bounds = [0] + dims
        self._bounds = bounds
        self._blocks = [torch.empty((0, e - a), dtype=dtype, device=self.device) for a, e in zip(bounds, bounds[1:])]
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
        return (f"MatryoshkaIndex(dim={self.dim}, dims={self.dims}, metric={self.metric!r}, "
                f"dtype={self.dtype}, device={self.device}, n={self._n})")

    @property
    def vectors(self) -> torch.Tensor:
        """The stored vectors, ``(len(self), D)`` (a copy: they are stored per prefix segment)."""
        blocks = self._views()
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def _views(self) -> list[torch.Tensor]:
        return [b[: self._n] for b in self._blocks]

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

    def _add(self, vectors) -> None:
        op = "MatryoshkaIndex.add"
        v, _ = to_tensor(vectors, op, "vectors")
        if v.dim() != 2 or v.shape[1] != self.dim:
            raise ValueError(f"{op}: vectors must have shape (n, D={self.dim}), got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{op}: vectors must be floating point, got {v.dtype}")
        v = v.to(device=self.device, dtype=self.dtype)
        n = v.shape[0]
        if n == 0:
            return
        need = self._n + n
        self._reserve(need)
        for blk, a, e in zip(self._blocks, self._bounds, self._bounds[1:]):
            blk[self._n: need] = v[:, a:e]
        self._inv[:, self._n: need] = torch.ops.embedops.matryoshka_inv_norms(v, self.dims)
        self._n = need

    def _reserve(self, need: int) -> None:
        """Capacity for ``need`` rows (amortised doubling)."""
        if need > self._blocks[0].shape[0]:
            cap = max(need, 2 * self._blocks[0].shape[0], 1024)
            grown = []
            for blk in self._blocks:
                g = torch.empty((cap, blk.shape[1]), dtype=self.dtype, device=self.device)
                if g.device.type == "cpu":  # before first touch: the scans stream this memory
                    _C.advise_huge_pages(g.data_ptr(), g.nbytes)
                g[: self._n] = blk[: self._n]
                grown.append(g)
            self._blocks = grown
            inv = torch.empty((len(self.dims), cap), dtype=self._inv.dtype, device=self.device)
            inv[:, : self._n] = self._inv[:, : self._n]
            self._inv = inv

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

    def search(self, queries, k: int, dim: int | Sequence[int] | None = None):
        """Exact top-k at prefix ``dim`` (default D), or at several prefixes in one pass.

        Args:
            queries: ``(B, D)`` float tensor or numpy array (converted to the index's dtype/device).
            k: results per query, ``0 <= k <= len(self)``.
            dim: an int prefix size, or a list of ascending sizes (all scored in one pass).

        Returns:
            ``(values, indices)``: ``(B, k)`` each for an int ``dim``, ``(len(dim), B, k)`` for a
            list; scores best first (ties to the lower index, NaN last), int64 row ids.
        """
        op = "MatryoshkaIndex.search"
        q, was_np = self._queries(op, queries)
        single = dim is None or isinstance(dim, (int, np.integer))
        dims = check_dims(op, [self.dim] if dim is None else dim, self.dim)
        k = check_int(op, "k", k)
        if not 0 <= k <= self._n:
            raise ValueError(f"{op}: k must be in [0, len(index)={self._n}], got {k}")
        inv = self._inv_rows(dims)
        v, i = torch.ops.embedops.matryoshka_topk_blocks(q, self._views(), k, dims, self.metric, inv)
        if single:
            v, i = v[0], i[0]
        return self._result(v, i, was_np)

    def funnel_search(self, queries, k: int, stages: Sequence[tuple[int, int]] = ((64, 200), (256, 50)),
                      dim: int | None = None):
        """Funnel retrieval: top ``k1`` at ``d1`` over the whole index, then each stage ``(d, kk)``
        extends the survivors' partial dot products to ``d`` and keeps the best ``kk``; the final
        stage ranks at ``dim`` (default D) and returns ``k``. See :func:`embedops.matryoshka_funnel`.

        Returns:
            ``(values, indices)``, each ``(B, k)``.
        """
        op = "MatryoshkaIndex.funnel_search"
        q, was_np = self._queries(op, queries)
        dim = self.dim if dim is None else check_int(op, "dim", dim)
        dims, ks = funnel_plan(op, stages, k, dim, self.dim, self._n)
        inv = self._inv_rows(dims[:1])
        v, i = torch.ops.embedops.matryoshka_funnel_blocks(q, self._views(), dims, ks, self.metric, inv)
        return self._result(v, i, was_np)

    @staticmethod
    def _result(v, i, was_np):
        if was_np:
            return v.cpu().numpy(), i.cpu().numpy()
        return v, i

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to ``path`` in the format described in the class docstring."""
        raw = self.vectors.detach().cpu().contiguous()
        if self.dtype == torch.bfloat16:
            raw = raw.view(torch.int16)
        payload = raw.numpy().astype(raw.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header = _HEADER.pack(self.MAGIC, self.VERSION, self.dim, self._n, len(self.dims),
                              _METRIC_CODE[self.metric], _DTYPES[self.dtype], zlib.crc32(payload))
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(struct.pack(f"<{len(self.dims)}I", *self.dims))
            f.write(payload)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "MatryoshkaIndex":
        """Reads an index written by :meth:`save`; raises ``ValueError`` for a corrupt, truncated
        or foreign file (naming the file and the problem)."""
        name = f"MatryoshkaIndex.load: {os.fspath(path)}"
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _HEADER.size or data[:8] != cls.MAGIC:
            raise ValueError(f"{name}: not an embedops MatryoshkaIndex file (bad magic {data[:8]!r})")
        magic, version, dim, n, m, metric, dtype, crc = _HEADER.unpack_from(data)
        if version != cls.VERSION:
            raise ValueError(f"{name}: format version {version} is not supported (this embedops reads "
                             f"version {cls.VERSION})")
        if metric not in _METRIC_OF_CODE or dtype not in _DTYPE_OF_CODE:
            raise ValueError(f"{name}: corrupt header (metric code {metric}, dtype code {dtype})")
        if dim < 1 or m < 1:
            raise ValueError(f"{name}: corrupt header (D={dim}, {m} dims)")
        torch_dtype = _DTYPE_OF_CODE[dtype]
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        dims_end = _HEADER.size + 4 * m
        expected = dims_end + n * dim * itemsize
        if len(data) != expected:
            raise ValueError(f"{name}: size mismatch: the header says D={dim}, n={n}, {m} dims, dtype "
                             f"{torch_dtype} ({expected} bytes), the file has {len(data)} bytes "
                             "(truncated or corrupt)")
        dims = list(struct.unpack_from(f"<{m}I", data, _HEADER.size))
        payload = data[dims_end:]
        if zlib.crc32(payload) != crc:
            raise ValueError(f"{name}: checksum mismatch: the vectors are corrupt")
        try:
            index = cls(dim, dims=dims, metric=_METRIC_OF_CODE[metric], dtype=torch_dtype, device=device)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: corrupt header: {e}") from None
        np_dtype = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.float64: "<f8"}[torch_dtype]
        arr = np.frombuffer(payload, dtype=np_dtype).reshape(n, dim).astype(np_dtype[1:], copy=True)
        t = torch.from_numpy(arr)
        if torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        index.add(t)
        return index


__all__ = ["MatryoshkaIndex"]
