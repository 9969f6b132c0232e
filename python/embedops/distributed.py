"""Scale-out on torch.distributed: a sharded Unified Embedding table and a sharded Matryoshka index.

Both classes are *collective*: every rank of the process group constructs them with the same
configuration and calls every method (forward, backward, add, search, save, ...) in the same
order, each with its own local data. They run on any torch.distributed backend (gloo on CPU,
NCCL on GPU) and give the results one process would give on the union of the ranks' data.

Failure behaviour: every collective waits at most ``timeout`` seconds (then a RuntimeError says
which exchange timed out; the process group is unusable after that and should be destroyed). Inputs
are validated on every rank before any data is exchanged, and the ranks exchange a status word
first: when one rank's input is bad, that rank raises its own error and every other rank raises
the same exception type naming the failing rank(s); no rank is left waiting.

Bytes: each object counts in ``bytes_sent`` the payload bytes this rank hands to collectives for
*other* ranks (for all_to_all: the chunks addressed to other ranks; for all_gather: the input times
W - 1; for all_reduce: the tensor times W - 1, as if sent directly).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import zlib
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._utils import check_dims, check_int, funnel_plan, to_tensor
from .nn import UnifiedEmbedding, _FeatureLayout, _keyed_tensor
from .search import MatryoshkaIndex

_ERR_CODES = {ValueError: 1, TypeError: 2, IndexError: 3}
_ERR_OF_CODE = {1: ValueError, 2: TypeError, 3: IndexError, 4: RuntimeError}
_DEFAULT_TIMEOUT = 300.0
_MSG_BYTES = 256  # of a failing rank's error message, sent to the other ranks


def _split(n: int, w: int) -> list[int]:
    """Bounds [0, ..., n] of w contiguous, near-equal parts (the first n % w one longer)."""
    sizes = [n // w + (1 if i < n % w else 0) for i in range(w)]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return bounds


def _crc(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class _Comm:
    """The collectives of one object: a process group, a timeout on every wait, a byte counter, and
    the status exchange that makes all ranks raise when one fails."""

    def __init__(self, op: str, process_group, timeout):
        if not dist.is_available():
            raise RuntimeError(f"{op}: torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            raise RuntimeError(f"{op}: torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group first (e.g. under torchrun)")
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"{op}: timeout must be a number of seconds > 0, got {timeout!r}")
        self.op = op
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
        self.bytes_sent = 0
        self._ws: dict[str, torch.Tensor] = {}

    def buf(self, name: str, shape, dtype) -> torch.Tensor:
        """A reusable scratch tensor (uninitialised) for a temporary that dies within one call: fresh
        large allocations cost page faults on every step, a kept buffer does not."""
        n = int(np.prod(shape)) if len(shape) else 1
        b = self._ws.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = torch.empty(max(n, 1), dtype=dtype, device=self.device)
            self._ws[name] = b
        return b[:n].view(tuple(shape))

    def _wait(self, work, what: str):
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise RuntimeError(
                f"{self.op}: the {what} exchange failed or timed out after {self.timeout.total_seconds():g} s on "
                f"rank {self.rank} of {self.world} (a rank did not join the collective, or died); the process "
                f"group cannot be used any more: {e}") from e

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        if self.world == 1:
            out[0].copy_(t)
            return out
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), what)
        self.bytes_sent += t.nbytes * (self.world - 1)
        return out

    def all_gather_v(self, t: torch.Tensor, sizes: Sequence[int], what: str) -> list[torch.Tensor]:
        """all_gather of 1-D tensors of different lengths (padded to the longest)."""
        m = max(sizes) if sizes else 0
        pad = torch.zeros(m, dtype=t.dtype, device=t.device)
        pad[: t.numel()] = t
        return [g[:n] for g, n in zip(self.all_gather(pad, what), sizes)]

    def all_reduce(self, t: torch.Tensor, what: str, op=None) -> torch.Tensor:
        if self.world > 1:
            self._wait(dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group, async_op=True), what)
            self.bytes_sent += t.nbytes * (self.world - 1)
        return t

    def all_to_all(self, inp: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int],
                   what: str, scratch: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """all_to_all_single along dim 0: chunk r of ``inp`` (``in_splits[r]`` rows) goes to rank r.
        ``scratch``: receive into the named reusable buffer (the result must not outlive the call);
        ``out``: receive into this contiguous tensor."""
        inp = inp.contiguous()
        shape = (int(sum(out_splits)),) + tuple(inp.shape[1:])
        if out is None:
            out = self.buf(scratch, shape, inp.dtype) if scratch else inp.new_empty(shape)
        if self.world == 1:
            out.copy_(inp)
            return out
        self._wait(dist.all_to_all_single(out, inp, [int(s) for s in out_splits], [int(s) for s in in_splits],
                                          group=self.group, async_op=True), what)
        row = inp[0].nbytes if inp.dim() > 1 and inp.shape[0] else inp.element_size() * (
            int(np.prod(inp.shape[1:])) if inp.dim() > 1 else 1)
        self.bytes_sent += (int(sum(in_splits)) - int(in_splits[self.rank])) * row
        return out

    def status(self, what: str, err: BaseException | None, ints: Sequence[int], extra: torch.Tensor | None = None,
               extra_len: int = 0):
        """The status exchange: every rank contributes an error code and ``len(ints)`` int64s; raises on
        every rank if any rank failed (the failing rank re-raises its own error). Returns (W, len(ints)).
        With ``extra_len`` > 0 every rank also contributes ``extra`` (``extra_len`` int64s, a payload
        that travels in the same collective) and it returns (ints table, (W, extra_len) payloads)."""
        if extra_len:
            if err is not None or extra is None:
                extra = torch.zeros(extra_len, dtype=torch.int64, device=self.device)
            table = self._status(what, err, ints, extra)
            n = 1 + len(ints) + _MSG_BYTES // 8
            return table[:, 1: 1 + len(ints)], table[:, n:]
        return self._status(what, err, ints, None)[:, 1: 1 + len(ints)]

    def _status(self, what, err, ints, extra):
        code = 0 if err is None else _ERR_CODES.get(type(err), 4)
        msg = np.zeros(_MSG_BYTES, dtype=np.uint8)
        if err is not None:  # the first bytes of the message travel with the status word
            raw = f"{type(err).__name__}: {err}".encode()[:_MSG_BYTES]
            msg[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        row = torch.tensor([code] + ([0] * len(ints) if err is not None else [int(i) for i in ints])
                           + msg.view(np.int64).tolist(), dtype=torch.int64, device=self.device)
        if extra is not None:
            row = torch.cat([row, extra.to(self.device)])
        table = torch.stack(self.all_gather(row, f"{what} status"))
        table = table if extra is not None else table.cpu()
        if err is not None:
            raise err
        codes = table[:, 0].tolist()
        bad = [r for r in range(self.world) if int(codes[r]) != 0]
        if bad:
            cls = _ERR_OF_CODE[int(codes[bad[0]])]
            first = table[bad[0], 1 + len(ints): 1 + len(ints) + _MSG_BYTES // 8].cpu().numpy().view(np.uint8) \
                .tobytes().rstrip(b"\0")
            raise cls(f"{self.op}: rank(s) {bad} of {self.world} raised an error in {what}, so every rank raises "
                      f"(no data was exchanged); rank {bad[0]}: {first.decode(errors='replace')}")
        return table

    def run(self, what: str, fn, ints_of=None, n_ints: int = 0):
        """Runs the local ``fn()`` (validation / preparation), then the status exchange; returns
        (fn's result, the (W, n_ints) table of every rank's ``ints_of(result)``)."""
        res, err = None, None
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001  (relayed to the other ranks, then re-raised)
            err = e
        ints = ints_of(res) if (err is None and ints_of is not None) else [0] * n_ints
        return res, self.status(what, err, ints)


def _rename(op: str, e: Exception) -> Exception:
    """A UnifiedEmbedding validation error re-worded for the sharded class."""
    msg = str(e)
    if msg.startswith("UnifiedEmbedding:"):
        msg = op + msg[len("UnifiedEmbedding"):]
    return type(e)(msg)


# ---- embedding ---------------------------------------------------------------------------------

_MODE_CODE = {"sum": 0, "mean": 1, "max": 2}
_INIT_CHUNK = 1 << 14


class _Plan:
    """Everything one forward's backward needs (a plain object, carried through autograd)."""


