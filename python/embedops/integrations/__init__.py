"""Integrations with the libraries embedops users already run.

- :mod:`embedops.integrations.transformers`: an ``attn_implementation="embedops"`` attention
  backend for Hugging Face transformers models.
- :mod:`embedops.integrations.sentence_transformers`: ``semantic_search`` over embeddings or a
  :class:`~embedops.MatryoshkaIndex`, and building an index from a sentence-transformers model.

Each submodule imports its library lazily: ``import embedops`` never needs them.
"""

from __future__ import annotations

import importlib.util

# integration -> the distribution it needs (``pip install "embedops[<extra>]"``)
INTEGRATIONS = {"transformers": "transformers", "sentence_transformers": "sentence_transformers",
                "torchrec": "torchrec"}


def available() -> dict[str, bool]:
    """Which integrations' libraries are importable here (without importing them)."""
    return {name: importlib.util.find_spec(mod) is not None for name, mod in INTEGRATIONS.items()}


__all__ = ["available"]
