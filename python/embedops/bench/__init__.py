"""Microbenchmarks: ``python -m embedops.bench [families...] [--device cpu|cuda] [--quick]``.

Each family is a module ``embedops.bench.<family>`` with ``cases(device, quick)`` returning case
builders (see :mod:`embedops.bench.core`). To add a family, add its module name to FAMILIES.
"""

from __future__ import annotations

import importlib

from .core import Case, Target, assert_close, run

# family name -> module; run in this order
FAMILIES = ["embedding", "matryoshka", "compressed", "attention", "integrations", "distributed"]


def load_family(name: str):
    """The family's bench module, or None if that family has no benchmarks yet."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            return None
        raise


__all__ = ["Case", "FAMILIES", "Target", "assert_close", "load_family", "run"]
