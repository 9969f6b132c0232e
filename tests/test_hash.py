"""hash_ids: THE hash of the embedding family (C++ CPU, CUDA and the numpy reference agree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedops
from embedops import reference

from conftest import opcheck

# (value, feature, probe, seed, num_rows) -> row. Pinned: changing the hash breaks every saved
# table, so this must never change.
KNOWN = [
    (0, 0, 0, 0, 1000, 203),
    (1, 0, 0, 0, 1000, 167),
    (-1, 0, 0, 0, 1000, 944),
    (9223372036854775807, 0, 0, 0, 1000, 760),
    (-9223372036854775808, 0, 0, 0, 1000, 872),
    (123456789, 3, 1, 0, 1048576, 625017),
    (123456789, 3, 2, 0, 1048576, 521823),
    (123456789, 4, 1, 0, 1048576, 222265),
    (123456789, 3, 1, 42, 1048576, 734374),
    (-987654321, 25, 2, -7, 1000003, 281322),
    (42, 4294967295, 4294967295, 9223372036854775807, 9223372036854775807, 2669643091848260926),
    (7, 1, 0, 0, 1, 0),
]

M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_row(v: int, f: int, p: int, s: int, r: int) -> int:
    """The docstring's formula in plain Python integers (a third, independent implementation)."""
    salt = _mix(_mix(((s & M64) + 0x9E3779B97F4A7C15) & M64) ^ ((f << 32) | p))
    return (_mix((v & M64) ^ salt) * r) >> 64


@pytest.mark.parametrize("v,f,p,s,r,row", KNOWN)
def test_known_answers(device, v, f, p, s, r, row):
    assert py_row(v, f, p, s, r) == row
    assert int(reference.hash_ids(np.array([v]), feature=f, probe=p, num_rows=r, seed=s)[0]) == row
    got = embedops.hash_ids(torch.tensor([v], device=device), feature=f, probe=p, num_rows=r, seed=s)
    assert got.dtype == torch.int64 and got.device.type == device
    assert int(got[0]) == row


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_matches_numpy_reference(device, dtype):
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(0)
    v = torch.randint(info.min, info.max, (50_000,), generator=g, dtype=torch.int64).to(dtype)
    v[:6] = torch.tensor([info.min, info.max, -1, 0, 1, info.min + 1], dtype=dtype)
    for f, p, s, r in [(0, 0, 0, 97), (5, 2, 123, 1 << 20), (25, 0, -3, 2**63 - 1), (1, 7, 2**40, 3)]:
        want = reference.hash_ids(v.numpy(), feature=f, probe=p, num_rows=r, seed=s)
        got = embedops.hash_ids(v.to(device), feature=f, probe=p, num_rows=r, seed=s).cpu().numpy()
        np.testing.assert_array_equal(got, want)
        assert got.min() >= 0 and got.max() < r


def test_int32_is_sign_extended(device):
    v = torch.tensor([-5, -1, 0, 3, 2**31 - 1, -(2**31)], dtype=torch.int32, device=device)
    a = embedops.hash_ids(v, feature=2, probe=1, num_rows=12345)
    b = embedops.hash_ids(v.long(), feature=2, probe=1, num_rows=12345)
    assert torch.equal(a, b)


def test_numpy_in_numpy_out():
    v = np.arange(-50, 50, dtype=np.int32)
    out = embedops.hash_ids(v, feature=1, probe=0, num_rows=1000)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == v.shape
    np.testing.assert_array_equal(out, reference.hash_ids(v, feature=1, probe=0, num_rows=1000))
    ro = v.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(embedops.hash_ids(ro, feature=1, probe=0, num_rows=1000), out)


def test_shapes_noncontiguous_and_empty(device):
    v = torch.arange(-600, 600, device=device).reshape(30, 40).t()  # non-contiguous
    out = embedops.hash_ids(v, feature=3, probe=0, num_rows=77)
    assert out.shape == v.shape
    assert torch.equal(out, embedops.hash_ids(v.contiguous(), feature=3, probe=0, num_rows=77))
    empty = embedops.hash_ids(torch.empty(0, 5, dtype=torch.int64, device=device), feature=0, probe=0, num_rows=5)
    assert empty.shape == (0, 5) and empty.dtype == torch.int64
    scalar = embedops.hash_ids(torch.tensor(7, device=device), feature=1, probe=0, num_rows=1)
    assert scalar.shape == () and int(scalar) == 0


def test_input_not_modified(device):
    v = torch.arange(-100, 100, device=device)
    before = v.clone()
    embedops.hash_ids(v, feature=0, probe=0, num_rows=10)
    assert torch.equal(v, before)