class ShardedUnifiedEmbedding(_FeatureLayout, nn.Module):
    """:class:`embedops.nn.UnifiedEmbedding` with its (R, D) table (and Adagrad state) split over the
    W ranks of a torch.distributed process group. Collective: every rank constructs it, calls
    ``forward`` and ``backward`` the same number of times, in the same order.

    Args: as :class:`~embedops.nn.UnifiedEmbedding` (``num_rows``, ``dim``, ``features``, ``combine``,
    ``mode``, ``optimizer``, ``lr``, ``eps``, ``seed``, ``validate``, ``dtype``, ``device``), plus

        sharding: ``"row"``: rank r owns the contiguous row block ``[bounds[r], bounds[r+1])`` of
            near-equal blocks; every (id, probe) is hashed once on its rank (the same hash as
            UnifiedEmbedding, over all R rows) and then exchanged one of two ways (``row_exchange``).
            ``"column"``: rank r owns the columns ``[cb[r], cb[r+1])`` of every row (needs dim >= W);
            the ids are all-gathered, every rank pools its columns for the global batch and sends each
            rank its rows' column slices.
        row_exchange: ``"auto"`` (default), ``"partials"`` or ``"rows"`` (row sharding only):
            ``"partials"``: the local row ids go to their owners, the owner pools each (bag, probe)
            segment over its rows and sends the partial pools back; backward returns one gradient
            row per partial. ``"rows"``: each rank fetches the distinct rows its batch touches from
            their owners (once per row per step), pools its bags itself, and backward sends one
            gradient row per fetched row. ``"auto"`` picks, at every step, the one that moves fewer
            bytes in total, counted exactly from every rank's counts (exchanged with the status words,
            before any data): for requester s and owner o != s, with n_seg(s, o) the (bag, probe)
            segments of s's batch that have a row on o, n_look(s, o) the (id, probe) lookups on o,
            u(s, o) the distinct rows of o that s's batch touches, e the table's element size and 4
            bytes per row id, partials move ``sum 2*n_seg*D*e + 4*(n_seg + n_look)`` (plus
            ``2*n_look*e`` with per-sample weights) and rows move ``sum 2*u*D*e + 4*u``; rows are
            chosen when strictly fewer. So partials win for long bags of rarely repeated ids
            (n_seg << u), rows win when hot ids repeat across the batch's bags (u < n_seg: short bags,
            Zipf heads, few distinct ids). At the README's config (F=26, P=2, L~5, Zipf 1.15, D=64,
            2048 per rank) they are within a few percent (partials 45.7 MB per rank and step).
            ``last_exchange`` says which one the last forward used.
        process_group: the group (default: the default group).
        timeout: seconds any collective of this module may wait (default 300).

    The table is initialised U(-1/sqrt(D), 1/sqrt(D)) from a generator seeded by ``seed`` in chunks
    of rows, so the initial full table does not depend on the world size (it does differ from a
    UnifiedEmbedding's, which uses the global RNG; use :meth:`load_full_state_dict` to start both
    from the same table).

    ``forward(x, per_sample_weights=None, *, keyed_tensor=False)``: x is this rank's local batch in
    any input form UnifiedEmbedding takes (a dict per feature, a flat (values, offsets) pair, or a
    torchrec.KeyedJaggedTensor). Batch sizes may differ between ranks, 0 included. Returns this
    rank's ``(B_r, out_dim)`` output (a KeyedTensor with ``keyed_tensor=True``), equal to the rows
    one UnifiedEmbedding with the full table gives for this rank's part of the concatenated batch.

    Gradients: the global loss is the SUM of the ranks' losses (there is no division by W); every
    rank must call backward once per forward (a rank with an empty batch too, e.g. on
    ``out.sum()``). Gradients reach the owner shard only. ``optimizer="sgd"`` / ``"rowwise_adagrad"``
    apply the fused update there (no (R, D) gradient is made; the update equals UnifiedEmbedding's
    on the concatenated batch); ``optimizer=None`` gives ``weight.grad`` as the dense gradient of
    the local shard for any torch optimizer. Row-wise Adagrad's ``momentum`` is split like the rows
    (row sharding) or replicated (column sharding, kept identical on every rank).

    Speed: each step's large temporaries (the exchanged rows / partial pools and their gradients) go
    into scratch buffers the module keeps between steps (fresh large allocations cost page faults
    every step); ``bytes_sent`` counts what this rank hands to collectives for other ranks.

    Checkpoints: ``state_dict()`` holds the local shard, its momentum and its placement (extra
    state); it loads back only into the same placement. :func:`full_state_dict` gathers an
    unsharded state dict that :class:`~embedops.nn.UnifiedEmbedding` loads;
    :meth:`load_full_state_dict` loads an unsharded one at any world size.
    """

    def __init__(self, num_rows: int, dim: int, features: Mapping[str, int], *, combine: str = "concat",
                 mode: str = "sum", optimizer: str | None = None, lr: float = 0.01, eps: float = 1e-8,
                 seed: int = 0, sharding: str = "row", process_group=None, validate: bool = True,
                 dtype: torch.dtype | None = None, device=None, timeout: float = _DEFAULT_TIMEOUT,
                 row_exchange: str = "auto"):
        super().__init__()
        op = "ShardedUnifiedEmbedding"
        self._comm = _Comm(op, process_group, timeout)
        W, rank = self._comm.world, self._comm.rank
        dtype = dtype or torch.float32

        def check():
            try:
                ref = UnifiedEmbedding(num_rows, dim, features, combine=combine, mode=mode, optimizer=optimizer,
                                       lr=lr, eps=eps, seed=seed, validate=validate, dtype=dtype, device="meta")
            except (ValueError, TypeError) as e:
                raise _rename(op, e) from None
            if sharding not in ("row", "column"):
                raise ValueError(f"{op}: sharding must be 'row' or 'column', got {sharding!r}")
            if row_exchange not in ("auto", "partials", "rows"):
                raise ValueError(f"{op}: row_exchange must be 'auto', 'partials' or 'rows', got {row_exchange!r}")
            if dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype}")
            if sharding == "row" and num_rows < W:
                raise ValueError(f"{op}: row sharding needs num_rows >= world size ({W}), got {num_rows}")
            if sharding == "column" and dim < W:
                raise ValueError(f"{op}: column sharding needs dim >= world size ({W}), got {dim}")
            return ref

        fields = ("num_rows", "dim", "seed", "features", "combine/mode/optimizer/lr/eps/sharding/dtype/row_exchange")
        ref, table = self._comm.run(
            "construction", check,
            lambda r: [r.num_rows, r.dim, r.seed, _crc(r.features),
                       _crc(r.combine, r.mode, r.optimizer, r.lr, r.eps, sharding, str(dtype), row_exchange)], 5)
        diff = [f"{name} ({[int(v) for v in table[:, i]] if i < 3 else 'differs'})"
                for i, name in enumerate(fields) if bool((table[:, i] != table[0, i]).any())]
        if diff:
            raise ValueError(f"{op}: the ranks were constructed with different configurations: "
                             + ", ".join(diff) + " (per rank); every rank must pass the same arguments")
        self.num_rows, self.dim, self.features = ref.num_rows, ref.dim, ref.features
        self.combine, self.mode, self.optimizer = ref.combine, ref.mode, ref.optimizer
        self.lr, self.eps, self.seed, self.validate = ref.lr, ref.eps, ref.seed, ref.validate
        self.sharding = sharding
        self.row_exchange = row_exchange
        self.last_exchange = None  # the row exchange the last forward used ("partials" | "rows")
        self.row_bounds = _split(num_rows, W) if sharding == "row" else [0, num_rows]
        self.col_bounds = _split(dim, W) if sharding == "column" else [0, dim]
        r0, r1 = (self.row_bounds[rank], self.row_bounds[rank + 1]) if sharding == "row" else (0, num_rows)
        c0, c1 = (self.col_bounds[rank], self.col_bounds[rank + 1]) if sharding == "column" else (0, dim)
        self._rows, self._cols = (r0, r1), (c0, c1)
        self._idt = torch.int32 if max(b - a for a, b in zip(self.row_bounds, self.row_bounds[1:])) < 2 ** 31 \
            else torch.int64  # local row ids on the wire
        self.weight = nn.Parameter(self._init_table(r0, r1, c0, c1, dtype).to(device))
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        m_rows = (r1 - r0) if optimizer == "rowwise_adagrad" else 0
        self.register_buffer("momentum", torch.zeros(m_rows, dtype=state_dtype, device=device),
                             persistent=optimizer == "rowwise_adagrad")

    # -- traffic ---------------------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank has handed to collectives for other ranks so far."""
        return self._comm.bytes_sent

    @property
    def placement(self) -> dict:
        return {"sharding": self.sharding, "world_size": self._comm.world, "rank": self._comm.rank,
                "rows": list(self._rows), "columns": list(self._cols), "num_rows": self.num_rows, "dim": self.dim}

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, dim={self.dim}, features={self.features}, combine={self.combine!r}, "
                f"mode={self.mode!r}, optimizer={self.optimizer!r}, sharding={self.sharding!r}, "
                f"rank={self._comm.rank}/{self._comm.world}, rows={self._rows}, columns={self._cols}")

    def _init_table(self, r0, r1, c0, c1, dtype) -> torch.Tensor:
        bound = 1.0 / math.sqrt(self.dim)
        out = torch.empty((r1 - r0, c1 - c0), dtype=dtype)
        for ch in range(r0 // _INIT_CHUNK, (r1 + _INIT_CHUNK - 1) // _INIT_CHUNK):
            a, e = ch * _INIT_CHUNK, min((ch + 1) * _INIT_CHUNK, self.num_rows)
            g = torch.Generator().manual_seed((self.seed * 1000003 + ch) & 0x7FFFFFFFFFFFFFFF)
            block = torch.empty((e - a, self.dim), dtype=dtype).uniform_(-bound, bound, generator=g)
            lo, hi = max(a, r0), min(e, r1)
            out[lo - r0: hi - r0] = block[lo - a: hi - a, c0:c1]
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def get_extra_state(self):
        return self.placement

    def set_extra_state(self, state):
        mine = self.placement
        if not isinstance(state, Mapping) or any(state.get(k) != v for k, v in mine.items()):
            raise ValueError(f"ShardedUnifiedEmbedding.load_state_dict: the state dict holds the shard "
                             f"{state!r}, this module is {mine}; load a differently sharded checkpoint with "
                             "load_full_state_dict(full_state_dict(...))")

    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Loads an unsharded state dict (UnifiedEmbedding's, or :func:`full_state_dict`'s) into this
        rank's shard, at any world size. Collective (all ranks raise if one's input is bad)."""
        op = "ShardedUnifiedEmbedding.load_full_state_dict"
        (r0, r1), (c0, c1) = self._rows, self._cols

        def check():
            if not isinstance(state_dict, Mapping) or "weight" not in state_dict:
                raise ValueError(f"{op}: state_dict must be a mapping with a 'weight' entry")
            w = state_dict["weight"]
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != (self.num_rows, self.dim):
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"{op}: weight must have shape (num_rows, dim) = ({self.num_rows}, {self.dim}), "
                                 f"got {got}")
            m = state_dict.get("momentum")
            if self.optimizer == "rowwise_adagrad":
                if not isinstance(m, torch.Tensor) or tuple(m.shape) != (self.num_rows,):
                    raise ValueError(f"{op}: momentum must be a ({self.num_rows},) tensor for rowwise_adagrad")
            return w, m

        (w, m), _ = self._comm.run("load_full_state_dict", check)
        with torch.no_grad():
            self.weight.copy_(w[r0:r1, c0:c1])
            if self.optimizer == "rowwise_adagrad":
                self.momentum.copy_(m[r0:r1])

    # -- forward -------------------------------------------------------------------------------

    def _prepare(self, x, per_sample_weights):
        """Local validation of one forward's input -> (values, offsets, psw, B), ids past offsets[-1] cut."""
        op = "ShardedUnifiedEmbedding.forward"
        try:
            values, offsets, psw = UnifiedEmbedding._flatten(self, x, per_sample_weights, op=op)
        except (ValueError, TypeError) as e:
            raise _rename(op, e) from None
        F = len(self.features)
        if values.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: values must be int32 or int64, got {values.dtype}")
        if offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: offsets must be int32 or int64, got {offsets.dtype}")
        if offsets.numel() < 1 or (offsets.numel() - 1) % F:
            raise ValueError(f"{op}: offsets must have F*B + 1 entries (F={F}), got {offsets.numel()}")
        offsets = offsets.to(torch.int64)
        n = values.numel()
        if int(offsets[0]) != 0:
            raise ValueError(f"{op}: offsets must start at 0, got {int(offsets[0])}")
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{op}: offsets must be non-decreasing (a bag has a negative length)")
        if int(offsets[-1]) > n:
            raise ValueError(f"{op}: offsets end at {int(offsets[-1])}, past len(values) = {n}")
        end = int(offsets[-1])
        if psw is not None:
            if not isinstance(psw, torch.Tensor):
                raise TypeError(f"{op}: per_sample_weights must be a tensor")
            if self.mode != "sum":
                raise ValueError(f"{op}: per_sample_weights need mode 'sum', the module has mode {self.mode!r}")
            if psw.dtype != self.weight.dtype:
                raise TypeError(f"{op}: per_sample_weights must have the table's dtype {self.weight.dtype}, "
                                f"got {psw.dtype}")
            if psw.dim() != 1 or psw.numel() != n:
                raise ValueError(f"{op}: per_sample_weights must have shape (N,) = ({n},), got {tuple(psw.shape)}")
            psw = psw[:end]
        dev = self.weight.device
        return values[:end].to(dev, torch.int64), offsets.to(dev), (None if psw is None else psw.to(dev)), \
            (offsets.numel() - 1) // F

    _jagged = staticmethod(UnifiedEmbedding._jagged)

    def _layout(self, plan, B):
        """Per-block constants: the feature of each block, pooling and combine scales."""
        probes = self.num_probes
        F, Q = len(probes), sum(probes)
        plan.B, plan.F, plan.Q = B, F, Q
        plan.feat_of_block = torch.tensor([f for f, p in enumerate(probes) for _ in range(p)], dtype=torch.int64)
        plan.pbase = [sum(probes[:f]) for f in range(F)]

    def forward(self, x, per_sample_weights=None, *, keyed_tensor: bool = False):
        if self.sharding == "row":
            out = self._forward_row(x, per_sample_weights)
        else:
            out = self._forward_column(x, per_sample_weights)
        return _keyed_tensor(self, out) if keyed_tensor else out

    def _needs_backward(self, psw) -> bool:
        return torch.is_grad_enabled() and (self.weight.requires_grad or (psw is not None and psw.requires_grad))

    # row sharding ---------------------------------------------------------------------------------

    def _route(self, values, offsets, psw, B):
        """Hash every (id, probe) once, in (block, bag) order (block = (feature, probe)), find its
        owner, and count what each exchange would move: the non-empty (segment, owner) pairs
        (partial sums) and the distinct rows per owner (rows). Segment = (bag, block)."""
        plan = _Plan()
        self._layout(plan, B)
        W, R, Q = self._comm.world, self.num_rows, plan.Q
        S = B * Q
        dev = values.device
        lengths = offsets.diff()
        rows_l, len_l = [], []
        for f, P in enumerate(self.num_probes):
            a, e = int(offsets[f * B]), int(offsets[(f + 1) * B])
            v = values[a:e]
            for p in range(P):
                rows_l.append(torch.ops.embedops.hash_ids(v, f, p, R, self.seed))
                len_l.append(lengths[f * B:(f + 1) * B])
        rows = torch.cat(rows_l) if rows_l else values.new_empty(0)
        plan.sp_lens = torch.cat(len_l) if len_l else lengths.new_empty(0)  # (Q*B,) lengths, (block, bag) order
        plan.rows = rows
        bounds = torch.tensor(self.row_bounds, dtype=torch.int64, device=dev)
        plan.bounds = bounds
        bl = self.row_bounds
        # partial sums: one per non-empty (owner, segment); a stable partition of the lookups by owner
        # keeps each part in segment order
        sp_of = torch.repeat_interleave(torch.arange(S, device=dev), plan.sp_lens)
        plan.sp_of = sp_of
        if W > 1:
            idx, loc, sps = [], [], []
            for o in range(W):
                m = rows >= bl[o] if o == W - 1 else (rows < bl[o + 1] if o == 0 else
                                                      (rows >= bl[o]) & (rows < bl[o + 1]))
                i = torch.nonzero(m).view(-1)
                idx.append(i)
                loc.append(rows[i] - bl[o])
                sps.append(sp_of[i])
            plan.p_order = torch.cat(idx)
            plan.p_local = torch.cat(loc)
            plan.n_lookups = [int(i.numel()) for i in idx]
            segs = [torch.unique_consecutive(x, return_counts=True) for x in sps]
            plan.p_sp = torch.cat([u for u, _ in segs])
            plan.seg_lens = torch.cat([c for _, c in segs])
            plan.n_segs = [int(u.numel()) for u, _ in segs]
        else:
            plan.p_order, plan.p_local, plan.n_lookups = None, rows, [rows.numel()]
            plan.p_sp, plan.seg_lens = torch.unique_consecutive(sp_of, return_counts=True)
            plan.n_segs = [plan.p_sp.numel()]
        # rows: the distinct rows of each owner
        if R <= 8 * rows.numel() + (1 << 22):  # a bitmap over the rows (O(R) bits), else a sort (O(M log M))
            mark = self._comm.buf("route mark", (R,), torch.bool).zero_()
            mark[rows] = True
            plan.n_uniq = [int(torch.count_nonzero(mark[bl[o]:bl[o + 1]])) for o in range(W)]
        else:
            ub = torch.searchsorted(torch.unique(rows), bounds).tolist()
            plan.n_uniq = [ub[o + 1] - ub[o] for o in range(W)]
        # pooling scale per segment, (bag, block) order (mean: 1 / bag length)
        if self.mode == "mean":
            bag_len = lengths.view(plan.F, B).t()[:, plan.feat_of_block].reshape(-1).to(self.weight.dtype)
            plan.seg_scale = torch.where(bag_len > 0, 1.0 / bag_len.clamp(min=1), torch.zeros_like(bag_len))
        else:
            plan.seg_scale = None
        return plan

    def _exchange_bytes(self, table, W):
        """Bytes all ranks would send in one step (forward + backward) with partial sums and with rows,
        from every rank's counts (table columns: B, psw, n_lookups[W], n_segs[W], n_uniq[W])."""
        es = self.weight.element_size()
        idb = 4 if self._idt == torch.int32 else 8
        D = self.dim
        part = rows = 0
        for s in range(W):
            for o in range(W):
                if o == s:
                    continue
                nl, ns, nu = int(table[s, 2 + o]), int(table[s, 2 + W + o]), int(table[s, 2 + 2 * W + o])
                part += 2 * ns * D * es + (ns + nl) * idb + (2 * nl * es if bool(table[s, 1]) else 0)
                rows += 2 * nu * D * es + nu * idb
        return part, rows

    def _forward_row(self, x, per_sample_weights):
        W = self._comm.world

        def prep():
            values, offsets, psw, B = self._prepare(x, per_sample_weights)
            return values, offsets, psw, self._route(values, offsets, psw, B)

        res, table = self._comm.run(
            "forward", prep, lambda r: [r[3].B, int(r[2] is not None)] + r[3].n_lookups + r[3].n_segs
            + r[3].n_uniq, 2 + 3 * W)
        values, offsets, psw, plan = res
        me = self._comm.rank
        part, rows = self._exchange_bytes(table, W)
        plan.exchange = self.row_exchange if self.row_exchange != "auto" else ("rows" if rows < part else "partials")
        plan.has_psw = [bool(table[s, 1]) for s in range(W)]
        plan.recv_lookups = [int(table[s, 2 + me]) for s in range(W)]
        plan.recv_segs = [int(table[s, 2 + W + me]) for s in range(W)]
        plan.recv_uniq = [int(table[s, 2 + 2 * W + me]) for s in range(W)]
        plan.needs_backward = self._needs_backward(psw)
        self.last_exchange = plan.exchange
        psw_l = None
        if psw is not None:  # per lookup, (block, bag) order; autograd gathers the grads back
            B = plan.B
            parts = []
            for f, P in enumerate(self.num_probes):
                a, e = int(offsets[f * B]), int(offsets[(f + 1) * B])
                parts += [psw[a:e]] * P
            psw_l = torch.cat(parts)
        if plan.exchange == "rows":
            return _RowFetch.apply(self.weight, psw_l, self, plan)
        psw_sorted = psw_l if (psw_l is None or plan.p_order is None) else psw_l[plan.p_order]
        return _RowSharded.apply(self.weight, psw_sorted, self, plan)

    # column sharding ------------------------------------------------------------------------------

    def _forward_column(self, x, per_sample_weights):
        W, me = self._comm.world, self._comm.rank
        comm = self._comm

        def prep():
            return self._prepare(x, per_sample_weights)

        res, table = comm.run("forward", prep, lambda r: [r[3], r[0].numel(), int(r[2] is not None)], 3)
        values, offsets, psw, B = res
        plan = _Plan()
        self._layout(plan, B)
        F = plan.F
        Bs, Ns = [int(v) for v in table[:, 0]], [int(v) for v in table[:, 1]]
        any_psw = bool(table[:, 2].any())
        plan.Bs, plan.Ns, plan.has_psw = Bs, Ns, [bool(v) for v in table[:, 2]]
        lengths = offsets.diff()
        lens_all = comm.all_gather_v(lengths, [F * b for b in Bs], "forward ids")
        vals_all = comm.all_gather_v(values, Ns, "forward ids")
        # the global batch: feature-major, each feature's bags in rank order (rank 0's bags first)
        offs_all = [torch.nn.functional.pad(torch.cumsum(l, 0), (1, 0)) for l in lens_all]
        vparts, lparts, gidx = [], [], [[] for _ in range(W)]
        start = 0
        for f in range(F):
            for s in range(W):
                a, e = int(offs_all[s][f * Bs[s]]), int(offs_all[s][(f + 1) * Bs[s]])
                vparts.append(vals_all[s][a:e])
                lparts.append(lens_all[s][f * Bs[s]:(f + 1) * Bs[s]])
                gidx[s].append(torch.arange(start, start + e - a))
                start += e - a
        plan.values = torch.cat(vparts)
        plan.offsets = torch.nn.functional.pad(torch.cumsum(torch.cat(lparts), 0), (1, 0))
        plan.gidx = [torch.cat(g) if g else torch.zeros(0, dtype=torch.int64) for g in gidx]
        plan.Bg = sum(Bs)
        plan.needs_backward = self._needs_backward(psw)
        if any_psw:
            mine = psw if psw is not None else torch.ones(values.numel(), dtype=self.weight.dtype,
                                                         device=values.device)
            return _ColumnSharded.apply(self.weight, mine, self, plan)
        return _ColumnSharded.apply(self.weight, None, self, plan)


