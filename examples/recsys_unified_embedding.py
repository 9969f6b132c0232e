"""A DLRM-style click model whose 26 sparse features share ONE hashed table (Unified Embedding,
`embedops.nn.UnifiedEmbedding`: several probes per feature, fused row-wise Adagrad in the backward),
trained on a synthetic Criteo-like stream, against the same model with one `nn.EmbeddingBag` per
feature under the same parameter budget.

The stream: 13 dense features and 26 categorical ones (vocabularies from 10 to 10^6 ids, Zipf(1.15)
popularity, raw 64-bit ids, the last 6 features multi-hot bags of 1-5 ids); the click label comes
from a hidden logistic model over the ids' effects (popular ids carry signal, the tail is noise)
plus one feature interaction.

    python examples/recsys_unified_embedding.py --quick    # 300 steps, a few seconds
    python examples/recsys_unified_embedding.py            # 1000 steps of batch 1024

Prints the training loss of both models as it goes, held-out log loss and AUC, and step times.
Exits with status 1 if a model's loss does not decrease.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import nn

import embedops
from embedops.nn import UnifiedEmbedding

N_DENSE, N_SPARSE, MULTI_HOT = 13, 26, 6
VOCABS = np.logspace(1, 6, N_SPARSE).astype(np.int64)  # 10 ... 10^6 ids per feature
NAMES = [f"C{i + 1}" for i in range(N_SPARSE)]


class CriteoLikeStream:
    """Batches of (dense (B, 13), flat values, feature-major offsets (26*B + 1,), labels (B,))."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        truth = np.random.default_rng(1234)  # the hidden model, the same for every run
        self.salt = truth.integers(1, 2**62, N_SPARSE)
        # effect of the r-th most popular id of feature f (ids past 5000 carry no signal)
        self.effect = [truth.normal(0, 0.6, min(int(v), 5000)) for v in VOCABS]
        self.w_dense = truth.normal(0, 0.3, N_DENSE)
        self.bias = -1.0

    def batch(self, B: int):
        rng = self.rng
        dense = np.log1p(rng.lognormal(0.0, 1.0, (B, N_DENSE)))
        logit = self.bias + (dense - dense.mean(0)) @ self.w_dense
        values, lengths = [], []
        first_ranks = []
        for f, vocab in enumerate(VOCABS):
            L = rng.integers(1, 6, B) if f >= N_SPARSE - MULTI_HOT else np.ones(B, np.int64)
            rank = (rng.zipf(1.15, int(L.sum())) - 1) % vocab  # popularity rank of each id
            eff = np.where(rank < len(self.effect[f]), self.effect[f][np.minimum(rank, len(self.effect[f]) - 1)], 0.0)
            logit += np.add.reduceat(eff, np.r_[0, np.cumsum(L)[:-1]]) / np.sqrt(L)
            first_ranks.append(rank[np.r_[0, np.cumsum(L)[:-1]]])
            # raw ids: a bijective scramble of the rank into int64 (what a log would contain)
            mixed = rank.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(self.salt[f])
            values.append(mixed.view(np.int64))
            lengths.append(L)
        logit += 0.8 * np.sign(np.sin(first_ranks[3] * 1.7)) * np.sign(np.cos(first_ranks[7] * 0.9))  # interaction
        label = rng.random(B) < 1 / (1 + np.exp(-logit))
        lengths = np.concatenate(lengths)
        offsets = np.r_[0, np.cumsum(lengths)]
        return (torch.from_numpy(dense).float(), torch.from_numpy(np.concatenate(values)),
                torch.from_numpy(offsets), torch.from_numpy(label).float())


class UnifiedSparse(nn.Module):
    """All 26 features in one UnifiedEmbedding table: large features 2 probes, small ones 1."""

    def __init__(self, rows: int, dim: int, lr: float):
        super().__init__()
        probes = {n: (2 if v > 10_000 else 1) for n, v in zip(NAMES, VOCABS)}
        self.emb = UnifiedEmbedding(rows, dim, probes, combine="sum", mode="sum", optimizer="rowwise_adagrad",
                                    lr=lr, seed=7)

    def forward(self, values, offsets):
        return self.emb((values, offsets))  # flat feature-major (values, offsets): no per-feature Python

    def num_params(self):
        return self.emb.weight.numel()


