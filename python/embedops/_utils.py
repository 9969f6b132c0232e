"""Small helpers shared by the public wrappers: numpy <-> torch, device checks."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import numpy as np
import torch

from ._load import _C

_WITH_CUDA = bool(_C.build_info()["cuda"])


def to_tensor(x: Any, op: str, name: str) -> tuple[torch.Tensor, bool]:
    """Returns (tensor, came_from_numpy). numpy arrays are wrapped without a copy when possible."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays; copy instead
            x = x.copy()
        return torch.from_numpy(np.ascontiguousarray(x)), True
    raise TypeError(f"{op}: {name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def check_device(op: str, name: str, t: torch.Tensor) -> None:
    """A clear error for a device embedops has no kernel for (instead of the dispatcher's)."""
    if t.device.type == "cuda" and not _WITH_CUDA:
        raise RuntimeError(
            f"{op}: {name} is on {t.device}, but this embedops build has no CUDA kernels "
            "(built CPU-only; see embedops.build_info()). Rebuild with a CUDA torch and nvcc, "
            "EMBEDOPS_CUDA=ON, or move the tensor to the CPU."
        )
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{op}: {name} is on {t.device}; embedops has kernels for cpu and cuda only")


def show_progress(show_progress_bar) -> bool:
    """None: a bar only when stderr is a terminal (quiet in logs and CI); else the flag."""
    if show_progress_bar is None:
        return sys.stderr.isatty()
    return bool(show_progress_bar)


def rich_available() -> bool:
    return importlib.util.find_spec("rich") is not None


class ProgressBar:
    """A transient rich progress bar on stderr when ``show`` (and rich is installed); else nothing."""

    def __init__(self, label: str, total: int, show: bool):
        self._bar = None
        if not show or not rich_available():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TimeRemainingColumn(), transient=True, console=Console(stderr=True))
        self._task = self._bar.add_task("", total=total)

    def __enter__(self):
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