def _bag_of(o2b, lengths):
    """The bag of every index: embedding_bag's offset2bag when it made one (it skips it on its fast
    sum path), else from the bag lengths."""
    n = int(lengths.sum()) if lengths.numel() else 0
    if o2b.numel() == n:
        return o2b
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def _group_sum(g, seg_of, rows, psw=None):
    """Per distinct row: the sum over lookups i of ``g[seg_of[i]] * psw[i]`` -> (uniq rows, (U, D)).
    One sort of the rows, then an embedding_bag over ``g`` (no (M, D) temporary); deterministic."""
    if rows.numel() == 0:
        return rows.new_empty(0), g.new_zeros((0, g.shape[1]))
    S = g.shape[0]
    top = int(rows.max())
    if psw is None and (top + 1) * max(S, 1) < 2 ** 62:
        # one sort of (row, segment) keys: no random gather of the segments afterwards
        key = torch.sort(rows * S + seg_of)[0]
        sr = torch.div(key, S, rounding_mode="floor")
        seg = key - sr * S
        uniq, counts = torch.unique_consecutive(sr, return_counts=True)
        w = None
    else:
        sr, order = torch.sort(rows.to(torch.int32) if top < 2 ** 31 else rows, stable=True)
        uniq, counts = torch.unique_consecutive(sr.to(torch.int64), return_counts=True)
        seg, w = seg_of[order], (None if psw is None else psw[order])
    offs = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    out = torch.embedding_bag(g, seg, offs, False, 0, False, w, True, None)[0]
    return uniq, out


