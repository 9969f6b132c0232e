"""int8_topk, matryoshka_rescore and MatryoshkaIndex's codes (binary / int8), against float64 references."""

import numpy as np
import pytest
import torch

import embedops


def _dequant(codes, ranges, precision):
    r = ranges.double()
    step = ((ranges[1] - ranges[0]) / 255).double()  # float32 step, as quantisation
    off = 128 if precision == "int8" else 0
    return r[0] + (codes.double() + off + 0.5) * step


def _ref_scores(q, x, metric):
    s = q.double() @ x.T
    if metric == "cosine":
        s = s / q.double().norm(dim=1, keepdim=True) / x.norm(dim=1)
    return s


@pytest.mark.parametrize("precision", ["int8", "uint8"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
# B = 48 at dim 96: the micro kernel at avx2 / avx512, BLAS on dequantised tiles at the default level
@pytest.mark.parametrize("B", [1, 3, 7, 48])
@pytest.mark.parametrize("dim", [None, 40])
def test_int8_topk_matches_dequantised_reference(precision, metric, B, dim):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(3000, 96, generator=g)
    q = torch.randn(B, 96, generator=g)
    r = torch.stack([x.amin(0), x.amax(0)])
    c = embedops.quantize_embeddings(x, precision)
    v, i = embedops.int8_topk(q, c, 10, ranges=r, dim=dim, metric=metric)
    d = dim or 96
    ref = _ref_scores(q[:, :d], _dequant(c, r, precision)[:, :d], metric)
    rv, _ = ref.topk(10)
    torch.testing.assert_close(v.double(), rv, atol=1e-4, rtol=1e-5)
    # the returned ids carry the returned scores
    torch.testing.assert_close(ref.gather(1, i), v.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("B", [1, 2, 4, 5, 40])
def test_int8_topk_dot_over_blocks_and_given_norms(B):
    # the few-query path reads raw codes against queries scaled by the steps (the dot metric, or
    # cosine with the corpus norms given); over column blocks, several prefixes, odd widths. B = 5
    # and 40: dequantised tiles (B = 40 through BLAS at the default level)
    g = torch.Generator().manual_seed(10 + B)
    x = torch.randn(2500, 300, generator=g) * torch.linspace(2.0, 0.3, 300)
    q = torch.randn(B, 300, generator=g)
    r = torch.stack([x.amin(0), x.amax(0)])
    c = embedops.quantize_embeddings(x, "int8", ranges=r)
    blocks = [c[:, :37], c[:, 37:256], c[:, 256:]]
    dims = [20, 37, 100, 256, 300]
    deq = _dequant(c, r, "int8")
    v, i = torch.ops.embedops.int8_topk(q, blocks, r, 7, dims, "dot")
    for p, d in enumerate(dims):
        ref = _ref_scores(q[:, :d], deq[:, :d], "dot")
        torch.testing.assert_close(v[p].double(), ref.topk(7).values, atol=2e-4, rtol=1e-5)
        torch.testing.assert_close(ref.gather(1, i[p]), v[p].double(), atol=2e-4, rtol=1e-5)
    inv = torch.stack([1 / deq[:, :d].norm(dim=1) for d in dims]).float()
    v2, i2 = torch.ops.embedops.int8_topk(q, blocks, r, 7, dims, "cosine", inv)
    v3, i3 = torch.ops.embedops.int8_topk(q, blocks, r, 7, dims, "cosine")
    for p, d in enumerate(dims):
        ref = _ref_scores(q[:, :d], deq[:, :d], "cosine")
        torch.testing.assert_close(v2[p].double(), ref.topk(7).values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v3[p].double(), ref.topk(7).values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref.gather(1, i2[p]), v2[p].double(), atol=1e-5, rtol=1e-5)


def test_int8_topk_numpy_and_errors():
    x = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    c = embedops.quantize_embeddings(x, "int8")
    r = np.stack([x.min(0), x.max(0)])
    v, i = embedops.int8_topk(x[:2], c, 5, ranges=r)
    assert isinstance(v, np.ndarray) and v.shape == (2, 5) and i.dtype == np.int64
    with pytest.raises(ValueError, match="int8_topk: ranges= is required"):
        embedops.int8_topk(x[:2], c, 5, ranges=None)
    with pytest.raises(ValueError, match="int8_topk.*ranges must have shape"):
        embedops.int8_topk(x[:2], c, 5, ranges=r[:, :8])
    with pytest.raises(ValueError, match="int8_topk.*max >= min"):
        embedops.int8_topk(x[:2], c, 5, ranges=r[::-1].copy())
    with pytest.raises(TypeError, match="int8_topk.*int8 or uint8"):
        embedops.int8_topk(x[:2], x, 5, ranges=r)
    with pytest.raises(ValueError, match="int8_topk: k must be <="):
        embedops.int8_topk(x[:2], c, 101, ranges=r)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_rescore_codes_and_float(metric):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 64, generator=g)
    q = torch.randn(4, 64, generator=g)
    r = torch.stack([x.amin(0), x.amax(0)])
    c = embedops.quantize_embeddings(x, "int8", ranges=r)
    cand = torch.stack([torch.randperm(500, generator=g)[:50] for _ in range(4)])
    for blocks, ranges, xs in (([c], r, _dequant(c, r, "int8")), ([x[:, :20], x[:, 20:]], None, x.double())):
        v, i = torch.ops.embedops.matryoshka_rescore(q, blocks, cand, 5, 48, metric, ranges)
        ref = _ref_scores(q[:, :48], xs[:, :48], metric).gather(1, cand)
        rv, ro = ref.topk(5)
        torch.testing.assert_close(v.double(), rv, atol=1e-4, rtol=1e-5)
        assert torch.equal(i, cand.gather(1, ro))
    with pytest.raises(ValueError, match="matryoshka_rescore: candidates must be row ids"):
        torch.ops.embedops.matryoshka_rescore(q, [x], cand + 500, 5, 48, metric)


@pytest.fixture(scope="module")
def corpus():
    g = torch.Generator().manual_seed(2)
    scale = torch.linspace(2.0, 0.2, 128)  # Matryoshka-like: early dims carry more
    return torch.randn(2000, 128, generator=g) * scale, torch.randn(6, 128, generator=g) * scale


def test_index_codes_search_and_funnel(corpus):
    x, q = corpus
    index = embedops.MatryoshkaIndex(128, codes=("binary", "int8"))
    index.add(x[:1000])
    index.add(x[1000:])
    bits = embedops.quantize_embeddings(x, "ubinary")
    qbits = embedops.quantize_embeddings(q, "ubinary")
    d, i = index.search(q, 10, dim=64, precision="binary")
    rd, ri = embedops.hamming_topk(qbits, bits, 10, nbits=64)
    assert torch.equal(d, rd) and torch.equal(i, ri)
    r = index.ranges
    codes = embedops.quantize_embeddings(x, "int8", ranges=r)
    v, i = index.search(q, 10, dim=96, precision="int8")
    ref = _ref_scores(q[:, :96], _dequant(codes, r, "int8")[:, :96], "cosine")
    torch.testing.assert_close(v.double(), ref.topk(10).values, atol=1e-4, rtol=1e-5)
    # binary shortlist -> int8 rescoring -> float rerank, against the same steps in numpy/torch
    v, i = index.funnel_search(q, 5, stages=[("binary", 64, 200), ("int8", 128, 40), (128, 20)])
    _, short = embedops.hamming_topk(qbits, bits, 200, nbits=64)
    s8 = _ref_scores(q, _dequant(codes, r, "int8"), "cosine").gather(1, short)
    short = short.gather(1, s8.topk(40).indices)
    sf = _ref_scores(q, x.double(), "cosine").gather(1, short)
    top = sf.topk(5)
    torch.testing.assert_close(v.double(), top.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, short.gather(1, top.indices))
    assert v.shape == (6, 5)


def test_index_keep_float_false_memory_and_save_load(corpus, tmp_path):
    x, q = corpus
    full = embedops.MatryoshkaIndex(128, codes=("binary", "int8"))
    codes_only = embedops.MatryoshkaIndex(128, codes=("binary", "int8"), keep_float=False)
    for ix in (full, codes_only):
        ix.add(x)
    m = codes_only.memory()
    assert set(m) == {"binary", "int8", "ranges"} and m["binary"] == 2000 * 16 and m["int8"] == 2000 * 128
    assert codes_only.nbytes <= full.memory()["float"] / 3
    with pytest.raises(ValueError, match="keeps no float vectors"):
        codes_only.search(q, 5)
    with pytest.raises(ValueError, match="no float vectors"):
        codes_only.funnel_search(q, 5, stages=[("binary", 64, 100), (128, 10)])
    stages = [("binary", 128, 100), ("int8", 128, 10)]
    a = full.funnel_search(q, 10, stages=stages)
    b = codes_only.funnel_search(q, 10, stages=stages)
    assert torch.equal(a[1], b[1])
    for ix in (full, codes_only):
        p = tmp_path / "ix.emb"
        ix.save(p)
        back = embedops.MatryoshkaIndex.load(p)
        assert back.codes == ix.codes and back.keep_float == ix.keep_float and len(back) == len(ix)
        if "int8" in ix.codes:
            assert torch.equal(back._int8_rows(), ix._int8_rows())
        assert torch.equal(back._bit_rows(), ix._bit_rows())
        r1, r2 = ix.funnel_search(q, 10, stages=stages), back.funnel_search(q, 10, stages=stages)
        assert torch.equal(r1[1], r2[1])


@pytest.mark.parametrize("B", [1, 5, 8, 13])
def test_index_binary_head_short_prefixes(B, tmp_path):
    # codes of 256 bits and more keep a copy of their first 128 bits, which few queries (B < 8)
    # scan for a prefix of at most 128 bits; every prefix and query count gives hamming_topk's
    # result over the plain bit rows, through add() in parts, growth, save / load and the funnel
    g = torch.Generator().manual_seed(30 + B)
    x = torch.randn(3000, 300, generator=g) * torch.linspace(2.0, 0.3, 300)
    q = torch.randn(B, 300, generator=g)
    index = embedops.MatryoshkaIndex(300, dims=(64, 128, 300), codes=("binary", "int8"), keep_float=False)
    for s in range(0, 3000, 700):
        index.add(x[s:s + 700])
    assert index.memory()["binary_head"] == 3000 * 16 and index.memory()["binary"] == 3000 * 64
    bits, qbits = (embedops.quantize_embeddings(t, "ubinary") for t in (x, q))
    back = tmp_path / "ix.emb"
    index.save(back)
    loaded = embedops.MatryoshkaIndex.load(back)
    assert torch.equal(loaded._head[: len(loaded)], index._head[: len(index)])
    for nbits in (1, 64, 100, 128, 129, 256, 300):
        rd, ri = embedops.hamming_topk(qbits, bits, 37, nbits=nbits)
        for ix in (index, loaded):
            d, i = ix.search(q, 37, dim=nbits, precision="binary")
            assert torch.equal(d, rd) and torch.equal(i, ri), nbits
    r = index.ranges
    deq = _dequant(embedops.quantize_embeddings(x, "int8", ranges=r), r, "int8")
    v, i = index.funnel_search(q, 5, stages=[("binary", 128, 150), ("int8", 300, 20)])
    _, short = embedops.hamming_topk(qbits, bits, 150, nbits=128)
    s8 = _ref_scores(q, deq, "cosine").gather(1, short)
    top = s8.topk(5)
    torch.testing.assert_close(v.double(), top.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, short.gather(1, top.indices))
    narrow = embedops.MatryoshkaIndex(128, codes=("binary",))  # 16-byte codes: one piece, no head
    narrow.add(x[:100, :128])
    assert "binary_head" not in narrow.memory()


def test_index_code_args():
    with pytest.raises(ValueError, match="codes must be any of"):
        embedops.MatryoshkaIndex(16, codes=("pq",))
    with pytest.raises(ValueError, match="keep_float=False"):
        embedops.MatryoshkaIndex(16, keep_float=False)
    ix = embedops.MatryoshkaIndex(16, codes=("binary",))
    ix.add(torch.randn(50, 16))
    with pytest.raises(ValueError, match="needs int8 codes"):
        ix.search(torch.randn(2, 16), 5, precision="int8")
    with pytest.raises(ValueError, match="binary stage can only be the first"):
        ix.funnel_search(torch.randn(2, 16), 5, stages=[(16, 20), ("binary", 16, 10)])
    with pytest.raises(ValueError, match="k must be in"):
        ix.funnel_search(torch.randn(2, 16), 11, stages=[("binary", 16, 10)])
    one = embedops.MatryoshkaIndex(16, codes=("int8",))
    with pytest.raises(ValueError, match="single embedding"):
        one.add(torch.randn(1, 16))
