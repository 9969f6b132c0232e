"""CPU levels: the override, the report, and agreement of every compiled level this CPU runs.

The kernel tests of the other files run at one level per pytest process (the best one, or
EMBEDOPS_CPU_CAPABILITY; CI runs the suite once per level this machine supports). Here each
level runs in a subprocess of tools/cpu_level_smoke.py (every family, checked against the float64
reference) and the levels' outputs are compared with each other.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import embedops

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFO = embedops.build_info()
LEVELS = ["default", "avx2", "avx512"]
RUNNABLE = [lv for lv in LEVELS if lv in INFO["cpu_capabilities"] and lv in INFO["cpu_supports"]]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("EMBEDOPS_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)


def test_build_info_reports_levels():
    assert INFO["cpu_capabilities"][0] == "default"
    assert set(INFO["cpu_capabilities"]) <= set(LEVELS)
    assert INFO["cpu_capability"] in INFO["cpu_capabilities"]
    assert INFO["cpu_capability"] in INFO["cpu_supports"]
    # with no override the best level this CPU and build have
    best = [lv for lv in LEVELS if lv in INFO["cpu_capabilities"] and lv in INFO["cpu_supports"]][-1]
    r = run_python("import embedops; print(embedops.build_info()['cpu_capability'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == best


@pytest.mark.parametrize("level", RUNNABLE)
def test_override_takes_effect(level):
    r = run_python("import embedops; print(embedops.build_info()['cpu_capability'])", EMBEDOPS_CPU_CAPABILITY=level)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level


def test_aten_cpu_capability_is_honoured():
    r = run_python("import embedops; print(embedops.build_info()['cpu_capability'])", ATEN_CPU_CAPABILITY="default")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "default"


@pytest.mark.parametrize("value", ["avx9", "AVX2", "native"])
def test_unknown_level_is_a_clear_import_error(value):
    r = run_python("import embedops", EMBEDOPS_CPU_CAPABILITY=value)
    assert r.returncode != 0
    assert "ValueError" in r.stderr
    assert f"EMBEDOPS_CPU_CAPABILITY='{value}'" in r.stderr
    assert "this CPU supports" in r.stderr


def test_level_the_cpu_lacks_is_a_clear_import_error():
    lacking = [lv for lv in LEVELS if lv not in INFO["cpu_supports"]]
    if not lacking:
        pytest.skip(f"this CPU supports every level ({', '.join(INFO['cpu_supports'])})")
    r = run_python("import embedops", EMBEDOPS_CPU_CAPABILITY=lacking[-1])
    assert r.returncode != 0 and "Illegal instruction" not in r.stderr
    assert f"EMBEDOPS_CPU_CAPABILITY='{lacking[-1]}'" in r.stderr and "does not support" in r.stderr


@pytest.fixture(scope="module")
def level_outputs(tmp_path_factory):
    out = {}
    for level in RUNNABLE:
        path = tmp_path_factory.mktemp(level) / "out.pt"
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "cpu_level_smoke.py"), "--save", str(path)],
                           env=dict(os.environ, EMBEDOPS_CPU_CAPABILITY=level), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"level {level}:\n{r.stdout}\n{r.stderr}"
        saved = torch.load(path)
        assert saved["level"] == level
        out[level] = saved["outputs"]
    return out


@pytest.mark.parametrize("level", RUNNABLE)
def test_level_matches_reference(level_outputs, level):
    # cpu_level_smoke checks every output against the float64 reference and fails otherwise
    assert len(level_outputs[level]) >= 20


def test_levels_agree(level_outputs):
    if len(level_outputs) < 2:
        pytest.skip("only one CPU level runs here")
    first, *rest = level_outputs
    for other in rest:
        a, b = level_outputs[first], level_outputs[other]
        assert a.keys() == b.keys()
        for name in a:
            x, y = a[name], b[name]
            if x.dtype == torch.int64:  # top-k indices: identical (the data have no exact ties)
                assert torch.equal(x, y), f"{name}: {first} and {other} disagree"
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} ({first} vs {other}): {m}")
