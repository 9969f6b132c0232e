"""Reliability guarantees across every op: the bad-input catalogue (in-process and in a
subprocess, so a crash cannot hide), property tests, no leaks, thread safety."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import embedops
from embedops import reference

from catalogue import BAD_INPUTS, SMOKE

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("entry", BAD_INPUTS, ids=[f"{e.family}/{e.name}" for e in BAD_INPUTS])
def test_bad_input_raises_clear_error(entry):
    with pytest.raises(entry.exc) as info:
        entry.call()
    assert re.search(entry.match, str(info.value)), str(info.value)


def test_catalogue_size_per_family():
    counts = collections.Counter(e.family for e in BAD_INPUTS)
    for family, n in counts.items():
        assert n >= 20, f"{family}: only {n} bad inputs in the catalogue"


def test_catalogue_in_subprocess_never_crashes():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "catalogue.py")], capture_output=True,
                          text=True, timeout=600, cwd=HERE)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"{len(BAD_INPUTS)} bad inputs, 0 failures" in proc.stdout


# ---- property tests ------------------------------------------------------------------------------

_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(
    ids=st.lists(_int64, min_size=0, max_size=64),
    feature=st.integers(0, 2**32 - 1),
    probe=st.integers(0, 2**32 - 1),
    num_rows=st.integers(1, 2**63 - 1),
    seed=_int64,
    int32=st.booleans(),
)
def test_hash_ids_property(ids, feature, probe, num_rows, seed, int32):
    arr = np.array(ids, dtype=np.int64)
    if int32:
        arr = arr.astype(np.int32)  # wraps: still a valid id
    got = embedops.hash_ids(torch.from_numpy(arr), feature=feature, probe=probe, num_rows=num_rows, seed=seed)
    want = reference.hash_ids(arr, feature=feature, probe=probe, num_rows=num_rows, seed=seed)
    np.testing.assert_array_equal(got.numpy(), want)
    assert ((got >= 0) & (got < num_rows)).all()


# ---- resources -----------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(bool(os.environ.get("EMBEDOPS_SANITIZER")),
                    reason="under AddressSanitizer freed memory sits in ASan's quarantine, so RSS says nothing")
@pytest.mark.parametrize("smoke", SMOKE, ids=[s.name for s in SMOKE])
def test_no_leak_over_10000_calls(smoke):
    expected = smoke.expected()
    for _ in range(500):  # warm up allocator caches
        smoke.call()
    before = _rss_mb()
    for _ in range(10_000):
        out = smoke.call()
    growth = _rss_mb() - before
    assert smoke.equal(out, expected)
    assert growth < 20, f"{smoke.name}: RSS grew by {growth:.1f} MB over 10000 calls"


@pytest.mark.parametrize("smoke", SMOKE, ids=[s.name for s in SMOKE])
def test_callable_from_several_threads(smoke):
    expected = smoke.expected()
    errors: list[str] = []

    def worker():
        try:
            for _ in range(50):
                if not smoke.equal(smoke.call(), expected):
                    errors.append("wrong result")
                    return
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


_FLOAT_TOL = {torch.float32: 2e-4, torch.float64: 1e-9}


@given(
    B=st.integers(1, 3), Lq=st.integers(1, 40), Lk=st.integers(1, 70), Hkv=st.integers(1, 3),
    group=st.integers(1, 3), D=st.integers(1, 40), Dv=st.integers(1, 24),
    dtype=st.sampled_from([torch.float32, torch.float64]), masked=st.booleans(), seed=st.integers(0, 2**31),
)
def test_cross_attention_property(B, Lq, Lk, Hkv, group, D, Dv, dtype, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hkv * group, D, generator=g, dtype=dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, Lk, Hkv, Dv, generator=g, dtype=dtype)
    kv_len = torch.randint(0, Lk + 1, (B,), generator=g) if masked else None
    q_len = torch.randint(0, Lq + 1, (B,), generator=g) if masked else None
    out, lse = embedops.cross_attention(q, k, v, kv_lengths=kv_len, q_lengths=q_len, return_lse=True)
    ref_out, ref_lse = reference.cross_attention(q, k, v, kv_lengths=kv_len, q_lengths=q_len)
    assert not out.isnan().any() and not lse.isnan().any()
    tol = _FLOAT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=tol, rtol=tol)


@given(
    R=st.integers(1, 300), D=st.integers(1, 70), B=st.integers(0, 6),
    probes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    combine=st.sampled_from(["concat", "sum", "mean"]), mode=st.sampled_from(["sum", "mean", "max"]),
    weighted=st.booleans(), int32=st.booleans(), seed=st.integers(-(2**63), 2**63 - 1), data=st.data(),
)
def test_multiplexed_embedding_bag_property(R, D, B, probes, combine, mode, weighted, int32, seed, data):
    F = len(probes)
    lengths = data.draw(st.lists(st.integers(0, 6), min_size=F * B, max_size=F * B))
    n = sum(lengths)
    ids = data.draw(st.lists(_int64, min_size=n, max_size=n))
    idx_dtype = torch.int32 if int32 else torch.int64
    values = torch.tensor(ids, dtype=torch.int64)
    if int32:
        values = values.to(torch.int32)
    offsets = torch.tensor([0] + list(np.cumsum(lengths)), dtype=idx_dtype)
    g = torch.Generator().manual_seed(abs(seed) % 2**31)
    weight = torch.randn(R, D, generator=g)
    psw = torch.rand(n, generator=g) if (weighted and mode == "sum") else None
    out = embedops.multiplexed_embedding_bag(weight, values, offsets, num_probes=probes, combine=combine, mode=mode,
                                             per_sample_weights=psw, seed=seed)
    want = reference.multiplexed_embedding_bag(weight, values, offsets, probes, combine=combine, mode=mode,
                                               per_sample_weights=psw, seed=seed)
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_results_do_not_depend_on_thread_count():
    """Every smoke call gives the same result with 1 thread as with the default count."""
    n = torch.get_num_threads()
    try:
        for smoke in SMOKE:
            torch.set_num_threads(n)
            many = smoke.call()
            torch.set_num_threads(1)
            one = smoke.call()
            assert smoke.equal(one, many), smoke.name
    finally:
        torch.set_num_threads(n)


@given(
    B=st.integers(1, 30), N=st.integers(1, 300), D=st.integers(1, 48), data=st.data(),
    metric=st.sampled_from(["cosine", "dot"]), dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31), zero_rows=st.booleans(),
)
def test_matryoshka_similarity_and_topk_property(B, N, D, data, metric, dtype, seed, zero_rows):
    dims = sorted(data.draw(st.sets(st.integers(1, D), min_size=1, max_size=min(4, D))))
    k = data.draw(st.integers(0, N))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=dtype)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    if zero_rows:
        x[::3, : dims[0]] = 0  # zero prefixes score 0 under cosine, never NaN
    sim = embedops.matryoshka_similarity(q, x, dims, metric=metric)
    ref = reference.matryoshka_similarity(q, x, dims, metric=metric)
    tol = _FLOAT_TOL[dtype] * max(1.0, D**0.5 if metric == "dot" else 1.0)
    assert not sim.isnan().any()
    torch.testing.assert_close(sim.double(), ref, atol=tol, rtol=tol)
    values, indices = embedops.matryoshka_topk(q, x, k, dims, metric=metric)
    assert values.shape == indices.shape == (len(dims), B, k)
    if k:
        # the returned rows really have the returned scores, sorted best first, and they are the
        # best k (up to ties within tolerance)
        picked = torch.gather(ref, 2, indices)
        torch.testing.assert_close(values.double(), picked, atol=tol, rtol=tol)
        assert (values[..., :-1] >= values[..., 1:]).all()
        kth_best = ref.topk(k, dim=2).values[..., -1]
        assert (picked[..., -1] >= kth_best - 2 * tol).all()


@given(seqs=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 30)), min_size=1, max_size=4),
       Hkv=st.integers(1, 2), group=st.integers(1, 2), D=st.integers(1, 24), Dv=st.integers(1, 16),
       seed=st.integers(0, 2**31))
def test_cross_attention_varlen_property(seqs, Hkv, group, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(np.cumsum([s[0] for s in seqs])))
    cu_k = torch.tensor([0] + list(np.cumsum([s[1] for s in seqs])))
    q = torch.randn(int(cu_q[-1]), Hkv * group, D, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), Hkv, Dv, generator=g, dtype=torch.float64)
    max_q, max_k = max(s[0] for s in seqs), max(s[1] for s in seqs)
    out, lse = embedops.cross_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True)
    ref_out, ref_lse = reference.cross_attention_varlen(q, k, v, cu_q, cu_k)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), atol=1e-9, rtol=1e-9)


@given(B=st.integers(1, 2), Lx=st.integers(1, 40), Ly=st.integers(1, 70), H=st.integers(1, 2), D=st.integers(1, 24),
       Dvx=st.integers(1, 12), Dvy=st.integers(1, 12), masked=st.booleans(), seed=st.integers(0, 2**31))
def test_co_attention_property(B, Lx, Ly, H, D, Dvx, Dvy, masked, seed):
    g = torch.Generator().manual_seed(seed)
    qx = torch.randn(B, Lx, H, D, generator=g, dtype=torch.float64)
    ky = torch.randn(B, Ly, H, D, generator=g, dtype=torch.float64)
    vx = torch.randn(B, Lx, H, Dvx, generator=g, dtype=torch.float64)
    vy = torch.randn(B, Ly, H, Dvy, generator=g, dtype=torch.float64)
    xl = torch.randint(0, Lx + 1, (B,), generator=g) if masked else None
    yl = torch.randint(0, Ly + 1, (B,), generator=g) if masked else None
    ox, oy = embedops.co_attention(qx, ky, vx, vy, x_lengths=xl, y_lengths=yl)
    rx, ry = reference.co_attention(qx, ky, vx, vy, x_lengths=xl, y_lengths=yl)[:2]
    assert not ox.isnan().any() and not oy.isnan().any()
    torch.testing.assert_close(ox, rx, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(oy, ry, atol=1e-9, rtol=1e-9)


@given(B=st.integers(1, 2), Lq=st.integers(1, 20), Hkv=st.integers(1, 2), group=st.integers(1, 2),
       D=st.integers(1, 16), Dv=st.integers(1, 12), data=st.data(), per_head=st.booleans(), seed=st.integers(0, 2**31))
def test_mixture_attention_property(B, Lq, Hkv, group, D, Dv, data, per_head, seed):
    M = data.draw(st.integers(1, 3))
    seg = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 25), min_size=M, max_size=M), min_size=B, max_size=B)))
    Lk = max(1, int(seg.sum(1).max())) + data.draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, Hkv, Dv, generator=g, dtype=torch.float64)
    w = torch.rand((B, Lq, Hq, M) if per_head else (B, Lq, M), generator=g, dtype=torch.float64)
    out = embedops.mixture_attention(q, k, v, seg, w)
    ref = reference.mixture_attention(q, k, v, seg, w)[0]
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


@given(B=st.integers(1, 4), N=st.integers(1, 400), D=st.integers(2, 48), data=st.data(),
       metric=st.sampled_from(["cosine", "dot"]), seed=st.integers(0, 2**31))
def test_matryoshka_funnel_property(B, N, D, data, metric, seed):
    d1 = data.draw(st.integers(1, D - 1))
    k1 = data.draw(st.integers(1, N))
    k = data.draw(st.integers(1, k1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    values, indices = embedops.matryoshka_funnel(q, x, k, [(d1, k1)], metric=metric)
    ref_v, ref_i = reference.matryoshka_funnel(q, x, [d1, D], [k1, k], metric=metric)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(values.numpy(), ref_v, atol=1e-9, rtol=1e-9)
