"""Embedding family benchmarks."""

from __future__ import annotations

import torch

import embedops
from embedops import reference

from .core import Case


def _hash_case(device: str, n: int, dtype: torch.dtype) -> Case:
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**62), 2**62, (n,), generator=g).to(dtype).to(device)
    kw = dict(feature=7, probe=1, num_rows=1 << 20, seed=3)

    def check(ours, theirs):
        if not torch.equal(ours, theirs):
            raise AssertionError(f"{int((ours != theirs).sum())} rows differ")

    return Case(
        name="hash_ids",
        shapes=f"N={n:,} {str(dtype).replace('torch.', '')}",
        fn=lambda: embedops.hash_ids(values, **kw),
        baselines={"torch int ops": lambda: reference.hash_ids_torch(values, **kw)},
        check=check,
        bytes=n * (values.element_size() + 8),
    )


def cases(device: str, quick: bool):
    n = 1 << (20 if quick else 23)
    return [lambda dtype=dtype: _hash_case(device, n, dtype) for dtype in (torch.int64, torch.int32)]
