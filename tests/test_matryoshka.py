"""matryoshka family: prefix similarity, fused top-k, funnel retrieval and MatryoshkaIndex,
against the float64 reference (embedops.reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedops
from embedops import reference

from conftest import FLOAT_DTYPES, TOL, opcheck, seeded

ALL_DTYPES = FLOAT_DTYPES + [torch.float64]
METRICS = ["cosine", "dot"]


def make(B, N, D, dtype=torch.float32, device="cpu", seed=0, zero_rows=True):
    g = seeded(seed)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    if zero_rows and N > 3:
        x[1] = 0  # zero at every prefix
        x[2, : D // 2] = 0  # zero at the small prefixes only
    if zero_rows and B > 2:
        q[1, :3] = 0
    return q.to(dtype).to(device), x.to(dtype).to(device)


def ref_tol(dtype, metric, D):
    t = dict(TOL[dtype])
    if metric == "dot":  # raw dot products grow like sqrt(D)
        t = {k: v * max(1.0, D**0.5) for k, v in t.items()}
    return t


def check_topk(values, indices, q, x, k, dims, metric):
    """values/indices are a valid top-k: sorted, the reference score of every chosen row equals
    the returned value, and the values equal the reference's k best (ties/rounding tolerated)."""
    dtype = q.dtype
    ref = reference.matryoshka_similarity(q.cpu(), x.cpu(), dims, metric=metric).numpy()
    rv, _ = reference.topk_order(ref, k)
    v, i = values.cpu().double().numpy(), indices.cpu().numpy()
    assert i.dtype == np.int64 and v.shape == i.shape == (len(dims), q.shape[0], k)
    tol = ref_tol(dtype, metric, dims[-1])
    # the returned scores are the scores of the returned rows
    np.testing.assert_allclose(np.take_along_axis(ref, i, axis=-1), v, **tol)
    # and they are the best k (equal to the reference's k best values)
    np.testing.assert_allclose(v, rv, **tol)
    # no duplicates, sorted best first
    for row in i.reshape(-1, k):
        assert len(set(row.tolist())) == k
    assert np.all(np.diff(v, axis=-1) <= tol["atol"] + 1e-12)


# ---- similarity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_similarity_matches_reference(device, dtype, metric):
    q, x = make(5, 1100, 45, dtype, device)
    dims = [1, 7, 16, 45]
    out = embedops.matryoshka_similarity(q, x, dims, metric=metric)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (4, 5, 1100) and out.device == q.device
    want = reference.matryoshka_similarity(q.cpu(), x.cpu(), dims, metric=metric)
    torch.testing.assert_close(out.cpu().double(), want, **ref_tol(dtype, metric, 45))
    if metric == "cosine":  # zero prefixes score exactly 0
        assert torch.all(out[:, :, 1] == 0)
        assert torch.all(out[:2, :, 2] == 0)
        assert torch.all(out[0, 1, :] == 0)


@pytest.mark.parametrize("B,N,D,dims", [(1, 1, 1, [1]), (1, 7, 13, [3, 13]), (70, 301, 9, [2, 3, 8]), (29, 600, 50, [1, 17, 33, 50]),
                                       (3, 5000, 24, [24]), (40, 700, 120, [8, 64, 120])])
def test_similarity_odd_sizes(device, B, N, D, dims):
    q, x = make(B, N, D, torch.float32, device)
    for metric in METRICS:
        out = embedops.matryoshka_similarity(q, x, dims, metric=metric)
        want = reference.matryoshka_similarity(q.cpu(), x.cpu(), dims, metric=metric)
        torch.testing.assert_close(out.cpu().double(), want, **ref_tol(torch.float32, metric, D))


def test_similarity_strided_inputs(device):
    q, x = make(6, 500, 40, torch.float32, device)
    wide = torch.cat([x, x[:, :7]], dim=1)[:, :40]  # row stride 47
    qt = q.T.contiguous().T  # column-major queries
    assert not wide.is_contiguous() and not qt.is_contiguous()
    out = embedops.matryoshka_similarity(qt, wide, [8, 40])
    torch.testing.assert_close(out, embedops.matryoshka_similarity(q, x, [8, 40]))
    xs = x[::2]  # non-unit row stride... and a column slice
    torch.testing.assert_close(embedops.matryoshka_similarity(q, xs, [8, 40]),
                               embedops.matryoshka_similarity(q, xs.contiguous(), [8, 40]))


