"""Benchmark machinery: a case = embedops vs baselines on the same data; check, then time.

A family module (``embedops.bench.<family>``) defines ``cases(device: str, quick: bool)`` that
returns a list of zero-argument *builders*; each builder makes its data (seeded) and returns a
:class:`Case`. Builders run one at a time, so only one case's data is alive at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch


class CheckFailed(AssertionError):
    pass


@dataclasses.dataclass(frozen=True)
class Target:
    """A speed goal of the issues against one baseline: speedup (baseline time / embedops time) at
    least ``at_least``, or more than it when ``strict`` ("faster than"); with ``metric``, also the
    case's metric of that name at least ``metric_at_least`` (e.g. recall@10 >= 0.98). A time bound
    such as "<= 1.3x one GEMM" is the speedup goal 1 / 1.3."""

    at_least: float
    strict: bool = False
    metric: str | None = None
    metric_at_least: float = 0.0

    def met(self, speedup: float, metrics: dict | None = None) -> bool:
        fast = speedup > self.at_least if self.strict else speedup >= self.at_least
        if self.metric is None:
            return fast
        value = (metrics or {}).get(self.metric)
        return fast and isinstance(value, (int, float)) and value >= self.metric_at_least

    def __str__(self) -> str:
        s = f"{'>' if self.strict else '≥'} {self.at_least:.3g}"
        return s + (f" at {self.metric} ≥ {self.metric_at_least:g}" if self.metric else "")


@dataclasses.dataclass
class Case:
    """One benchmark case.

    name/shapes: what the table shows. fn: the embedops call. baselines: name -> call computing
    the same thing another way. check(ours_output, baseline_output): raises if they disagree
    (run for every baseline before anything is timed). bytes / flops: work of ONE embedops call,
    for GB/s and GFLOP/s. metrics: extra numbers to report (e.g. recall), shown and saved.
    """

    name: str
    shapes: str
    fn: Callable[[], Any]
    baselines: dict[str, Callable[[], Any]]
    check: Callable[[Any, Any], None] | None = None
    bytes: float | None = None
    flops: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # baselines whose output is not comparable with ours (e.g. a different algorithm): timed only
    unchecked: tuple[str, ...] = ()
    # The issues' speed goals: baseline name (or a name prefix ending in "*") -> Target (a float
    # x: Target(x)). targets: the CPU at the avx2 and avx512 levels; default_targets: the CPU's
    # default level (not slower than the plain torch composition); cuda_targets: a GPU. A goal
    # the issue sets at a size (search at N = 1M, similarity at N = 100k) is attached only there.
    targets: dict[str, Target | float] = dataclasses.field(default_factory=dict)
    default_targets: dict[str, Target | float] = dataclasses.field(default_factory=dict)
    cuda_targets: dict[str, Target | float] = dataclasses.field(default_factory=dict)

    def target_for(self, baseline: str, level: str = "cpu") -> Target | None:
        """The goal against `baseline` at `level`: "cpu" (avx2 / avx512), "default" or "cuda"."""
        goals = {"cpu": self.targets, "default": self.default_targets, "cuda": self.cuda_targets}[level]
        for key, t in goals.items():
            if baseline == key or (key.endswith("*") and baseline.startswith(key[:-1])):
                return t if isinstance(t, Target) else Target(float(t))
        return None


def assert_close(ours, theirs, *, atol: float, rtol: float, what: str = "") -> None:
    """check helper: tensors (or tuples of tensors) equal within tolerance."""
    if isinstance(ours, (tuple, list)):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b, atol=atol, rtol=rtol, what=f"{what}[{i}]")
        return
    a = torch.as_tensor(ours).detach().cpu().double()
    b = torch.as_tensor(theirs).detach().cpu().double()
    if a.shape != b.shape:
        raise CheckFailed(f"{what}: shape {tuple(a.shape)} != baseline {tuple(b.shape)}")
    if a.numel() and not torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
        err = (a - b).abs().max().item()
        raise CheckFailed(f"{what}: max abs difference {err:.3g} exceeds atol={atol} rtol={rtol}")


# ---- timing --------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, min_time: float) -> float:
    """Median seconds per call."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        times: list[float] = []
        total = 0.0
        while total < min_time or len(times) < 5:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
            times.append(t)
            total += t
            if len(times) >= 2000:
                break
        return statistics.median(times)
    from torch.utils.benchmark import Timer

    fn()  # warm-up (and first-call allocations)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def measure_peaks(device: str, quick: bool) -> dict[str, float]:
    """This machine's copy bandwidth (GB/s) and matmul rate (GFLOP/s), measured now.

    The table's "% roof" is the achieved rate over these (whichever resource the case uses more
    of), so the numbers say how close a kernel is to what this machine did a moment ago.
    """
    n = (64 if quick else 256) * 2**20 // 4
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, 0.2)
    bw = 2 * n * 4 / t / 1e9
    m = 4096 if device == "cuda" else (768 if quick else 1024)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, 0.2)
    return {"copy_GBps": bw, "matmul_GFLOPps": 2 * m**3 / t / 1e9, "matmul_dtype": str(dtype)}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ---- running -----------------------------------------------------------------------------------