def _chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniform_over_buckets_on_sequential_ids():
    # Sequential ids are the structured keys that break weak hashes (multiply-mod-prime etc.).
    n, buckets = 1_000_000, 1000
    rows = embedops.hash_ids(torch.arange(n), feature=0, probe=0, num_rows=buckets).numpy()
    counts = np.bincount(rows, minlength=buckets)
    dof = buckets - 1
    # chi-square with 999 dof: mean 999, sd 44.7; accept within 6 sd (deterministic input).
    assert abs(_chi2(counts) - dof) < 6 * np.sqrt(2 * dof)
    # and the top bits: rows into a power-of-two table, ids with a stride of 2^20
    rows = embedops.hash_ids(torch.arange(0, 2**40, 2**20), feature=0, probe=0, num_rows=64).numpy()
    counts = np.bincount(rows, minlength=64)
    assert abs(_chi2(counts) - 63) < 6 * np.sqrt(2 * 63)


@pytest.mark.parametrize("other", [dict(feature=1, probe=0, seed=0), dict(feature=0, probe=1, seed=0),
                                   dict(feature=0, probe=0, seed=1)])
def test_feature_probe_seed_give_independent_rows(other):
    ids = torch.arange(200_000)
    a = embedops.hash_ids(ids, feature=0, probe=0, num_rows=32, seed=0).numpy()
    b = embedops.hash_ids(ids, num_rows=32, **other).numpy()
    joint = np.bincount(a * 32 + b, minlength=32 * 32)
    dof = 32 * 32 - 1
    assert abs(_chi2(joint) - dof) < 6 * np.sqrt(2 * dof)
    # the same id lands in the same row only by chance (1/R)
    big_a = embedops.hash_ids(ids, feature=0, probe=0, num_rows=1 << 20).numpy()
    big_b = embedops.hash_ids(ids, num_rows=1 << 20, **other).numpy()
    assert (big_a == big_b).mean() < 5e-5


def test_bad_input():
    v = torch.arange(10)
    with pytest.raises(ValueError, match="hash_ids: num_rows"):
        embedops.hash_ids(v, feature=0, probe=0, num_rows=0)
    with pytest.raises(ValueError, match="hash_ids: num_rows"):
        embedops.hash_ids(v, feature=0, probe=0, num_rows=-5)
    with pytest.raises(TypeError, match="hash_ids: values must be an integer tensor.*Float"):
        embedops.hash_ids(v.float(), feature=0, probe=0, num_rows=10)
    with pytest.raises(TypeError, match="hash_ids: values must be an integer tensor.*Double"):
        embedops.hash_ids(np.zeros(3), feature=0, probe=0, num_rows=10)
    with pytest.raises(TypeError, match="hash_ids: values must be a torch.Tensor or a numpy.ndarray, got list"):
        embedops.hash_ids([1, 2], feature=0, probe=0, num_rows=10)
    with pytest.raises(ValueError, match="hash_ids: feature must be in"):
        embedops.hash_ids(v, feature=-1, probe=0, num_rows=10)
    with pytest.raises(ValueError, match="hash_ids: probe must be in"):
        embedops.hash_ids(v, feature=0, probe=2**32, num_rows=10)
    with pytest.raises(TypeError, match="hash_ids: num_rows must be an int"):
        embedops.hash_ids(v, feature=0, probe=0, num_rows=10.0)
    # the op itself (no Python wrapper) checks too
    with pytest.raises(ValueError, match="hash_ids: num_rows must be > 0, got 0"):
        torch.ops.embedops.hash_ids(v, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="hash_ids: feature"):
        torch.ops.embedops.hash_ids(v, -2, 0, 10, 0)
    with pytest.raises(TypeError, match="hash_ids: values .*Bool"):
        torch.ops.embedops.hash_ids(v > 3, 0, 0, 10, 0)


@pytest.mark.skipif(embedops.build_info()["cuda"], reason="checks the message of a CPU-only build")
def test_cuda_tensor_on_cpu_only_build_message():
    from embedops._utils import check_device

    class FakeCuda:
        device = torch.device("cuda", 0)

    with pytest.raises(RuntimeError, match="hash_ids: values is on cuda:0, but this embedops build has no CUDA"):
        check_device("hash_ids", "values", FakeCuda())


def test_opcheck(device):
    v = torch.randint(-(2**62), 2**62, (257,), device=device)
    opcheck(torch.ops.embedops.hash_ids.default, (v, 3, 1, 1000, 5))
    opcheck(torch.ops.embedops.hash_ids.default, (v.int().reshape(1, 257), 0, 0, 7, 0))


def test_torch_compile_fullgraph(device):
    def f(x):
        return embedops.hash_ids(x + 1, feature=2, probe=1, num_rows=1 << 16, seed=9) * 2

    x = torch.arange(-1000, 1000, device=device)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))