def test_similarity_empty(device):
    q, x = make(3, 0, 8, torch.float32, device)
    assert embedops.matryoshka_similarity(q, x, [4, 8]).shape == (2, 3, 0)
    assert embedops.matryoshka_similarity(q[:0], torch.randn(5, 8, device=device), [4]).shape == (1, 0, 5)


def test_similarity_gradcheck():
    q, x = make(3, 6, 7, torch.float64, zero_rows=False)
    q.requires_grad_(True)
    x.requires_grad_(True)
    for metric in METRICS:
        assert torch.autograd.gradcheck(lambda a, b: embedops.matryoshka_similarity(a, b, [2, 5, 7], metric=metric),
                                        (q, x))


def test_similarity_grad_matches_reference(device):
    q, x = make(4, 30, 12, torch.float32, device, zero_rows=False)
    for metric in METRICS:
        a, b = q.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (embedops.matryoshka_similarity(a, b, [3, 12], metric=metric) * torch.arange(2.0, device=device)[:, None, None]).sum().backward()
        a2, b2 = q.cpu().double().requires_grad_(True), x.cpu().double().requires_grad_(True)
        nrm = torch.nn.functional.normalize
        out = torch.stack([nrm(a2[:, :d], dim=1) @ nrm(b2[:, :d], dim=1).T if metric == "cosine"
                           else a2[:, :d] @ b2[:, :d].T for d in [3, 12]])
        (out * torch.arange(2.0)[:, None, None]).sum().backward()
        ga, gb = a2.grad, b2.grad
        torch.testing.assert_close(a.grad.cpu().double(), ga, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.grad.cpu().double(), gb, atol=1e-4, rtol=1e-4)


# ---- top-k ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B", [1, 3, 9])
def test_topk_matches_reference(device, dtype, metric, B):
    q, x = make(B, 5003, 37, dtype, device, seed=B)
    dims = [5, 16, 37]
    v, i = embedops.matryoshka_topk(q, x, 17, dims, metric=metric)
    assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and i.device == q.device
    check_topk(v, i, q, x, 17, dims, metric)
    if dtype in (torch.float32, torch.float64):  # exact order against the reference
        _, ri = reference.matryoshka_topk(q.cpu(), x.cpu(), 17, dims, metric=metric)
        np.testing.assert_array_equal(i.cpu().numpy(), ri)


@pytest.mark.parametrize("B,N,D,k,dims", [(1, 1, 1, 1, [1]), (2, 5, 13, 5, [4, 13]), (5, 10, 8, 10, [8]),
                                          (12, 4097, 9, 1, [2, 9]), (1, 4097, 9, 300, [9]), (6, 3, 3, 0, [3]),
                                          (29, 1000, 50, 7, [3, 17, 50]), (40, 3000, 120, 9, [8, 64, 120])])
def test_topk_odd_sizes(device, B, N, D, k, dims):
    q, x = make(B, N, D, torch.float32, device)
    for metric in METRICS:
        v, i = embedops.matryoshka_topk(q, x, k, dims, metric=metric)
        if k:
            check_topk(v, i, q, x, k, dims, metric)
        else:
            assert v.shape == i.shape == (len(dims), B, 0)


# B = 40, D = 128: at the default level past mat::use_prefix_micro (the BLAS path)
@pytest.mark.parametrize("B,D", [(1, 16), (8, 16), (40, 128)])
def test_topk_ties_go_to_lower_index(device, B, D):
    g = seeded(3)
    base = torch.randn(40, D, generator=g)
    x = base.repeat(30, 1).to(device)  # every score appears 30 times
    q = torch.randn(B, D, generator=g).to(device)
    for metric in METRICS:
        v, i = embedops.matryoshka_topk(q, x, 64, [4, D], metric=metric)
        _, ri = reference.matryoshka_topk(q.cpu(), x.cpu(), 64, [4, D], metric=metric)
        # exact duplicates have bit-identical scores, so the order is the reference's exactly
        np.testing.assert_array_equal(i.cpu().numpy(), ri)
    z = torch.zeros(50, D, device=device)  # all scores 0: indices 0..k-1
    v, i = embedops.matryoshka_topk(q, z, 7, [D])
    assert torch.equal(i.cpu(), torch.arange(7).expand(1, B, 7)) and torch.all(v == 0)