def target_level(device: str) -> str:
    """Which of a case's goals this run checks: "cuda", or on the CPU "default" (the portable
    level: not slower than the plain torch composition) or "cpu" (the avx2 and avx512 levels)."""
    import embedops

    if device == "cuda":
        return "cuda"
    return "default" if embedops.build_info()["cpu_capability"] == "default" else "cpu"


def run_case(case: Case, device: str, min_time: float, rounds: int, peaks: dict,
             level: str | None = None) -> list[dict]:
    """Check, then time `case`; one row per baseline. level: whose targets to mark (target_level),
    None for none."""
    ours = case.fn()
    _sync(device)
    if case.check is not None:
        for name, base in case.baselines.items():
            if name in case.unchecked:
                continue
            theirs = base()
            _sync(device)
            try:
                case.check(ours, theirs)
            except AssertionError as e:
                raise CheckFailed(f"{case.name} [{case.shapes}]: result differs from {name}: {e}") from e
    del ours
    # side by side, alternating, best median of `rounds` rounds for each
    t_ours = math.inf
    t_base = {name: math.inf for name in case.baselines}
    for _ in range(rounds):
        t_ours = min(t_ours, time_fn(case.fn, device, min_time))
        for name, base in case.baselines.items():
            t_base[name] = min(t_base[name], time_fn(base, device, min_time))
    gbps = case.bytes / t_ours / 1e9 if case.bytes else None
    gflops = case.flops / t_ours / 1e9 if case.flops else None
    roof = None
    fractions = []
    if gbps is not None:
        fractions.append(gbps / peaks["copy_GBps"])
    if gflops is not None:
        fractions.append(gflops / peaks["matmul_GFLOPps"])
    if fractions:
        roof = 100 * max(fractions)
    rows = []
    for name in case.baselines or {"-": None}:
        tb = t_base.get(name)
        target = case.target_for(name, level) if tb is not None and level else None
        rows.append(
            {
                "case": case.name,
                "shapes": case.shapes,
                "baseline": name,
                "embedops_us": t_ours * 1e6,
                "baseline_us": tb * 1e6 if tb is not None else None,
                "speedup": tb / t_ours if tb is not None else None,
                "GBps": gbps,
                "GFLOPps": gflops,
                "roof_pct": roof,
                "metrics": dict(case.metrics),
                "target": str(target) if target else None,
                "target_met": target.met(tb / t_ours, case.metrics) if target else None,
            }
        )
    return rows


