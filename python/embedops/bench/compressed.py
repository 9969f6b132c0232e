"""Compressed-storage benchmarks: ``hamming_topk`` over packed binary codes vs faiss
IndexBinaryFlat (the same k nearest by Hamming distance), at 256 / 512 / 1024 bits, k = 10,
B in {1, 64}. The codes are the sign bits of a seeded synthetic Matryoshka-spectrum corpus
(variance falling with the dimension, as in a Matryoshka model), so distances have the spread
of real codes rather than of uniform random bits."""

from __future__ import annotations

import numpy as np
import torch

import embedops

from .core import Case, CheckFailed


def _codes(n: int, nbits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(nbits)) ** -0.5
    out = np.empty((n, nbits // 8), np.uint8)
    for r0 in range(0, n, 65536):  # bounded temporaries
        x = rng.standard_normal((min(65536, n - r0), nbits)).astype(np.float32) * scale
        x[:, : nbits // 4] += 0.3 * rng.standard_normal((x.shape[0], 1)).astype(np.float32)  # correlated head
        out[r0:r0 + x.shape[0]] = embedops.quantize_embeddings(x, "ubinary")
    return out


def _hamming_case(device: str, n: int, b: int, nbits: int, k: int = 10) -> Case:
    x = _codes(n, nbits, seed=nbits)
    q = _codes(b, nbits, seed=nbits + 1)
    xt, qt = torch.from_numpy(x).to(device), torch.from_numpy(q).to(device)
    baselines = {}
    if device == "cpu":
        import faiss

        index = faiss.IndexBinaryFlat(nbits)
        index.add(x)
        baselines["faiss IndexBinaryFlat"] = lambda: index.search(q, k)

    def check(ours, theirs):
        d = ours[0].cpu().numpy()
        if not np.array_equal(d, theirs[0].astype(np.int32)):  # indices of equal distances may differ
            raise CheckFailed("hamming_topk distances differ from faiss IndexBinaryFlat")

    return Case(
        name=f"hamming_topk {nbits} bits",
        shapes=f"B={b} N={n:,} k={k}",
        fn=lambda: embedops.hamming_topk(qt, xt, k),
        baselines=baselines,
        check=check,
        bytes=n * nbits / 8,
    )


def cases(device: str, quick: bool):
    n = 200_000 if quick else 1_000_000
    return [lambda b=b, nb=nb: _hamming_case(device, n, b, nb) for nb in (256, 512, 1024) for b in (1, 64)]
