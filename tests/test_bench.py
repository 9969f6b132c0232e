"""The bench's bookkeeping (no timing claims): targets attached to rows, the summary line, the
Markdown table of saved runs, and the --table-from command. Speed itself is checked by running the
bench, never by a test."""

from __future__ import annotations

import json

import pytest

from embedops.bench import Case, Target
from embedops.bench.__main__ import main
from embedops.bench.core import markdown_table, run_case, target_summary

PEAKS = {"copy_GBps": 10.0, "matmul_GFLOPps": 100.0}


def test_target_met_and_text():
    assert Target(1.5).met(1.5) and not Target(1.5).met(1.49)
    assert not Target(1.0, strict=True).met(1.0) and Target(1.0, strict=True).met(1.01)
    t = Target(5.0, metric="recall@10", metric_at_least=0.98)
    assert t.met(6.0, {"recall@10": 0.99})
    assert not t.met(6.0, {"recall@10": 0.97})  # fast enough, recall too low
    assert not t.met(4.0, {"recall@10": 1.0})
    assert not t.met(6.0, {})  # no recall measured: not shown to hold
    assert str(Target(1 / 1.3)) == "≥ 0.769"
    assert str(Target(1.0, strict=True)) == "> 1"
    assert str(t) == "≥ 5 at recall@10 ≥ 0.98"


def test_case_target_for_exact_and_prefix():
    c = Case("c", "s", fn=lambda: None, baselines={},
             targets={"sdpa_attention_forward": 1.3, "faiss*": Target(2.0), "(a)*": 2})
    assert c.target_for("sdpa_attention_forward") == Target(1.3)
    assert c.target_for("sdpa_attention_forward (embedops mask)") is None  # exact keys match exactly
    assert c.target_for("faiss IndexFlatIP (prefix copy)") == Target(2.0)
    assert c.target_for("(a) torch hash + F.embedding_bag") == Target(2.0)
    assert c.target_for("torch mm+topk") is None


def test_case_targets_per_level():
    c = Case("c", "s", fn=lambda: None, baselines={}, targets={"sdpa": 1.5}, default_targets={"sdpa": 1.0},
             cuda_targets={"sdpa flash": 0.7})
    assert c.target_for("sdpa") == c.target_for("sdpa", "cpu") == Target(1.5)
    assert c.target_for("sdpa", "default") == Target(1.0)
    assert c.target_for("sdpa", "cuda") is None and c.target_for("sdpa flash", "cuda") == Target(0.7)


def test_run_case_marks_targets():
    # goals no timing can miss or meet: the marks, not the speed, are under test
    case = Case("toy", "n", fn=lambda: sum(range(1000)),
                baselines={"any": lambda: sum(range(1000)), "never": lambda: sum(range(1000)),
                           "untargeted": lambda: sum(range(1000))},
                targets={"any": 1e-9, "never": Target(1e9)})
    rows = {r["baseline"]: r for r in run_case(case, "cpu", 0.01, 1, PEAKS, "cpu")}
    assert rows["any"]["target"] == "≥ 1e-09" and rows["any"]["target_met"] is True
    assert rows["never"]["target"] == "≥ 1e+09" and rows["never"]["target_met"] is False
    assert rows["untargeted"]["target"] is None and rows["untargeted"]["target_met"] is None
    for level in (None, "default"):  # no marks; this case has no default-level goals
        rows = run_case(case, "cpu", 0.01, 1, PEAKS, level)
        assert all(r["target"] is None and r["target_met"] is None for r in rows)


def _report(level, speedups, quick=False):
    rows = []
    for (case, baseline, target), sp in speedups.items():
        met = None if target is None else sp >= float(target.split()[-1])
        rows.append({"family": "f", "case": case, "shapes": "s", "baseline": baseline, "embedops_us": 1000.0,
                     "baseline_us": 1000.0 * sp, "speedup": sp, "metrics": {},
                     "target": target, "target_met": met})
    return {"device": "cpu", "device_name": "x", "quick": quick, "results": rows,
            "build_info": {"cpu_capability": level}, "cpu_level": {"embedops": level}}


def test_summary_lists_the_misses():
    rep = _report("avx2", {("a", "b1", "≥ 1.5"): 1.2, ("a", "b2", "≥ 1"): 1.1, ("c", "b3", None): 0.5})
    text = target_summary(rep)
    assert text.startswith("targets: 1 of 2 hold")
    assert "missed: f a [s] vs b1: 1.20×, target ≥ 1.5" in text
    assert "b2" not in text and "b3" not in text
    assert "--quick" in target_summary(dict(rep, quick=True))
    assert "not slower than the plain torch" in target_summary(_report("default", {("a", "b1", "≥ 1"): 1.1}))
    assert "none of these rows" in target_summary(_report("avx2", {("c", "b3", None): 0.5}))


def test_markdown_table_side_by_side():
    a = _report("avx2", {("a", "b1", "≥ 1.5"): 1.2, ("c", "b3", None): 0.5})
    b = _report("avx512", {("a", "b1", "≥ 1.5"): 1.6})
    lines = markdown_table([a, b]).splitlines()
    assert lines[0] == ("| case | shapes | baseline | cpu avx2 ms | cpu avx2 speedup | cpu avx512 ms | "
                        "cpu avx512 speedup | target |")
    assert lines[2] == "| a | s | b1 | 1.00 | 1.20× ✗ | 1.00 | 1.60× ✓ | ≥ 1.5 |"
    assert len(lines) == 3  # the row without a target is left out
    lines = markdown_table([a, b], all_rows=True).splitlines()
    assert lines[3] == "| c | s | b3 | 1.00 | 0.50× | - | - |  |"
    # different goals per run (the default level's beside avx2's): each in its cell
    d = _report("default", {("a", "b1", "≥ 1"): 1.2})
    assert markdown_table([d, a]).splitlines()[2] == ("| a | s | b1 | 1.00 | 1.20× ✓ (≥ 1) | 1.00 | 1.20× ✗ (≥ 1.5) "
                                                      "| per run |")
    # two runs at the same level get numbered columns
    assert "cpu avx2 (1) ms" in markdown_table([a, a]) and "cpu avx2 (2) ms" in markdown_table([a, a])


def test_table_from_command(tmp_path, capsys):
    paths = []
    for level, sp in (("avx2", 1.2), ("avx512", 1.6)):
        p = tmp_path / f"{level}.json"
        p.write_text(json.dumps(_report(level, {("a", "b1", "≥ 1.5"): sp})))
        paths.append(str(p))
    assert main(["--table-from", *paths]) == 0
    out = capsys.readouterr().out
    assert "| a | s | b1 | 1.00 | 1.20× ✗ | 1.00 | 1.60× ✓ | ≥ 1.5 |" in out
    with pytest.raises(FileNotFoundError):
        main(["--table-from", str(tmp_path / "missing.json")])
