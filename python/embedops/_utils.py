"""Small helpers shared by the public wrappers: numpy <-> torch, device checks."""

from __future__ import annotations

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


def check_int(op: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return int(v)