class _Progress:
    """rich's progress bar when rich is installed, else one line per case on stderr."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(
                TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.description}"), transient=True, console=None,
            )
        except ImportError:
            self._rich = None

    def __enter__(self):
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def update(self, desc: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=desc)
        else:
            print(f"[{self.done + 1}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)


def run(families: dict[str, list[Callable[[], Case]]], device: str, quick: bool) -> dict:
    min_time = 0.15 if quick else 0.5
    rounds = 1 if quick else 2
    import embedops

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "build_info": embedops.build_info(),
        "peaks": measure_peaks(device, quick),
        "results": [],
        "failures": [],
    }
    level = target_level(device)
    total = sum(len(v) for v in families.values())
    started = time.perf_counter()
    with _Progress(total) as progress:
        for family, builders in families.items():
            for build in builders:
                progress.update(f"{family}: building case")
                case = build()
                progress.update(f"{family}: {case.name} [{case.shapes}]")
                try:
                    rows = run_case(case, device, min_time, rounds, report["peaks"], level)
                except CheckFailed as e:
                    report["failures"].append({"family": family, "case": case.name, "shapes": case.shapes,
                                               "error": str(e)})
                    rows = []
                for row in rows:
                    row["family"] = family
                    report["results"].append(row)
                del case
                progress.advance()
    report["seconds"] = time.perf_counter() - started
    return report


# ---- output ------------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _target_cell(row: dict) -> str:
    if not row.get("target"):
        return ""
    return f"{row['target']} {'✓' if row['target_met'] else '✗'}"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["family", "case", "shapes", "baseline", "embedops µs", "baseline µs", "speedup", "target",
              "GB/s", "GFLOP/s", "% roof", "metrics"]
    rows = []
    for r in report["results"]:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        rows.append([r["family"], r["case"], r["shapes"], r["baseline"], _fmt(r["embedops_us"], ".1f"),
                     _fmt(r["baseline_us"], ".1f"), _fmt(r["speedup"], ".2f") + ("×" if r["speedup"] else ""),
                     _target_cell(r), _fmt(r["GBps"], ".1f"), _fmt(r["GFLOPps"], ".1f"), _fmt(r["roof_pct"], ".0f"),
                     metrics])
    return header, rows


def target_summary(report: dict) -> str:
    """One line: how many of the run's target rows hold, and which miss."""
    rows = [r for r in report["results"] if r.get("target")]
    if not rows:
        return "targets: none of these rows has one (they are set at the issues' shapes)"
    missed = [r for r in rows if not r["target_met"]]
    line = f"targets: {len(rows) - len(missed)} of {len(rows)} hold"
    if report["device"] == "cpu" and report["build_info"]["cpu_capability"] == "default":
        line += " (the default level's: not slower than the plain torch composition)"
    if report.get("quick"):
        line += " (--quick: a target the issue sets at a size, e.g. search at N = 1M, is marked only at that size)"
    for r in missed:
        line += (f"\n  missed: {r['family']} {r['case']} [{r['shapes']}] vs {r['baseline']}: "
                 f"{r['speedup']:.2f}×, target {r['target']}")
    return line


def print_table(report: dict) -> None:
    header, rows = table_rows(report)
    title = (f"embedops bench — {report['device_name']}, torch {report['torch_version']}, "
             f"{report['threads']} threads; peaks: copy {report['peaks']['copy_GBps']:.1f} GB/s, "
             f"matmul {report['peaks']['matmul_GFLOPps']:.0f} GFLOP/s")
    lv = report.get("cpu_level")
    if lv:
        title += (f"; CPU level: embedops {lv['embedops']} (compiled "
                  f"{', '.join(report['build_info']['cpu_capabilities'])}), torch {lv['torch']}, "
                  f"faiss {lv['faiss'] or '-'}")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="right" if h not in ("family", "case", "shapes", "baseline", "metrics") else "left")
        for row in rows:
            table.add_row(*row)
        Console(width=max(190, len(title))).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for f in report["failures"]:
        print(f"CHECK FAILED: {f['family']} {f['case']} [{f['shapes']}]: {f['error']}")
    print(target_summary(report))
    print(f"{len(report['results'])} rows in {report['seconds']:.0f} s")