def _max_grad(g, max_idx, bag_size, n_rows):
    """Max pooling's gradient: column d of bag j goes to row max_idx[j, d] (non-empty bags only)."""
    D = g.shape[1]
    out = g.new_zeros(n_rows * D)
    keep = (bag_size > 0)[:, None].expand(-1, D)
    idx = max_idx * D + torch.arange(D, device=g.device)[None, :]
    out.index_add_(0, idx[keep], g[keep])
    return out.view(n_rows, D)


class _RowFetch(torch.autograd.Function):
    """Row sharding, "rows" exchange: each rank fetches the distinct rows of its batch from their
    owners (once per row), pools its own bags, and sends back one gradient row per fetched row."""

    @staticmethod
    def forward(ctx, weight, psw_l, mod, plan):
        comm, W, me = mod._comm, mod._comm.world, mod._comm.rank
        B, Q, D = plan.B, plan.Q, mod.dim
        S = B * Q
        idt = mod._idt
        dev = weight.device
        sr, order = torch.sort(plan.rows.to(torch.int32) if mod.num_rows < 2 ** 31 else plan.rows, stable=True)
        uniq, inv_s, counts = torch.unique_consecutive(sr.to(torch.int64), return_inverse=True, return_counts=True)
        U = uniq.numel()
        ub = torch.searchsorted(uniq, plan.bounds).tolist()
        nu = [ub[o + 1] - ub[o] for o in range(W)]
        bl = plan.bounds.tolist()
        req = torch.cat([(uniq[ub[o]:ub[o + 1]] - bl[o]).to(idt) for o in range(W) if o != me]) \
            if W > 1 else uniq.new_empty(0, dtype=idt)
        send_sp = [0 if o == me else nu[o] for o in range(W)]
        recv_sp = [0 if s == me else plan.recv_uniq[s] for s in range(W)]
        got = comm.all_to_all(req, send_sp, recv_sp, "forward row ids").to(torch.int64)
        wd = weight.detach()
        # the batch's rows: this rank's own first, then the fetched ones in owner order
        n_me = nu[me]
        saved = plan.needs_backward and psw_l is not None and ctx.needs_input_grad[1]
        buf = torch.empty((U, D), dtype=wd.dtype, device=dev) if saved else comm.buf("fetched", (U, D), wd.dtype)
        torch.index_select(wd, 0, uniq[ub[me]:ub[me + 1]] - bl[me], out=buf[:n_me])
        comm.all_to_all(torch.index_select(wd, 0, got, out=comm.buf("rows", (got.numel(), D), wd.dtype)),
                        recv_sp, send_sp, "forward rows", out=buf[n_me:])
        pos = torch.arange(U, device=dev)  # uniq index -> row of buf
        pos[:ub[me]] += n_me
        pos[ub[me]:ub[me + 1]] -= ub[me]
        inv = torch.empty_like(inv_s)
        inv[order] = pos[inv_s]
        # the lookups in (bag, block) order, so that the pooled rows come out as the output's layout
        lens_bq = plan.sp_lens.view(Q, B).t().reshape(-1)
        starts = torch.nn.functional.pad(torch.cumsum(plan.sp_lens, 0), (1, 0))[:-1].view(Q, B).t().reshape(-1)
        offs = torch.nn.functional.pad(torch.cumsum(lens_bq, 0), (1, 0))
        M = plan.rows.numel()
        perm = torch.repeat_interleave(starts - offs[:-1], lens_bq, output_size=M) + torch.arange(M, device=dev)
        idx = inv[perm]
        psw_bq = None if psw_l is None else psw_l.detach()[perm]
        mode_code = 2 if mod.mode == "max" else 0
        pooled, o2b, bag_size, max_idx = torch.embedding_bag(buf, idx, offs, False, mode_code, False, psw_bq, True,
                                                            None) if U else \
            (wd.new_zeros((S, D)), None, torch.zeros(S, dtype=torch.int64, device=dev), None)
        out = _assemble(mod, plan, pooled)
        if plan.needs_backward:
            plan.f_uniq, plan.f_ub, plan.f_got, plan.f_counts, plan.f_order = uniq, ub, got, counts, order
            plan.f_send_sp, plan.f_recv_sp = send_sp, recv_sp
            plan.f_bag_size, plan.f_max_idx = bag_size, max_idx
            plan.f_psw = None if psw_l is None else psw_l.detach()
            if saved:
                plan.f_buf, plan.f_idx, plan.f_offs, plan.f_o2b, plan.f_perm, plan.f_lens = \
                    buf, idx, offs, o2b, perm, lens_bq
        ctx.mod, ctx.plan = mod, plan
        ctx.weight = wd
        ctx.psw_grad = saved
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mod, plan, weight = ctx.mod, ctx.plan, ctx.weight
        comm, me = mod._comm, mod._comm.rank
        B, Q, D = plan.B, plan.Q, mod.dim
        g_seg = _assemble_backward(mod, plan, grad_out.contiguous())  # (B*Q, D), (bag, block) order
        gpsw = None
        if ctx.psw_grad and plan.f_o2b is None:  # no lookups
            gpsw = plan.f_psw.new_zeros(0)
        elif ctx.psw_grad:
            g_bq = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_seg, plan.f_buf, plan.f_idx, plan.f_offs, _bag_of(plan.f_o2b, plan.f_lens), 0, -1)
            gpsw = torch.empty_like(g_bq)
            gpsw[plan.f_perm] = g_bq
        ub, U = plan.f_ub, plan.f_uniq.numel()
        n_me = ub[me + 1] - ub[me]
        if mod.mode == "max":  # (rows of buf: own first, then the fetched ones)
            g_buf = _max_grad(g_seg, plan.f_max_idx, plan.f_bag_size, U) if U else g_seg.new_zeros((0, D))
            g_own, send = g_buf[:n_me], g_buf[n_me:]
        else:  # lookups grouped by their row (the sort of the forward), summed per row (uniq order)
            o = plan.f_order
            sp = plan.sp_of[o]
            seg = (sp % max(B, 1)) * Q + sp // max(B, 1)
            offs = torch.nn.functional.pad(torch.cumsum(plan.f_counts, 0), (1, 0))
            g_u = torch.embedding_bag(g_seg, seg, offs, False, 0, False,
                                      None if plan.f_psw is None else plan.f_psw[o], True, None)[0] if U else \
                g_seg.new_zeros((0, D))
            g_own = g_u[ub[me]:ub[me + 1]]
            send = torch.cat([g_u[:ub[me]], g_u[ub[me + 1]:]], out=comm.buf("grads", (U - n_me, D), g_u.dtype))
        # the owner: its own rows' gradients and the received ones in one buffer, summed per row
        n_got = plan.f_got.numel()
        g_all = comm.buf("grads all", (n_me + n_got, D), g_seg.dtype)
        g_all[:n_me].copy_(g_own)
        comm.all_to_all(send, plan.f_send_sp, plan.f_recv_sp, "backward grads", out=g_all[n_me:])
        rows = torch.cat([plan.f_uniq[ub[me]:ub[me + 1]] - mod._rows[0], plan.f_got])
        if mod.optimizer is None:
            return torch.zeros_like(weight).index_add_(0, rows, g_all), gpsw, None, None
        uniq, g = _group_sum(g_all, torch.arange(rows.numel(), device=rows.device), rows)
        _optimizer_step(mod, weight, mod.momentum, uniq, g)
        return None, gpsw, None, None