def test_topk_deterministic_across_threads():
    q, x = make(6, 20000, 24)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = embedops.matryoshka_topk(q, x, 50, [8, 24])
        torch.set_num_threads(max(2, old))
        two = embedops.matryoshka_topk(q, x, 50, [8, 24])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_topk_nan_and_inf(device):
    """NaN scores never outrank a number: they sort last (by index); inf scores rank first."""
    q, x = make(2, 60, 8, torch.float32, device, zero_rows=False)
    x[5, 2] = float("nan")
    x[7, 0] = float("inf")
    x[9, 6] = float("nan")
    sim = embedops.matryoshka_similarity(q, x, [4, 8])
    # cosine: a non-finite prefix gives NaN; the nan at column 6 only affects prefix 8
    assert torch.isnan(sim[:, :, 7]).all() and torch.isnan(sim[1, :, 5]).all() and torch.isnan(sim[1, :, 9]).all()
    assert not torch.isnan(sim[0, :, 9]).any() and torch.isnan(sim[0, :, 5]).all()
    v, i = embedops.matryoshka_topk(q, x, 60, [4, 8])
    check = reference.topk_order(reference.matryoshka_similarity(q.cpu(), x.cpu(), [4, 8]).numpy(), 60)
    np.testing.assert_array_equal(i.cpu().numpy(), check[1])
    assert torch.equal(i[1, :, -3:].cpu(), torch.tensor([[5, 7, 9]] * 2))  # NaN last, by index
    v10, _ = embedops.matryoshka_topk(q, x, 10, [4, 8])
    assert not torch.isnan(v10).any()
    # dot: +inf scores rank first, NaN last
    xd = torch.zeros(6, 2, device=device)
    xd[1, 0], xd[3, 0], xd[4, 0] = float("inf"), float("nan"), 1.0
    v, i = embedops.matryoshka_topk(torch.ones(1, 2, device=device), xd, 6, [2], metric="dot")
    assert i[0, 0].tolist() == [1, 4, 0, 2, 5, 3]


def test_topk_precomputed_norms_match(device):
    q, x = make(7, 3000, 32, torch.float32, device)
    dims = [8, 32]
    inv = embedops.matryoshka_inv_norms(x, dims)
    want = torch.stack([reference._mat_inv_norm(x.cpu().double(), d) for d in dims])
    torch.testing.assert_close(inv.cpu().double(), want, atol=1e-6, rtol=1e-6)
    a = embedops.matryoshka_topk(q, x, 9, dims, corpus_inv_norms=inv)
    b = embedops.matryoshka_topk(q, x, 9, dims)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_numpy_round_trip():
    q, x = make(4, 300, 16)
    qn, xn = q.numpy(), x.numpy()
    s = embedops.matryoshka_similarity(qn, xn, [4, 16])
    assert isinstance(s, np.ndarray) and s.dtype == np.float32
    v, i = embedops.matryoshka_topk(qn, xn, 5, [4, 16])
    assert isinstance(v, np.ndarray) and isinstance(i, np.ndarray) and i.dtype == np.int64
    tv, ti = embedops.matryoshka_topk(q, x, 5, [4, 16])
    np.testing.assert_array_equal(i, ti.numpy())
    fv, fi = embedops.matryoshka_funnel(qn, xn, 3, [(4, 50)])
    assert isinstance(fi, np.ndarray) and fi.shape == (4, 3)


# ---- funnel --------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_funnel_matches_reference(device, dtype, metric):
    q, x = make(6, 2500, 40, dtype, device)
    v, i = embedops.matryoshka_funnel(q, x, 5, [(8, 200), (20, 40)], metric=metric)
    assert v.shape == i.shape == (6, 5)
    rv, ri = reference.matryoshka_funnel(q.cpu(), x.cpu(), [8, 20, 40], [200, 40, 5], metric=metric)
    tol = ref_tol(dtype, metric, 40)
    if dtype != torch.bfloat16:
        np.testing.assert_array_equal(i.cpu().numpy(), ri)
    ref_full = reference.matryoshka_similarity(q.cpu(), x.cpu(), [40], metric=metric)[0].numpy()
    np.testing.assert_allclose(np.take_along_axis(ref_full, i.cpu().numpy(), 1), v.cpu().double().numpy(), **tol)
    np.testing.assert_allclose(v.cpu().double().numpy(), rv, **tol)


def test_funnel_full_shortlist_is_exact(device):
    """A first stage that keeps every row reranks everything: the funnel equals exact search."""
    q, x = make(3, 300, 24, torch.float64, device)
    v, i = embedops.matryoshka_funnel(q, x, 10, [(4, 300), (12, 300)])
    ev, ei = embedops.matryoshka_topk(q, x, 10, [24])
    assert torch.equal(i, ei[0])
    torch.testing.assert_close(v, ev[0])