def check_int(op: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return int(v)


def check_int64(op: str, name: str, v: Any) -> int:
    """An int that fits the op's int64 argument (Python ints are unbounded; the op's own range
    checks are C++'s)."""
    v = check_int(op, name, v)
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{op}: {name} must fit in int64, got {v}")
    return v


# Matryoshka arguments given as Python objects (lists of prefix sizes, funnel stages), shared by
# the functional API (matryoshka.py) and MatryoshkaIndex (search.py).

_METRICS = ("cosine", "dot")


def check_dims(op: str, dims, D: int | None = None) -> list[int]:
    """A Python list/tuple/range/1-D array of strictly ascending prefix sizes in [1, D]."""
    if isinstance(dims, (int, np.integer)) and not isinstance(dims, bool):
        dims = [int(dims)]
    if not isinstance(dims, (list, tuple, range)) and not (isinstance(dims, np.ndarray) and dims.ndim == 1):
        raise TypeError(f"{op}: dims must be a list of ints, got {type(dims).__name__}")
    out = [check_int(op, "dims", d) for d in dims]
    if not out:
        raise ValueError(f"{op}: dims must be a non-empty list of prefix sizes, got []")
    for i, d in enumerate(out):
        if D is not None and not 1 <= d <= D:
            raise ValueError(f"{op}: dims must be in [1, D={D}], got dims[{i}] = {d} (dims {out})")
        if i and d <= out[i - 1]:
            raise ValueError(f"{op}: dims must be strictly ascending, got {out}")
    return out


def check_metric(op: str, metric) -> str:
    if metric not in _METRICS:
        raise ValueError(f'{op}: metric must be "cosine" or "dot", got {metric!r}')
    return metric


def funnel_plan(op: str, stages, k: int, dim: int, D: int, N: int) -> tuple[list[int], list[int]]:
    """The (dims, ks) of a funnel from Python ``stages`` [(dim, k), ...], the final ``dim`` and ``k``."""
    k = check_int(op, "k", k)
    if not 1 <= dim <= D:
        raise ValueError(f"{op}: dim must be in [1, D={D}], got {dim}")
    try:
        pairs = [(check_int(op, "stages", d), check_int(op, "stages", kk)) for d, kk in stages]
    except (TypeError, ValueError) as e:
        if isinstance(e, TypeError) and "must be an int" in str(e):
            raise
        raise TypeError(f"{op}: stages must be a list of (dim, k) pairs, got {stages!r}") from None
    if not pairs:
        raise ValueError(f"{op}: stages must hold at least one (dim, k) pair")
    dims = [d for d, _ in pairs] + [dim]
    ks = [kk for _, kk in pairs] + [k]
    check_dims(op, dims, D)
    if k < 0:
        raise ValueError(f"{op}: k must be >= 0, got {k}")
    if ks[0] > N:
        raise ValueError(f"{op}: stages[0] keeps {ks[0]} rows, more than the corpus has (N={N})")
    for i in range(1, len(ks)):
        if ks[i] > ks[i - 1]:
            raise ValueError(f"{op}: the k of each stage must be non-increasing and k <= the last stage's, got "
                             f"stages {pairs} and k={k}")
    return dims, ks


_STAGE_PRECISIONS = ("float", "int8", "binary")


def has_precision_stages(stages) -> bool:
    """True if any funnel stage names its precision: ``(precision, dim, k)``."""
    try:
        return any(isinstance(st, (tuple, list)) and len(st) == 3 for st in stages)
    except TypeError:
        return False


def code_funnel_plan(op: str, stages, k: int, D: int, N: int, available) -> list[tuple[str, int, int]]:
    """The ``[(precision, dim, shortlist), ...]`` of a funnel over compressed codes: ``(dim, k)``
    stages mean float; the first stage scans every row (binary only there), each later one rescores
    the previous stage's survivors; shortlists non-increasing, ``k`` <= the last."""
    k = check_int(op, "k", k)
    plan = []
    for i, st in enumerate(stages):
        if not isinstance(st, (tuple, list)) or len(st) not in (2, 3):
            raise TypeError(f"{op}: stages[{i}] must be (precision, dim, shortlist_size) or (dim, k), got {st!r}")
        prec, d, kk = ("float", *st) if len(st) == 2 else st
        if prec not in _STAGE_PRECISIONS:
            raise ValueError(f"{op}: stages[{i}] precision must be one of {_STAGE_PRECISIONS}, got {prec!r}")
        if prec not in available:
            raise ValueError(f"{op}: stages[{i}] is a {prec} stage, but this index holds no {prec} "
                             f"{'vectors (keep_float=False)' if prec == 'float' else 'codes'}; it holds "
                             f"{', '.join(available)}")
        if prec == "binary" and i > 0:
            raise ValueError(f"{op}: a binary stage can only be the first stage (a shortlist from the bit "
                             f"codes), got one at stages[{i}]")
        d, kk = check_int(op, "stages", d), check_int(op, "stages", kk)
        if not 1 <= d <= D:
            raise ValueError(f"{op}: stages[{i}] dim must be in [1, D={D}], got {d}")
        if kk < 1:
            raise ValueError(f"{op}: stages[{i}] shortlist size must be >= 1, got {kk}")
        if i == 0 and kk > N:
            raise ValueError(f"{op}: stages[0] keeps {kk} rows, more than the index holds (N={N})")
        if i > 0 and kk > plan[-1][2]:
            raise ValueError(f"{op}: shortlist sizes must be non-increasing (each stage rescores the previous "
                             f"stage's survivors), got stages {list(stages)}")
        plan.append((prec, d, kk))
    if not plan:
        raise ValueError(f"{op}: stages must hold at least one stage")
    if not 0 <= k <= plan[-1][2]:
        raise ValueError(f"{op}: k must be in [0, the last stage's shortlist size {plan[-1][2]}], got {k}")
    return plan