class _RowSharded(torch.autograd.Function):
    """Row sharding, "partials" exchange: every (id, probe) goes to the owner of its row, the owner
    pools each (bag, probe) segment over its rows, the requester combines the owners' partial pools."""

    @staticmethod
    def forward(ctx, weight, psw_sorted, mod, plan):
        comm, W, me = mod._comm, mod._comm.world, mod._comm.rank
        D, dtype = mod.dim, weight.dtype
        B, Q = plan.B, plan.Q
        S = B * Q
        idt = mod._idt
        # the segments in (bag, block) numbering, and the requests: per owner its segment lengths,
        # then its local rows
        sp = plan.p_sp
        plan.seg_id = (sp % max(B, 1)) * Q + sp // max(B, 1)
        local_rows = plan.p_local
        lb = np.cumsum([0] + plan.n_lookups)
        sb = np.cumsum([0] + plan.n_segs)
        parts = []
        for o in range(W):
            parts.append(plan.seg_lens[sb[o]:sb[o + 1]].to(idt))
            parts.append(local_rows[lb[o]:lb[o + 1]].to(idt))
        req = torch.cat(parts)
        recv = comm.all_to_all(req, [plan.n_segs[o] + plan.n_lookups[o] for o in range(W)],
                               [plan.recv_segs[s] + plan.recv_lookups[s] for s in range(W)], "forward ids")
        # owner: pool every received segment over the local rows
        seg_lens, rows, k = [], [], 0
        for s in range(W):
            seg_lens.append(recv[k:k + plan.recv_segs[s]])
            k += plan.recv_segs[s]
            rows.append(recv[k:k + plan.recv_lookups[s]])
            k += plan.recv_lookups[s]
        seg_lens = torch.cat(seg_lens).to(torch.int64)
        rows = torch.cat(rows).to(torch.int64)
        any_psw = any(plan.has_psw)
        if any_psw:
            psw_parts = [psw_sorted.detach()[lb[o]:lb[o + 1]] if psw_sorted is not None
                         else weight.new_empty(0) for o in range(W)]
            psw_send = torch.cat(psw_parts)
            psw_recv = comm.all_to_all(psw_send, plan.n_lookups if psw_sorted is not None else [0] * W,
                                       [plan.recv_lookups[s] if plan.has_psw[s] else 0 for s in range(W)],
                                       "forward weights")
            full, k = [], 0
            for s in range(W):
                if plan.has_psw[s]:
                    full.append(psw_recv[k:k + plan.recv_lookups[s]])
                    k += plan.recv_lookups[s]
                else:
                    full.append(torch.ones(plan.recv_lookups[s], dtype=dtype, device=weight.device))
            psw_recv = torch.cat(full)
        else:
            psw_recv = None
        offs = torch.nn.functional.pad(torch.cumsum(seg_lens, 0), (1, 0))
        mode_code = 2 if mod.mode == "max" else 0
        wd = weight.detach()
        partial, o2b, _, max_idx = torch.embedding_bag(wd, rows, offs, False, mode_code, False, psw_recv, True, None)
        back = comm.all_to_all(partial, plan.recv_segs, plan.n_segs, "forward pooled", scratch="pooled")
        del partial
        # requester: combine the owners' partial pools of each segment
        if mod.mode != "max":
            # one embedding_bag over the partials, grouped by segment (empty segments give 0), the
            # pooling scale applied as its weights
            seg_id = plan.seg_id
            order = torch.sort(seg_id.to(torch.int32) if S < 2 ** 31 else seg_id, stable=True)[1]
            offs_s = torch.nn.functional.pad(torch.cumsum(torch.bincount(seg_id, minlength=S), 0), (1, 0))
            scale = None if plan.seg_scale is None else plan.seg_scale[seg_id[order]]
            seg = torch.embedding_bag(back, order, offs_s, False, 0, False, scale, True, None)[0] \
                if back.shape[0] else weight.new_zeros((S, D))
            out = _assemble(mod, plan, seg, scaled=True)
        else:
            seg_raw = weight.new_empty((S, D)).zero_()
            idx = plan.seg_id[:, None].expand(-1, D)
            if back.shape[0]:
                seg_raw.scatter_reduce_(0, idx, back, "amax", include_self=False)
            # the winning owner of each (segment, column): the lowest rank holding the max
            owner_of = torch.repeat_interleave(torch.arange(W), torch.tensor(plan.n_segs))[:, None].expand(-1, D)
            cand = torch.where(back == seg_raw[plan.seg_id], owner_of, torch.full_like(owner_of, W))
            win_owner = torch.full((S, D), W, dtype=torch.int64).scatter_reduce_(0, idx, cand, "amin")
            plan.win = (owner_of == win_owner[plan.seg_id]).to(dtype)
            out = _assemble(mod, plan, seg_raw)
        if plan.needs_backward:
            plan.o_rows, plan.o_seg_lens, plan.o_psw, plan.o_max_idx = rows, seg_lens, psw_recv, max_idx
            plan.o_offs, plan.o_o2b = offs, o2b
        ctx.mod, ctx.plan = mod, plan
        ctx.weight = wd
        ctx.psw_grad = psw_sorted is not None and ctx.needs_input_grad[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mod, plan, weight = ctx.mod, ctx.plan, ctx.weight
        comm, W = mod._comm, mod._comm.world
        D = mod.dim
        g_seg = _assemble_backward(mod, plan, grad_out.contiguous())
        g_part = torch.index_select(g_seg, 0, plan.seg_id, out=comm.buf("grads", (plan.seg_id.numel(), D), g_seg.dtype))
        if mod.mode == "max":
            g_part.mul_(plan.win)
        g_recv = comm.all_to_all(g_part, plan.n_segs, plan.recv_segs, "backward grads", scratch="grads recv")
        # per-sample-weight grads (before the table is updated): <g, row> per lookup, back to their rank
        lb = np.cumsum([0] + plan.recv_lookups)
        if any(plan.has_psw):
            gw_lookup = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_recv, weight, plan.o_rows, plan.o_offs, _bag_of(plan.o_o2b, plan.o_seg_lens), 0, -1)
            send = torch.cat([gw_lookup[lb[s]:lb[s + 1]] if plan.has_psw[s] else gw_lookup.new_empty(0)
                              for s in range(W)])
            gpsw = comm.all_to_all(send, [plan.recv_lookups[s] if plan.has_psw[s] else 0 for s in range(W)],
                                   plan.n_lookups if plan.has_psw[comm.rank] else [0] * W, "backward weights")
        else:
            gpsw = None
        # the row gradients of this shard
        if mod.mode == "max":
            if mod.optimizer is None:
                grad_w = _max_grad(g_recv, plan.o_max_idx, plan.o_seg_lens, weight.shape[0])
            else:
                uniq, inv = torch.unique(plan.o_max_idx.reshape(-1), return_inverse=True)
                gu = g_recv.new_zeros(uniq.numel() * D)
                gu.index_add_(0, inv * D + torch.arange(D).repeat(g_recv.shape[0]), g_recv.reshape(-1))
                _optimizer_step(mod, weight, mod.momentum, uniq, gu.view(-1, D))
                grad_w = None
        else:
            uniq, gu = _group_sum(g_recv, _bag_of(plan.o_o2b, plan.o_seg_lens), plan.o_rows, plan.o_psw)
            if mod.optimizer is None:
                grad_w = torch.zeros_like(weight).index_copy_(0, uniq, gu)
            else:
                _optimizer_step(mod, weight, mod.momentum, uniq, gu)
                grad_w = None
        return grad_w, (gpsw if ctx.psw_grad else None), None, None