class PerFeatureBags(nn.Module):
    """One nn.EmbeddingBag per feature, the same total rows: small vocabularies get exactly their
    size, the rest is shared equally (ids hashed into a feature's table by remainder)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        sizes = np.zeros(N_SPARSE, np.int64)
        left, todo = rows, list(range(N_SPARSE))
        while todo:  # water-filling: a feature never gets more rows than ids
            share = left // len(todo)
            small = [f for f in todo if VOCABS[f] <= share]
            if not small:
                for f in todo:
                    sizes[f] = share
                sizes[todo[-1]] += left - share * len(todo)
                break
            for f in small:
                sizes[f] = VOCABS[f]
                left -= int(VOCABS[f])
                todo.remove(f)
        self.sizes = sizes.tolist()
        self.bags = nn.ModuleList(nn.EmbeddingBag(s, dim, mode="sum", sparse=True) for s in self.sizes)
        for b in self.bags:
            nn.init.uniform_(b.weight, -1 / math.sqrt(dim), 1 / math.sqrt(dim))

    def forward(self, values, offsets):
        B = (offsets.numel() - 1) // N_SPARSE
        out = []
        for f, bag in enumerate(self.bags):
            o = offsets[f * B: (f + 1) * B + 1]
            v = values[o[0]: o[-1]]
            out.append(bag(torch.remainder(v, self.sizes[f]), o[:-1] - o[0]))
        return torch.cat(out, dim=1)

    def num_params(self):
        return sum(b.weight.numel() for b in self.bags)


class DLRM(nn.Module):
    """bottom MLP(dense) -> D; pairwise dot interactions of the 27 vectors + bottom output -> top MLP."""

    def __init__(self, sparse: nn.Module, dim: int):
        super().__init__()
        self.sparse = sparse
        self.bottom = nn.Sequential(nn.Linear(N_DENSE, 64), nn.ReLU(), nn.Linear(64, dim), nn.ReLU())
        n = N_SPARSE + 1
        self.iu = torch.triu_indices(n, n, 1)
        self.top = nn.Sequential(nn.Linear(dim + n * (n - 1) // 2, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, dense, values, offsets):
        x = self.bottom(dense)
        e = self.sparse(values, offsets).view(dense.shape[0], N_SPARSE, -1)
        z = torch.cat([x[:, None], e], dim=1)
        inter = (z @ z.transpose(1, 2))[:, self.iu[0], self.iu[1]]
        return self.top(torch.cat([x, inter], dim=1)).squeeze(1)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels > 0.5
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 steps of batch 256 (CI)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    steps = args.steps or (300 if args.quick else 1000)
    B, rows, dim, lr = (256 if args.quick else 1024), 2**16, 16, 0.05
    torch.manual_seed(args.seed)
    torch.sparse.check_sparse_tensor_invariants.disable()  # explicit (torch warns when it is implicit)
    print(f"embedops {embedops.__version__}: {steps} steps, batch {B}, {N_SPARSE} sparse features "
          f"(vocab 10..1e6, Zipf 1.15, {MULTI_HOT} multi-hot), table budget {rows} rows x {dim}")

    ue = DLRM(UnifiedSparse(rows, dim, lr), dim)
    torch.manual_seed(args.seed)
    eb = DLRM(PerFeatureBags(rows, dim), dim)
    print(f"  UnifiedEmbedding: one {rows} x {dim} table ({ue.sparse.num_params():,} params), probes "
          f"{ue.sparse.emb.num_probes}, fused row-wise Adagrad")
    print(f"  nn.EmbeddingBag:  26 tables of {min(eb.sparse.sizes)}..{max(eb.sparse.sizes)} rows "
          f"({eb.sparse.num_params():,} params), sparse grads + torch Adagrad")
    dense_params = lambda m: [p for n, p in m.named_parameters() if not n.startswith("sparse.")]
    opt_ue = torch.optim.Adagrad(dense_params(ue), lr=lr)  # the table updates itself in the backward
    opt_eb_dense = torch.optim.Adagrad(dense_params(eb), lr=lr)
    opt_eb_sparse = torch.optim.Adagrad(list(eb.sparse.parameters()), lr=lr)  # supports sparse gradients
    loss_fn = nn.BCEWithLogitsLoss()

    stream = CriteoLikeStream(args.seed)
    held_out = [stream.batch(4096) for _ in range(2)]
    hist = {"ue": [], "eb": []}
    times = {"ue": 0.0, "eb": 0.0}
    every = max(steps // 10, 1)
    print(f"\n{'step':>6}{'UnifiedEmbedding':>18}{'EmbeddingBag':>14}   (mean train loss over the last {every} steps)")
    for step in range(1, steps + 1):
        dense, values, offsets, y = stream.batch(B)
        for name, model, opts in (("ue", ue, [opt_ue]), ("eb", eb, [opt_eb_dense, opt_eb_sparse])):
            t = time.perf_counter()
            loss = loss_fn(model(dense, values, offsets), y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            times[name] += time.perf_counter() - t
            hist[name].append(loss.item())
        if step % every == 0:
            print(f"{step:>6}{np.mean(hist['ue'][-every:]):>18.4f}{np.mean(hist['eb'][-every:]):>14.4f}")

    failures = []
    print(f"\n{'':<20}{'held-out logloss':>18}{'AUC':>8}{'ms/step':>10}")
    with torch.no_grad():
        for name, model in (("UnifiedEmbedding", ue), ("EmbeddingBag", eb)):
            scores, labels = [], []
            for dense, values, offsets, y in held_out:
                scores.append(model(dense, values, offsets))
                labels.append(y)
            s, yy = torch.cat(scores), torch.cat(labels)
            ll = loss_fn(s, yy).item()
            key = "ue" if name == "UnifiedEmbedding" else "eb"
            print(f"{name:<20}{ll:>18.4f}{auc(s.numpy(), yy.numpy()):>8.4f}{1e3 * times[key] / steps:>10.2f}")
            h = hist[key]
            n = max(len(h) // 10, 1)
            first, last = np.mean(h[:n]), np.mean(h[-n:])
            if not (np.isfinite(last) and last < first - 0.01):
                failures.append(f"{name}: train loss did not decrease ({first:.4f} -> {last:.4f})")
    base = -(lambda p: p * math.log(p) + (1 - p) * math.log(1 - p))(torch.cat([y for *_, y in held_out]).mean().item())
    print(f"(a constant predictor's log loss: {base:.4f})")
    for f in failures:
        print(f"FAIL: {f}")
    print("all checks passed" if not failures else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
