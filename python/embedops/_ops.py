"""Fake (meta) kernels and autograd registrations for every torch.ops.embedops op.

Fakes let torch.compile / FakeTensor trace the ops without running them; autograd formulas
route gradients through the backward ops. Each op's registrations sit together.
"""

from __future__ import annotations

import torch

from ._load import _C  # noqa: F401  (the schemas must be registered first)

# ---- embedding ---------------------------------------------------------------------------------


@torch.library.register_fake("embedops::hash_ids")
def _hash_ids_fake(values, feature, probe, num_rows, seed=0):
    return torch.empty_like(values, dtype=torch.int64, memory_format=torch.contiguous_format)


# ---- matryoshka --------------------------------------------------------------------------------

# ---- attention ---------------------------------------------------------------------------------