def _optimizer_step(mod, weight, momentum, uniq, g, sumsq_reduce=None):
    """weight[uniq] -= mult * g with SGD's or row-wise Adagrad's multiplier (the kernels' formula);
    uniq distinct. The row updates run in chunks whose temporaries stay small (large fresh
    allocations cost page faults on every step)."""
    ch = max(1024, (1 << 19) // max(1, g.shape[1]))
    if mod.optimizer == "sgd":
        for a in range(0, uniq.numel(), ch):
            weight.index_add_(0, uniq[a:a + ch], g[a:a + ch], alpha=-mod.lr)
        return
    sq = torch.bmm(g.unsqueeze(1), g.unsqueeze(2)).view(-1).to(momentum.dtype)  # row sums of g^2
    if sumsq_reduce is not None:
        sq = sumsq_reduce(sq)
    m = momentum.index_select(0, uniq) + sq / mod.dim
    momentum.index_copy_(0, uniq, m)
    mult = (mod.lr / (torch.sqrt(m) + mod.eps)).neg_().to(weight.dtype)
    for a in range(0, uniq.numel(), ch):  # g is this step's own buffer: scaled in place
        weight.index_add_(0, uniq[a:a + ch], g[a:a + ch].mul_(mult[a:a + ch, None]))


def _assemble(mod, plan, seg_raw, scaled=False):
    """(B*Q, D) pooled segments -> the (B, out_dim) output (pooling scale unless ``scaled``, then the
    combine)."""
    B, Q, D, F = plan.B, plan.Q, mod.dim, plan.F
    seg = seg_raw if (plan.seg_scale is None or scaled) else seg_raw * plan.seg_scale[:, None]
    if mod.combine == "concat":
        return seg.view(B, Q * D)
    out = seg.new_zeros((B, F, D)).index_add_(1, plan.feat_of_block, seg.view(B, Q, D))
    if mod.combine == "mean":
        out = out / torch.tensor(mod.num_probes, dtype=seg.dtype)[None, :, None]
    return out.view(B, F * D)


def _assemble_backward(mod, plan, grad):
    B, Q, D, F = plan.B, plan.Q, mod.dim, plan.F
    if mod.combine == "concat":
        g = grad.view(B * Q, D)
    else:
        g3 = grad.view(B, F, D)
        if mod.combine == "mean":
            g3 = g3 / torch.tensor(mod.num_probes, dtype=grad.dtype)[None, :, None]
        g = g3[:, plan.feat_of_block, :].reshape(B * Q, D)
    return g if plan.seg_scale is None else g * plan.seg_scale[:, None]


class _ColumnSharded(torch.autograd.Function):
    """Column sharding: every rank pools its columns for the global batch with the native op."""

    @staticmethod
    def forward(ctx, weight, psw, mod, plan):
        comm, W, me = mod._comm, mod._comm.world, mod._comm.rank
        cb = mod.col_bounds
        blocks = plan.Q if mod.combine == "concat" else plan.F
        psw_g = None
        if psw is not None:
            parts = comm.all_gather_v(psw.detach(), plan.Ns, "forward weights")
            psw_g = torch.empty(plan.values.numel(), dtype=weight.dtype)
            for s in range(W):
                psw_g[plan.gidx[s]] = parts[s]
        with torch.no_grad():
            out_g, argmax = torch.ops.embedops.multiplexed_embedding_bag(
                weight.detach(), plan.values, plan.offsets, mod.num_probes, mod.combine, mod.mode, psw_g, mod.seed,
                False)
        Dl = cb[me + 1] - cb[me]
        recv = comm.all_to_all(out_g.reshape(-1), [b * blocks * Dl for b in plan.Bs],
                               [plan.B * blocks * (cb[s + 1] - cb[s]) for s in range(W)], "forward pooled",
                               scratch="pooled")
        del out_g
        pieces, k = [], 0
        for s in range(W):
            n = plan.B * blocks * (cb[s + 1] - cb[s])
            pieces.append(recv[k:k + n].view(plan.B, blocks, cb[s + 1] - cb[s]))
            k += n
        out = torch.cat(pieces, 2).reshape(plan.B, blocks * mod.dim)
        ctx.mod, ctx.plan, ctx.weight = mod, plan, weight.detach()
        if plan.needs_backward:
            plan.argmax, plan.psw_g, plan.blocks = argmax, psw_g, blocks
        ctx.psw_grad = psw is not None and ctx.needs_input_grad[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mod, plan, weight = ctx.mod, ctx.plan, ctx.weight
        comm, W, me = mod._comm, mod._comm.world, mod._comm.rank
        cb, blocks = mod.col_bounds, plan.blocks
        g3 = grad_out.contiguous().view(plan.B, blocks, mod.dim)
        send = comm.buf("grads", (plan.B, blocks * mod.dim), grad_out.dtype)
        k = 0
        for s in range(W):  # rank s's columns of every row, one contiguous block per rank
            w = cb[s + 1] - cb[s]
            send.view(-1)[k:k + plan.B * blocks * w].view(plan.B, blocks, w).copy_(g3[:, :, cb[s]:cb[s + 1]])
            k += plan.B * blocks * w
        Dl = cb[me + 1] - cb[me]
        recv = comm.all_to_all(send.view(-1), [plan.B * blocks * (cb[s + 1] - cb[s]) for s in range(W)],
                               [b * blocks * Dl for b in plan.Bs], "backward grads", scratch="grads recv")
        grad_g = recv.view(plan.Bg, blocks * Dl)
        cfg = (mod.num_probes, mod.combine, mod.mode, mod.seed)
        args = (plan.values, plan.offsets, plan.argmax, mod.num_probes, mod.combine, mod.mode, plan.psw_g, mod.seed)
        gpsw = None
        if plan.psw_g is not None:
            _, gp_g = torch.ops.embedops.multiplexed_embedding_bag_backward(grad_g, weight, *args, False, True)
            send = torch.cat([gp_g[plan.gidx[s]] if plan.has_psw[s] else gp_g.new_empty(0) for s in range(W)])
            mine = plan.Ns[me] if plan.has_psw[me] else 0
            parts = comm.all_to_all(send, [plan.Ns[s] if plan.has_psw[s] else 0 for s in range(W)],
                                    [mine] * W, "backward weights")
            gpsw = parts.view(W, mine).sum(0)
        grad_w = None
        if mod.optimizer is None:
            grad_w, _ = torch.ops.embedops.multiplexed_embedding_bag_backward(grad_g, weight, *args, True, False)
        elif mod.optimizer == "sgd":
            torch.ops.embedops.multiplexed_embedding_bag_update(weight, mod.momentum, grad_g, *args, "sgd", mod.lr,
                                                                mod.eps)
        else:
            _column_adagrad(mod, plan, weight, grad_g, cfg)
        return grad_w, (gpsw if ctx.psw_grad else None), None, None


def _column_adagrad(mod, plan, weight, grad_g, cfg):
    """Row-wise Adagrad on a column shard: the row gradients of the local columns (one sort of the
    global batch's rows, then an embedding_bag over the pooled gradients: no (M, D) temporary), their
    squared sums all-reduced over the columns' owners (every rank sees the same rows), then the update."""
    comm = mod._comm
    Dl = weight.shape[1]
    B, Q = plan.Bg, plan.Q
    G = grad_g.view(B, plan.blocks, Dl)
    lengths = plan.offsets.diff()
    rows_l, seg_l, w_l = [], [], []
    cs = [1.0 / p if mod.combine == "mean" else 1.0 for p in mod.num_probes]
    weighted = mod.combine == "mean" or mod.mode == "mean" or plan.psw_g is not None
    for f, P in enumerate(mod.num_probes):
        a, e = int(plan.offsets[f * B]), int(plan.offsets[(f + 1) * B])
        v = plan.values[a:e]
        lens_f = lengths[f * B:(f + 1) * B]
        bag = torch.repeat_interleave(torch.arange(B), lens_f)
        if weighted and mod.mode != "max":
            scale = torch.full((e - a,), cs[f], dtype=weight.dtype)
            if mod.mode == "mean":
                scale = scale / lens_f[bag].to(weight.dtype)
            if plan.psw_g is not None:
                scale = scale * plan.psw_g[a:e]
        for p in range(P):
            rows_l.append(torch.ops.embedops.hash_ids(v, f, p, mod.num_rows, mod.seed))
            if mod.mode != "max":
                blk = plan.pbase[f] + p if mod.combine == "concat" else f
                seg_l.append(bag * plan.blocks + blk)
                if weighted:
                    w_l.append(scale)
    if not rows_l:
        return
    rows = torch.cat(rows_l)
    if mod.mode != "max":
        uniq, g = _group_sum(G.view(-1, Dl), torch.cat(seg_l), rows, torch.cat(w_l) if weighted else None)
    else:
        uniq = torch.unique(rows)
        g = weight.new_zeros((uniq.numel(), Dl))
        am = plan.argmax.view(B, Q, Dl)
        blk = torch.arange(Q) if mod.combine == "concat" else plan.feat_of_block
        bscale = torch.tensor([cs[int(f)] for f in plan.feat_of_block], dtype=weight.dtype)
        vals = (G[:, blk, :] * bscale[None, :, None]).reshape(-1)
        rows = am.reshape(-1)
        cols = torch.arange(Dl).repeat(B * Q)
        keep = rows >= 0
        rows, vals, cols = rows[keep], vals[keep], cols[keep]
        g.view(-1).index_add_(0, torch.searchsorted(uniq, rows) * Dl + cols, vals)
    _optimizer_step(mod, weight, mod.momentum, uniq, g,
                    lambda sq: comm.all_reduce(sq, "backward adagrad state"))


def full_state_dict(module: ShardedUnifiedEmbedding) -> dict:
    """The unsharded state dict of a :class:`ShardedUnifiedEmbedding` (``weight`` (R, D) and, for
    rowwise_adagrad, ``momentum`` (R,)), on every rank; loadable by
    :class:`~embedops.nn.UnifiedEmbedding` and by :meth:`ShardedUnifiedEmbedding.load_full_state_dict`
    at any world size. Collective."""
    if not isinstance(module, ShardedUnifiedEmbedding):
        raise TypeError(f"full_state_dict: module must be a ShardedUnifiedEmbedding, got {type(module).__name__}")
    comm, W = module._comm, module._comm.world
    w = module.weight.detach()
    if module.sharding == "row":
        rb = module.row_bounds
        parts = comm.all_gather_v(w.reshape(-1), [(rb[s + 1] - rb[s]) * module.dim for s in range(W)],
                                  "full_state_dict")
        weight = torch.cat(parts).view(module.num_rows, module.dim)
    else:
        cb = module.col_bounds
        parts = comm.all_gather_v(w.reshape(-1), [(cb[s + 1] - cb[s]) * module.num_rows for s in range(W)],
                                  "full_state_dict")
        weight = torch.cat([p.view(module.num_rows, cb[s + 1] - cb[s]) for s, p in enumerate(parts)], 1)
    out = {"weight": weight.clone()}
    if module.optimizer == "rowwise_adagrad":
        if module.sharding == "row":
            rb = module.row_bounds
            m = comm.all_gather_v(module.momentum, [rb[s + 1] - rb[s] for s in range(W)], "full_state_dict")
            out["momentum"] = torch.cat(m)
        else:
            out["momentum"] = module.momentum.clone()
    return out


def _momentum_rows(mod) -> int:  # noqa: D401  (kept for symmetry of the two shardings)
    return mod._rows[1] - mod._rows[0]


# ---- matryoshka --------------------------------------------------------------------------------


def _topk_merge(scores, gids, extra, k):
    """Top-k along the last dim by (NaN last, score descending, global id ascending)."""
    o = torch.argsort(gids, dim=-1, stable=True)
    scores, gids = scores.gather(-1, o), gids.gather(-1, o)
    extra = [e.gather(-1, o) for e in extra]
    nan = torch.isnan(scores)
    key = torch.where(nan, torch.full_like(scores, -math.inf), scores)
    o = torch.argsort(key, dim=-1, descending=True, stable=True)
    o = o.gather(-1, torch.argsort(nan.gather(-1, o).to(torch.int8), dim=-1, stable=True))[..., :k]
    return scores.gather(-1, o), gids.gather(-1, o), [e.gather(-1, o) for e in extra]


class ShardedMatryoshkaIndex:
    """A :class:`~embedops.MatryoshkaIndex` split over the ranks of a process group (each rank holds
    the rows it added). Collective: every rank calls every method, in the same order.

    Args:
        dim, dims, metric, dtype: as :class:`~embedops.MatryoshkaIndex` (float storage).
        process_group: the group (default: the default group).
        timeout: seconds any collective may wait (default 300).

    Ids are global int64s: ``add(vectors, ids)`` takes any distinct int64 ids (FAISS add_with_ids;
    checked distinct across ranks and previous adds); without ids they are consecutive in (call order,
    rank order): rank 0's rows of the first add get 0.., then rank 1's, ... An index uses one kind or
    the other. Searches return these ids, never shifted.

    ``search(queries, k, dim=None)`` / ``funnel_search(queries, k, stages, dim=None)``: each rank
    passes its own ``(B_r, D)`` queries (B_r may differ, 0 included; k, dim and stages must agree)
    and gets its queries' top-k over the whole distributed corpus: the scores of one MatryoshkaIndex
    holding the union (ties broken to the lower id). The funnel keeps a global shortlist per stage,
    as the single-index funnel does. ``len()`` is the global count.
    """

    FORMAT = "embedops.ShardedMatryoshkaIndex"
    VERSION = 1

    def __init__(self, dim: int, dims: Sequence[int] | None = None, metric: str = "cosine",
                 dtype: torch.dtype = torch.float32, process_group=None, *, timeout: float = _DEFAULT_TIMEOUT):
        op = "ShardedMatryoshkaIndex"
        self._comm = _Comm(op, process_group, timeout)

        def make():
            try:
                return MatryoshkaIndex(dim, dims=dims, metric=metric, dtype=dtype, device=self._comm.device)
            except (ValueError, TypeError) as e:
                msg = str(e)
                raise type(e)(op + msg[len("MatryoshkaIndex"):] if msg.startswith("MatryoshkaIndex") else msg) \
                    from None

        local, table = self._comm.run("construction", make,
                                      lambda ix: [ix.dim, _crc(ix.dims), _crc(ix.metric, str(ix.dtype))], 3)
        if bool((table != table[0]).any()):
            raise ValueError(f"{op}: the ranks were constructed with different configurations (dim per rank "
                             f"{[int(v) for v in table[:, 0]]}, dims/metric/dtype differ: "
                             f"{bool((table[:, 1:] != table[0, 1:]).any())}); every rank must pass the same "
                             "arguments")
        self._local = local
        self._ids = torch.zeros(0, dtype=torch.int64)
        self._n = 0
        self._counts = [0] * self._comm.world  # rows held by each rank (known to every rank)
        self._qcap = 16  # query rows per rank that travel with the status words of a search
        self._id_mode = None  # "auto" | "user"
        self.dim, self.dims, self.metric, self.dtype = local.dim, local.dims, local.metric, local.dtype

    def __len__(self) -> int:
        return self._n

    @property
    def bytes_sent(self) -> int:
        return self._comm.bytes_sent

    @property
    def local_size(self) -> int:
        return len(self._local)

    @property
    def local_ids(self) -> torch.Tensor:
        """The global ids of this rank's rows, in its storage order."""
        return self._ids.clone()

    def __repr__(self) -> str:
        return (f"ShardedMatryoshkaIndex(dim={self.dim}, dims={self.dims}, metric={self.metric!r}, dtype={self.dtype}, "
                f"n={self._n}, rank={self._comm.rank}/{self._comm.world}, local n={len(self._local)})")

    def add(self, vectors, ids=None) -> None:
        """Adds this rank's ``(n_r, D)`` vectors (tensor or numpy; n_r may be 0) with optional ``(n_r,)``
        int64 global ids. Collective."""
        op = "ShardedMatryoshkaIndex.add"
        comm = self._comm

        def check():
            v, _ = to_tensor(vectors, op, "vectors")
            if v.dim() != 2 or v.shape[1] != self.dim:
                raise ValueError(f"{op}: vectors must have shape (n, D={self.dim}), got {tuple(v.shape)}")
            if not v.is_floating_point():
                raise TypeError(f"{op}: vectors must be floating point, got {v.dtype}")
            i = None
            if ids is not None:
                i, _ = to_tensor(ids, op, "ids")
                if i.dtype not in (torch.int32, torch.int64):
                    raise TypeError(f"{op}: ids must be int32 or int64, got {i.dtype}")
                if i.dim() != 1 or i.numel() != v.shape[0]:
                    raise ValueError(f"{op}: ids must have shape (n,) = ({v.shape[0]},), got {tuple(i.shape)}")
                i = i.to("cpu", torch.int64)
                if torch.unique(i).numel() != i.numel():
                    raise ValueError(f"{op}: ids must be distinct, got duplicates on this rank")
            return v, i

        (v, i), table = comm.run("add", check, lambda r: [r[0].shape[0], int(r[1] is not None)], 2)
        ns = [int(x) for x in table[:, 0]]
        given = {bool(table[s, 1]) for s in range(comm.world) if ns[s] > 0}
        if len(given) > 1:
            raise ValueError(f"{op}: some ranks passed ids and others did not (ids given per rank: "
                             f"{[bool(x) for x in table[:, 1]]}); pass ids on every rank or on none")
        mode = None if not given else ("user" if given.pop() else "auto")
        if mode is not None and self._id_mode is not None and mode != self._id_mode:
            raise ValueError(f"{op}: this index was filled with {self._id_mode} ids; mixing user ids and "
                             "automatic ids is not supported")
        if mode is None:
            return
        me = comm.rank
        if mode == "user":
            all_ids = torch.cat(comm.all_gather_v(i if i is not None else torch.zeros(0, dtype=torch.int64), ns,
                                                  "add ids"))
            dup = torch.unique(all_ids).numel() != all_ids.numel()
            clash = bool(torch.isin(all_ids, self._ids).any()) if self._ids.numel() else False
            flags = comm.all_reduce(torch.tensor([int(dup), int(clash)], dtype=torch.int64, device=comm.device),
                                    "add ids check").cpu()
            if flags[0]:
                raise ValueError(f"{op}: ids must be distinct across ranks: the same id was given on two ranks")
            if flags[1]:
                raise ValueError(f"{op}: ids must be new: some ids are already in the index")
            new_ids = i if i is not None else torch.zeros(0, dtype=torch.int64)
        else:
            base = self._n + sum(ns[:me])
            new_ids = torch.arange(base, base + ns[me], dtype=torch.int64)
        self._local.add(v, show_progress_bar=False)
        self._ids = torch.cat([self._ids, new_ids])
        self._n += sum(ns)
        self._counts = [c + n for c, n in zip(self._counts, ns)]
        self._id_mode = mode

    def _gather_queries(self, op, queries, params):
        """Validates this rank's queries and ``params()`` (-> (plan, ints that must agree)), then ONE
        all_gather carries the status words and the queries (up to ``_qcap`` rows per rank, the largest
        batch of the previous call; a second all_gather only for rows past it); returns (plan, all
        queries, batch sizes, was_numpy)."""
        comm, D = self._comm, self.dim
        cap = self._qcap
        esz = torch.empty(0, dtype=self.dtype).element_size()
        per = (cap * D * esz + 7) // 8  # int64 words of the payload

        def check():
            q, was_np = self._local._queries(op, queries)
            plan, ints = params()
            return q, was_np, plan, ints

        res, err = None, None
        try:
            res = check()
        except Exception as e:  # noqa: BLE001  (relayed to the other ranks, then re-raised)
            err = e
        extra = None
        if err is None:
            q = res[0]
            head = q[:cap].reshape(-1)
            pay = torch.zeros(per * 8 // esz, dtype=q.dtype, device=comm.device)
            pay[: head.numel()] = head
            extra = pay.view(torch.int64)
        ints = ([res[0].shape[0]] + res[3]) if err is None else [0] * 3
        table, pays = comm.status(op.split(".")[-1], err, ints, extra, per)
        q, was_np, plan, _ = res
        table = table.cpu()
        if bool((table[:, 1:] != table[0, 1:]).any()):
            raise ValueError(f"{op}: every rank must pass the same k / dim / stages (they differ between ranks)")
        Bs = [int(x) for x in table[:, 0]]
        vals = pays.contiguous().view(self.dtype)
        parts = [vals[s, : min(b, cap) * D].view(min(b, cap), D) for s, b in enumerate(Bs)]
        if max(Bs) > cap:  # the rows past the cap
            more = comm.all_gather_v(q[cap:].reshape(-1), [max(0, b - cap) * D for b in Bs], f"{op} queries")
            parts = [torch.cat([p, m.view(-1, D)]) for p, m in zip(parts, more)]
        self._qcap = max(Bs)
        q_all = torch.cat(parts) if parts else q[:0]
        return plan, q_all, Bs, was_np

    def _exchange_topk(self, vals, rows, Bs, k_req, what, with_rows=False):
        """Sends each rank the (nd, B_r, k_local) block of its queries in ONE all_to_all (scores as bits,
        global ids and, for the funnel, the owners' local rows, packed as int64; every rank knows every
        rank's k_local = min(k, its row count), so no sizes are exchanged); returns the merged candidates
        (nd, B_me, sum k_s): scores, global ids, owner ranks, owners' local rows (None without rows)."""
        comm, W, me = self._comm, self._comm.world, self._comm.rank
        nd, _, kl = vals.shape
        kls = [min(k_req, c) for c in self._counts]
        gid = self._ids[rows.cpu()].to(rows.device) if rows.numel() else rows
        if vals.dtype not in (torch.float32, torch.float64):
            vals = vals.float()
        sdt = vals.dtype
        bits = vals.view(torch.int64) if sdt == torch.float64 else vals.view(torch.int32).to(torch.int64)
        fields = [bits, gid] + ([rows] if with_rows else [])
        nf = len(fields)
        packed = torch.stack(fields)  # (nf, nd, B_all, kl)
        boff = np.cumsum([0] + Bs)
        send = torch.cat([packed[:, :, boff[s]:boff[s + 1]].reshape(-1) for s in range(W)])
        in_sp = [nf * nd * Bs[s] * kl for s in range(W)]
        out_sp = [nf * nd * Bs[me] * kls[s] for s in range(W)]
        got = comm.all_to_all(send, in_sp, out_sp, f"{what} results")
        sc, ids, own, loc = [], [], [], []
        k = 0
        for s in range(W):
            n = out_sp[s]
            blk = got[k:k + n].view(nf, nd, Bs[me], kls[s])
            k += n
            sc.append(blk[0] if sdt == torch.float64 else blk[0].to(torch.int32))
            ids.append(blk[1])
            if with_rows:
                loc.append(blk[2])
                own.append(torch.full_like(blk[1], s))
        sc = torch.cat(sc, -1)
        sc = sc.view(torch.float64) if sdt == torch.float64 else sc.view(torch.float32)
        if not with_rows:
            return sc, torch.cat(ids, -1), None, None
        return sc, torch.cat(ids, -1), torch.cat(own, -1), torch.cat(loc, -1)

    def search(self, queries, k: int, dim: int | Sequence[int] | None = None):
        """Exact top-k over the whole distributed corpus for this rank's ``(B_r, D)`` queries.

        Returns ``(values, ids)``: ``(B_r, k)`` each for an int ``dim`` (``(len(dim), B_r, k)`` for a
        list), scores best first (ties to the lower id, NaN last), int64 global ids; numpy in, numpy out.
        Collective."""
        op = "ShardedMatryoshkaIndex.search"
        single = dim is None or isinstance(dim, (int, np.integer))

        def params():
            dims = check_dims(op, [self.dim] if dim is None else dim, self.dim)
            kk = check_int(op, "k", k)
            if not 0 <= kk <= self._n:
                raise ValueError(f"{op}: k must be in [0, len(index)={self._n}], got {kk}")
            return (dims, kk), [kk, _crc(dims)]

        (dims, k), q_all, Bs, was_np = self._gather_queries(op, queries, params)
        kl = min(k, len(self._local))
        if kl > 0 and q_all.shape[0]:
            v, i = self._local.search(q_all, kl, dims)
        else:
            acc = torch.float64 if self.dtype == torch.float64 else torch.float32
            v = torch.empty((len(dims), q_all.shape[0], kl), dtype=acc, device=q_all.device)
            i = torch.empty((len(dims), q_all.shape[0], kl), dtype=torch.int64, device=q_all.device)
        v, i = v.view(len(dims), q_all.shape[0], kl), i.view(len(dims), q_all.shape[0], kl)
        sc, ids, _, _ = self._exchange_topk(v, i, Bs, k, "search")
        sc, ids, _ = _topk_merge(sc, ids, [], k)
        if single:
            sc, ids = sc[0], ids[0]
        return (sc.cpu().numpy(), ids.cpu().numpy()) if was_np else (sc, ids)

    def _prefix_scores(self, q, rows, d):
        """Scores at prefix d of (query, local row) pairs, q (M, D), rows (M,), like the kernels:
        computed in float64, returned in the score dtype."""
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        if rows.numel() == 0:
            return torch.zeros(0, dtype=acc, device=q.device)
        bl = self._local._views()
        bounds = self._local._bounds
        x = torch.cat([b[rows, : min(e, d) - a] for b, a, e in zip(bl, bounds, bounds[1:]) if a < d], 1).double()
        qd = q[:, :d].double()
        dot = (qd * x).sum(1)
        if self.metric == "cosine":
            def inv(v):
                sq = (v * v).sum(1)
                r = torch.where(sq == 0, torch.zeros_like(sq), 1.0 / sq.sqrt())
                return torch.where(torch.isfinite(sq), r, torch.full_like(sq, float("nan")))
            a, b = inv(qd), inv(x)
            dot = torch.where((a == 0) | (b == 0), torch.zeros_like(dot), dot * a * b)
        return dot.to(acc)

    def funnel_search(self, queries, k: int, stages: Sequence[tuple[int, int]] = ((64, 200), (256, 50)),
                      dim: int | None = None):
        """Funnel retrieval over the whole distributed corpus, equal to one MatryoshkaIndex's
        :meth:`~embedops.MatryoshkaIndex.funnel_search` on the union: a global top ``k1`` at ``d1``,
        then each stage rescores the global survivors at its prefix and keeps its best ``kk``.
        Returns ``(values, ids)``, each ``(B_r, k)``. Collective."""
        op = "ShardedMatryoshkaIndex.funnel_search"
        comm, W, me = self._comm, self._comm.world, self._comm.rank
        def params():
            fdim = self.dim if dim is None else check_int(op, "dim", dim)
            dims, ks = funnel_plan(op, stages, k, fdim, self.dim, self._n)
            return (dims, ks), [_crc(dims), _crc(ks)]

        (dims, ks), q_all, Bs, was_np = self._gather_queries(op, queries, params)
        boff = np.cumsum([0] + Bs)
        kl = min(ks[0], len(self._local))
        if kl > 0 and q_all.shape[0]:
            v, i = self._local.search(q_all, kl, dims[0])
        else:
            acc = torch.float64 if self.dtype == torch.float64 else torch.float32
            v = torch.empty((q_all.shape[0], kl), dtype=acc, device=q_all.device)
            i = torch.empty((q_all.shape[0], kl), dtype=torch.int64, device=q_all.device)
        sc, ids, own, loc = self._exchange_topk(v[None], i[None], Bs, ks[0], "funnel_search", with_rows=True)
        sc, ids, (own, loc) = _topk_merge(sc[0], ids[0], [own[0], loc[0]], ks[0])
        Bm = Bs[me]
        for d, kk in zip(dims[1:], ks[1:]):
            # rescore the global survivors at d on their owners
            n_c = sc.shape[1]
            qi = torch.arange(Bm).repeat_interleave(n_c)
            o_f, l_f = own.reshape(-1), loc.reshape(-1)
            order = torch.argsort(o_f, stable=True)
            cnt = torch.bincount(o_f, minlength=W).tolist()
            req = torch.stack([qi[order], l_f[order]], 1)  # (M, 2): query of this rank, owner's row
            cnts = torch.stack(comm.all_gather(torch.tensor(cnt, dtype=torch.int64, device=comm.device),
                                               "funnel_search sizes")).cpu()
            recv_cnt = [int(cnts[s, me]) for s in range(W)]
            got = comm.all_to_all(req, cnt, recv_cnt, "funnel_search candidates")
            src = torch.repeat_interleave(torch.arange(W), torch.tensor(recv_cnt))
            qrows = q_all[torch.tensor(boff[:-1], dtype=torch.int64)[src] + got[:, 0]] if got.shape[0] \
                else q_all[:0]
            scores = self._prefix_scores(qrows, got[:, 1], d)
            back = comm.all_to_all(scores, recv_cnt, cnt, "funnel_search scores")
            new = torch.empty_like(back)
            new[order] = back
            sc, ids, (own, loc) = _topk_merge(new.view(Bm, n_c).to(sc.dtype), ids, [own, loc], kk)
        return (sc.cpu().numpy(), ids.cpu().numpy()) if was_np else (sc, ids)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes one file per shard (``shard-<r>-of-<W>.emix``: a MatryoshkaIndex file;
        ``shard-<r>-of-<W>.ids``: its int64 little-endian ids) and ``manifest.json`` (config, counts,
        the CRC-32 of every file) into ``directory``. Collective; returns when every file is written."""
        op = "ShardedMatryoshkaIndex.save"
        comm, W, me = self._comm, self._comm.world, self._comm.rank
        directory = os.fspath(directory)
        names = (f"shard-{me:05d}-of-{W:05d}.emix", f"shard-{me:05d}-of-{W:05d}.ids")

        def write():
            os.makedirs(directory, exist_ok=True)
            self._local.save(os.path.join(directory, names[0]))
            raw = self._ids.numpy().astype("<i8").tobytes()
            with open(os.path.join(directory, names[1]) + ".tmp", "wb") as f:
                f.write(raw)
            os.replace(os.path.join(directory, names[1]) + ".tmp", os.path.join(directory, names[1]))
            return [len(self._local), _file_crc(os.path.join(directory, names[0])), zlib.crc32(raw)]

        _, table = comm.run("save", write, lambda r: r, 3)
        err = None
        if me == 0:
            try:
                manifest = {
                    "format": self.FORMAT, "version": self.VERSION, "dim": self.dim, "dims": self.dims,
                    "metric": self.metric, "dtype": str(self.dtype).replace("torch.", ""), "n": self._n,
                    "id_mode": self._id_mode, "world_size": W,
                    "shards": [{"vectors": f"shard-{s:05d}-of-{W:05d}.emix", "ids": f"shard-{s:05d}-of-{W:05d}.ids",
                                "n": int(table[s, 0]), "vectors_crc32": int(table[s, 1]),
                                "ids_crc32": int(table[s, 2])} for s in range(W)]}
                tmp = os.path.join(directory, "manifest.json.tmp")
                with open(tmp, "w") as f:
                    json.dump(manifest, f, indent=1)
                os.replace(tmp, os.path.join(directory, "manifest.json"))
            except Exception as e:  # noqa: BLE001
                err = e
        comm.status("save manifest", err, [])

    @classmethod
    def load(cls, directory: str | os.PathLike, process_group=None, *,
             timeout: float = _DEFAULT_TIMEOUT) -> "ShardedMatryoshkaIndex":
        """Reads a :meth:`save` directory into the current group, of any world size: the stored rows
        (in shard order) are split into near-equal contiguous parts, one per rank; ids are kept.
        Checks the manifest and every file's CRC; raises ValueError naming the file. Collective."""
        op = "ShardedMatryoshkaIndex.load"
        directory = os.fspath(directory)
        comm = _Comm(op, process_group, timeout)
        W, me = comm.world, comm.rank

        def read():
            path = os.path.join(directory, "manifest.json")
            try:
                with open(path) as f:
                    man = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{op}: {path}: cannot read the manifest: {e}") from None
            if not isinstance(man, dict) or man.get("format") != cls.FORMAT or man.get("version") != cls.VERSION:
                raise ValueError(f"{op}: {path}: not a {cls.FORMAT} version {cls.VERSION} manifest")
            shards = man["shards"]
            total = sum(int(s["n"]) for s in shards)
            if total != int(man["n"]):
                raise ValueError(f"{op}: {path}: the shards hold {total} rows, the manifest says {man['n']}")
            b = _split(total, W)
            lo, hi = b[me], b[me + 1]
            vecs, ids, start = [], [], 0
            for s in shards:
                a, e = start, start + int(s["n"])
                start = e
                if e <= lo or a >= hi or a == e:
                    continue
                vp, ip = os.path.join(directory, s["vectors"]), os.path.join(directory, s["ids"])
                if _file_crc(vp) != int(s["vectors_crc32"]):
                    raise ValueError(f"{op}: {vp}: checksum mismatch with the manifest (corrupt or replaced)")
                with open(ip, "rb") as f:
                    raw = f.read()
                if zlib.crc32(raw) != int(s["ids_crc32"]) or len(raw) != 8 * (e - a):
                    raise ValueError(f"{op}: {ip}: checksum or size mismatch with the manifest")
                part = MatryoshkaIndex.load(vp)
                r0, r1 = max(lo, a) - a, min(hi, e) - a
                vecs.append(part.vectors[r0:r1])
                ids.append(torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))[r0:r1])
            return man, vecs, ids

        (man, vecs, ids), _ = comm.run("load", read)
        dtype = getattr(torch, man["dtype"])
        index = cls(man["dim"], dims=man["dims"], metric=man["metric"], dtype=dtype, process_group=process_group,
                    timeout=timeout)
        if vecs:
            index._local.add(torch.cat(vecs), show_progress_bar=False)
            index._ids = torch.cat(ids)
        index._n = int(man["n"])
        b = _split(index._n, W)
        index._counts = [b[s + 1] - b[s] for s in range(W)]
        index._id_mode = man["id_mode"]
        return index


def _file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


__all__ = ["ShardedUnifiedEmbedding", "ShardedMatryoshkaIndex", "full_state_dict"]