def markdown_table(reports: list[dict], all_rows: bool = False) -> str:
    """Saved runs side by side (e.g. one per CPU level, or the same level before / after a change),
    as a Markdown table: per run, embedops' time and the speedup over the baseline (with ✓ / ✗
    where that run had a target). Rows with a target in some run, or every row with ``all_rows``.
    ``reports``: loaded ``--json`` files."""
    labels = [_level_label(r) for r in reports]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    keys: list[tuple] = []  # (family, case, shapes, baseline), first-seen order
    cells: dict[tuple, list] = {}
    for i, rep in enumerate(reports):
        for row in rep["results"]:
            key = (row["family"], row["case"], row["shapes"], row["baseline"])
            if key not in cells:
                keys.append(key)
                cells[key] = [None] * len(reports)
            cells[key][i] = row
    if not all_rows:
        keys = [k for k in keys if any(r is not None and r.get("target") for r in cells[k])]
    header = ["case", "shapes", "baseline"]
    for label in labels:
        header += [f"{label} ms", f"{label} speedup"]
    header.append("target")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        line = [key[1], key[2], key[3].replace("|", "/")]
        # one target column when the runs share the goal; else (e.g. the default level's ≥ 1 beside
        # avx2's ≥ 2) each run's goal in its cell
        goals = {row["target"] for row in cells[key] if row is not None and row.get("target")}
        for row in cells[key]:
            if row is None or row["speedup"] is None:
                line += ["-", "-"]
                continue
            mark = ""
            if row.get("target"):
                mark = " ✓" if row["target_met"] else " ✗"
                if len(goals) > 1:
                    mark += f" ({row['target']})"
            line += [f"{row['embedops_us'] / 1e3:.2f}", f"{row['speedup']:.2f}×{mark}"]
        line.append(goals.pop() if len(goals) == 1 else "per run" if goals else "")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from e
    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(report: dict, out_dir: str) -> list[str]:
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    families = sorted({r["family"] for r in report["results"]})
    for family in families:
        rows = [r for r in report["results"] if r["family"] == family and r["speedup"]]
        if not rows:
            continue
        labels = [f"{r['case']} [{r['shapes']}]\nvs {r['baseline']}" for r in rows]
        speed = [r["speedup"] for r in rows]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
        colors = ["tab:green" if s >= 1 else "tab:red" for s in speed]
        ax.barh(range(len(rows)), speed, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup of embedops over the baseline (×, log scale)")
        ax.set_title(f"{family} — {report['device_name']}", fontsize=9)
        paths.append(_save(plt, fig, os.path.join(out_dir, f"{family}_{report['device']}.png")))
    return paths


def _level_label(report: dict) -> str:
    lvl = (report.get("cpu_level") or {}).get("embedops")
    return f"{report['device']} {lvl}" if report["device"] == "cpu" and lvl else report["device_name"]


def plot_levels(reports: list[dict], out_dir: str) -> list[str]:
    """One PNG per family comparing several runs (CPU levels, or CPU vs GPU): per case, one bar of
    speedup over its baseline per run. ``reports``: loaded ``--json`` files."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    labels = [_level_label(r) for r in reports]
    paths = []
    families = sorted({row["family"] for r in reports for row in r["results"]})
    for family in families:
        keys = []  # (case, shapes, baseline) in first-seen order
        speed: dict[tuple, list] = {}
        for i, r in enumerate(reports):
            for row in r["results"]:
                if row["family"] != family or not row["speedup"]:
                    continue
                key = (row["case"], row["shapes"], row["baseline"])
                if key not in speed:
                    keys.append(key)
                    speed[key] = [None] * len(reports)
                speed[key][i] = row["speedup"]
        if not keys:
            continue
        n, width = len(reports), 0.8 / len(reports)
        fig, ax = plt.subplots(figsize=(10, 0.5 * len(keys) * max(1, n / 2) + 1.8))
        for i, label in enumerate(labels):
            ys = [j + (i - (n - 1) / 2) * width for j in range(len(keys))]
            xs = [speed[key][i] or 0 for key in keys]
            ax.barh(ys, xs, height=width, label=label)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(keys)), [f"{c} [{sh}]\nvs {b}" for c, sh, b in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup of embedops over the baseline (×, log scale; > 1: embedops faster)")
        ax.set_title(f"{family}: {', '.join(labels)}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        paths.append(_save(plt, fig, os.path.join(out_dir, f"{family}_levels.png")))
    return paths

