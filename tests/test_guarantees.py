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
        assert n >= 15, f"{family}: only {n} bad inputs in the catalogue"


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