def test_funnel_bad_stages():
    q, x = make(2, 100, 16)
    with pytest.raises(ValueError, match="non-increasing"):
        embedops.matryoshka_funnel(q, x, 5, [(4, 10), (8, 20)])
    with pytest.raises(ValueError, match="non-increasing"):
        embedops.matryoshka_funnel(q, x, 50, [(4, 10)])
    with pytest.raises(ValueError, match="more than the corpus"):
        embedops.matryoshka_funnel(q, x, 5, [(4, 101)])
    with pytest.raises(ValueError, match="strictly ascending"):
        embedops.matryoshka_funnel(q, x, 5, [(8, 50), (4, 10)])
    with pytest.raises(ValueError, match="strictly ascending"):
        embedops.matryoshka_funnel(q, x, 5, [(16, 50)])
    with pytest.raises(TypeError, match="stages"):
        embedops.matryoshka_funnel(q, x, 5, [4, 10])
    with pytest.raises(ValueError, match="ks must be non-increasing"):
        torch.ops.embedops.matryoshka_funnel(q, x, [4, 16], [10, 20])


# ---- errors --------------------------------------------------------------------------------------


def test_bad_inputs():
    q, x = make(2, 10, 8)
    for op in (lambda d: embedops.matryoshka_similarity(q, x, d), lambda d: embedops.matryoshka_topk(q, x, 3, d)):
        with pytest.raises(ValueError, match="strictly ascending"):
            op([4, 4])
        with pytest.raises(ValueError, match=r"in \[1, D=8\]"):
            op([4, 9])
        with pytest.raises(ValueError, match=r"in \[1, D=8\]"):
            op([0, 4])
        with pytest.raises(ValueError, match="non-empty"):
            op([])
    with pytest.raises(ValueError, match="k must be in"):
        embedops.matryoshka_topk(q, x, 11, [8])
    with pytest.raises(ValueError, match="k must be <= the number of corpus rows N=10, got k=11"):
        torch.ops.embedops.matryoshka_topk(q, x, 11, [8])
    with pytest.raises(ValueError, match="dims must be strictly ascending"):
        torch.ops.embedops.matryoshka_similarity(q, x, [5, 2])
    with pytest.raises(ValueError, match="metric"):
        embedops.matryoshka_similarity(q, x, [8], metric="l2")
    with pytest.raises(ValueError, match="metric"):
        torch.ops.embedops.matryoshka_similarity(q, x, [8], "l2")
    with pytest.raises(TypeError, match="corpus must have the dtype of queries"):
        torch.ops.embedops.matryoshka_similarity(q, x.double(), [8])
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        torch.ops.embedops.matryoshka_topk(q.long(), x.long(), 2, [8])
    with pytest.raises(ValueError, match="queries must have 2 dims"):
        embedops.matryoshka_similarity(q[0], x, [8])
    with pytest.raises(ValueError, match=r"corpus.size\(1\) must equal"):
        torch.ops.embedops.matryoshka_similarity(q, x[:, :7], [4])
    with pytest.raises(TypeError, match="corpus_inv_norms must have dtype"):
        torch.ops.embedops.matryoshka_topk(q, x, 2, [8], "cosine", torch.zeros(1, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="corpus_inv_norms must have shape"):
        torch.ops.embedops.matryoshka_topk(q, x, 2, [8], "cosine", torch.zeros(2, 10))
    with pytest.raises(TypeError, match="must be a torch.Tensor or a numpy.ndarray"):
        embedops.matryoshka_topk([[1.0]], x, 1, [1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not embedops.build_info()["cuda"], reason="needs a GPU")
def test_device_mismatch_cuda():
    q, x = make(2, 10, 8)
    with pytest.raises(ValueError, match="must be on the device of queries"):
        torch.ops.embedops.matryoshka_topk(q.cuda(), x, 2, [8])


# ---- opcheck / compile ---------------------------------------------------------------------------


def test_opcheck(device):
    q, x = make(3, 40, 10, torch.float32, device)
    opcheck(torch.ops.embedops.matryoshka_similarity.default, (q, x, [3, 10]), {"metric": "cosine"})
    opcheck(torch.ops.embedops.matryoshka_similarity.default, (q.double().requires_grad_(), x.double(), [4], "dot"))
    opcheck(torch.ops.embedops.matryoshka_topk.default, (q, x, 5, [3, 10], "cosine", None))
    inv = embedops.matryoshka_inv_norms(x, [3, 10])
    opcheck(torch.ops.embedops.matryoshka_topk.default, (q, x, 5, [3, 10], "cosine", inv))
    opcheck(torch.ops.embedops.matryoshka_funnel.default, (q, x, [3, 6, 10], [20, 10, 4], "dot", None))
    opcheck(torch.ops.embedops.matryoshka_inv_norms.default, (x, [2, 10]))


def test_torch_compile_fullgraph(device):
    q, x = make(4, 64, 16, torch.float32, device)

    def f(q, x):
        s = torch.ops.embedops.matryoshka_similarity(q, x, [4, 16], "cosine")
        v, i = torch.ops.embedops.matryoshka_topk(q, x, 3, [4, 16], "cosine", None)
        fv, fi = torch.ops.embedops.matryoshka_funnel(q, x, [4, 16], [20, 3], "cosine", None)
        return s.sum(0), v * 2, i, fv, fi

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, x)
    want = f(q, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- MatryoshkaIndex -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_search(device, dtype):
    q, x = make(5, 2100, 48, torch.float32, device)
    index = embedops.MatryoshkaIndex(48, dims=[8, 16], dtype=dtype, device=device)
    assert index.dims == [8, 16, 48] and len(index) == 0
    index.add(x[:1000])
    index.add(x[1000:])
    assert len(index) == 2100
    xs = x.to(dtype)
    for dim in (None, 16, 20):  # 20: not a stored prefix, norms computed on the fly
        v, i = index.search(q, 7, dim=dim)
        d = 48 if dim is None else dim
        ev, ei = embedops.matryoshka_topk(q.to(dtype), xs, 7, [d])
        assert torch.equal(i, ei[0])
        torch.testing.assert_close(v, ev[0])
    v, i = index.search(q, 4, dim=[8, 48])
    assert v.shape == (2, 5, 4)
    fv, fi = index.funnel_search(q, 5, stages=[(8, 300), (16, 60)])
    ev, ei = embedops.matryoshka_funnel(q.to(dtype), xs, 5, [(8, 300), (16, 60)])
    assert torch.equal(fi, ei)
    with pytest.raises(ValueError, match="k must be in"):
        index.search(q, 2101)
    with pytest.raises(ValueError, match="queries must have shape"):
        index.search(q[:, :10], 3)


def test_index_numpy_and_dot():
    q, x = make(3, 500, 24)
    index = embedops.MatryoshkaIndex(24, metric="dot")
    assert index.dims == [16, 24]
    index.add(x.numpy())
    v, i = index.search(q.numpy(), 6, dim=16)
    assert isinstance(v, np.ndarray) and i.shape == (3, 6)
    _, ri = reference.matryoshka_topk(q, x, 6, [16], metric="dot")
    np.testing.assert_array_equal(i, ri[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_index_save_load_round_trip(tmp_path, dtype):
    q, x = make(3, 777, 20)
    index = embedops.MatryoshkaIndex(20, dims=[4, 10], metric="dot", dtype=dtype)
    index.add(x)
    path = tmp_path / "ix.emb"
    index.save(path)
    back = embedops.MatryoshkaIndex.load(path)
    assert (back.dim, back.dims, back.metric, back.dtype, len(back)) == (20, [4, 10, 20], "dot", dtype, 777)
    assert torch.equal(back.vectors, index.vectors)
    assert torch.equal(back.search(q, 5)[1], index.search(q, 5)[1])
    empty = embedops.MatryoshkaIndex(5)
    empty.save(path)
    assert len(embedops.MatryoshkaIndex.load(path)) == 0


def test_index_load_rejects_bad_files(tmp_path):
    index = embedops.MatryoshkaIndex(8, dims=[4])
    index.add(torch.randn(50, 8))
    good = tmp_path / "good.emb"
    index.save(good)
    data = good.read_bytes()
    cases = {
        "magic": (b"NOTANIDX" + data[8:], "bad magic"),
        "version": (data[:8] + (3).to_bytes(4, "little") + data[12:], "version 3 is not supported"),
        "flags": (data[:30] + b"\x08" + data[31:], "corrupt header"),
        "truncated": (data[:-5], "size mismatch"),
        "extra": (data + b"\0", "size mismatch"),
        "payload": (data[:-1] + bytes([data[-1] ^ 0xFF]), "checksum mismatch"),
        "dims": (data[:36] + (9).to_bytes(4, "little") + data[40:], "corrupt header"),
        "dtype": (data[:29] + b"\x07" + data[30:], "corrupt header"),
        "short": (data[:10], "bad magic"),
    }
    for name, (blob, msg) in cases.items():
        p = tmp_path / f"{name}.emb"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match=msg):
            embedops.MatryoshkaIndex.load(p)


def test_index_bad_args():
    with pytest.raises(ValueError, match="dim must be >= 1"):
        embedops.MatryoshkaIndex(0)
    with pytest.raises(ValueError, match="strictly ascending"):
        embedops.MatryoshkaIndex(16, dims=[8, 4])
    with pytest.raises(ValueError, match="metric"):
        embedops.MatryoshkaIndex(16, metric="l2")
    with pytest.raises(TypeError, match="dtype"):
        embedops.MatryoshkaIndex(16, dtype=torch.int32)
    index = embedops.MatryoshkaIndex(16)
    with pytest.raises(ValueError, match="vectors must have shape"):
        index.add(torch.randn(3, 15))


# ---- column blocks (MatryoshkaIndex's segment-major storage) --------------------------------------


def _blocks(x, bounds):
    return [x[:, a:e].contiguous() for a, e in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B", [1, 6])
def test_blocks_ops_match_plain_ops(dtype, B):
    q, x = make(B, 3000, 40, dtype)
    bl = _blocks(x, [0, 8, 20, 40])
    for metric in METRICS:
        for dims in ([5, 8, 30, 40], [20], [9, 21]):  # prefixes inside, on and across block bounds
            a = torch.ops.embedops.matryoshka_topk_blocks(q, bl, 10, dims, metric)
            b = torch.ops.embedops.matryoshka_topk(q, x, 10, dims, metric)
            assert torch.equal(a[1], b[1])
            torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        a = torch.ops.embedops.matryoshka_funnel_blocks(q, bl, [5, 10, 40], [100, 20, 5], metric)
        b = torch.ops.embedops.matryoshka_funnel(q, x, [5, 10, 40], [100, 20, 5], metric)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


def test_blocks_ops_opcheck_and_errors():
    q, x = make(3, 50, 12)
    bl = _blocks(x, [0, 4, 12])
    inv = embedops.matryoshka_inv_norms(x, [4, 12])
    opcheck(torch.ops.embedops.matryoshka_topk_blocks.default, (q, bl, 5, [4, 12], "cosine", inv))
    opcheck(torch.ops.embedops.matryoshka_funnel_blocks.default, (q, bl, [4, 12], [20, 5], "dot", None))
    with pytest.raises(ValueError, match="widths must add up to D=12"):
        torch.ops.embedops.matryoshka_topk_blocks(q, bl[:1], 5, [4])
    with pytest.raises(ValueError, match="every block must have N=50"):
        torch.ops.embedops.matryoshka_topk_blocks(q, [bl[0], bl[1][:10]], 5, [4])
    with pytest.raises(ValueError, match="non-empty list"):
        torch.ops.embedops.matryoshka_topk_blocks(q, [], 5, [4])
    with pytest.raises(TypeError, match="blocks must have the dtype of queries"):
        torch.ops.embedops.matryoshka_topk_blocks(q, [bl[0].double(), bl[1]], 5, [4])
    with pytest.raises(ValueError, match="k must be <="):
        torch.ops.embedops.matryoshka_topk_blocks(q, bl, 51, [4])


def test_index_add_large_with_progress_bar_is_the_same_add(capfd):
    # >= 2^20 rows with show_progress_bar=True: added in chunks behind a bar on stderr
    x = torch.randn((1 << 20) + 1000, 8, generator=seeded(7))
    a = embedops.MatryoshkaIndex(8, dims=[2, 8])
    a.add(x[:10])
    a.add(x[10:], show_progress_bar=True)
    b = embedops.MatryoshkaIndex(8, dims=[2, 8])
    b.add(x, show_progress_bar=False)
    assert len(a) == len(b) == x.shape[0]
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.vectors, x)
    q = x[:3] + 0.01
    for got, want in zip(a.search(q, 5, dim=[2, 8]), b.search(q, 5, dim=[2, 8])):
        torch.testing.assert_close(got, want)
    assert capfd.readouterr().out == ""  # the bar never writes to stdout
