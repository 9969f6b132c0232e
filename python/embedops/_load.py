"""Loads the native extension, after checking it was built against the torch that is imported."""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild embedops against the installed torch, from the source tree:\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(embedops links the torch it is built with, so it must be rebuilt whenever torch changes.)"
)


def _load():
    try:
        from . import _build_config
    except ImportError as e:  # pragma: no cover - only without an installed build
        raise ImportError(
            "embedops: the native extension is not built (no embedops._build_config). " + _REBUILD
        ) from e
    if _build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"embedops was built against torch {_build_config.TORCH_VERSION}, but torch "
            f"{torch.__version__} is imported. " + _REBUILD
        )
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(f"embedops: could not load the native extension: {e}. " + _REBUILD) from e
    # the CPU level the kernels will run at; a bad EMBEDOPS_CPU_CAPABILITY (unknown, or a level
    # this CPU or build lacks) fails here, at import, with what the CPU supports
    _C._check_cpu_capability()
    return _C


_C = _load()
