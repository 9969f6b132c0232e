"""CLI: python -m embedops.bench [families...] [--device cpu|cuda] [--quick] [--only I,J] [--json PATH]
[--plot DIR] [--cpu-capability default|avx2|avx512]
python -m embedops.bench --plot-from A.json B.json --plot DIR   (chart saved runs side by side)
python -m embedops.bench --table-from A.json B.json [--all-rows]   (the same as a Markdown table)"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from . import FAMILIES, load_family
from .core import markdown_table, plot, plot_levels, print_table, run, write_json


# What --cpu-capability sets before torch, MKL, oneDNN and faiss load: the embedops level AND the
# baselines capped to the same instruction set, so that an AVX-512 machine measures the AVX2 path
# the way an AVX2-only machine runs it (torch's kernels, MKL's GEMM, oneDNN, faiss's SIMD level:
# FAISS_OPT_LEVEL picks the module of a faiss with one module per level, FAISS_SIMD_LEVEL the
# dispatched level of a faiss built with dynamic dispatch, as faiss-cpu 1.15 is; FBGEMM's kernels,
# torch's EmbeddingBag and fbgemm_gpu's TBE, read FBGEMM_ENABLE_INSTRUCTIONS, which has no
# read-back). On AMD CPUs MKL takes its AVX2 path at every level (its GEMM rate here is the same
# with and without the cap), and Zen 4 runs AVX-512 at the FLOP rate of AVX2.
CPU_LEVEL_ENV = {
    "default": {"EMBEDOPS_CPU_CAPABILITY": "default", "ATEN_CPU_CAPABILITY": "default",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "FAISS_OPT_LEVEL": "generic", "FAISS_SIMD_LEVEL": "NONE"},
    "avx2": {"EMBEDOPS_CPU_CAPABILITY": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "FAISS_OPT_LEVEL": "avx2", "FAISS_SIMD_LEVEL": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"EMBEDOPS_CPU_CAPABILITY": "avx512", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "FAISS_OPT_LEVEL": "avx512",
               "FAISS_SIMD_LEVEL": "AVX512", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"},
}
_CHILD = "EMBEDOPS_BENCH_CPU_LEVEL"


def cpu_level_report() -> dict:
    """The instruction set each side actually runs with (read back, not assumed)."""
    import embedops

    faiss_level = None
    try:
        import faiss

        if hasattr(faiss, "SIMDConfig"):  # dynamic dispatch: the level in use
            faiss_level = faiss.SIMDConfig.get_level_name()
        else:  # one module per level: the one loaded
            loaded = sorted(m for m in sys.modules if m.startswith("faiss.swigfaiss"))
            faiss_level = loaded[-1] if loaded else "unknown"
    except ImportError:
        pass
    return {"embedops": embedops.build_info()["cpu_capability"],
            "torch": torch.backends.cpu.get_cpu_capability(),
            "faiss": faiss_level,
            "env": {k: os.environ.get(k) for k in CPU_LEVEL_ENV["avx2"]}}


def check_cpu_level(level: str, rep: dict) -> list[str]:
    want_torch = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}[level]
    problems = []
    if rep["embedops"] != level:
        problems.append(f"embedops runs at {rep['embedops']}, not {level}")
    if rep["torch"] != want_torch:
        problems.append(f"torch runs at {rep['torch']}, not {want_torch}")
    if rep["faiss"] is not None:
        want = {"default": ("NONE", "faiss.swigfaiss"), "avx2": ("AVX2", "faiss.swigfaiss_avx2"),
                "avx512": ("AVX512", "faiss.swigfaiss_avx512")}[level]
        if rep["faiss"] not in want:
            problems.append(f"faiss runs at {rep['faiss']}, not {want[0]}")
    return problems


def _load_reports(paths: list[str]) -> list[dict]:
    import json

    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m embedops.bench",
        description="Check embedops against its baselines, then time both side by side.")
    p.add_argument("families", nargs="*", metavar="family", help=f"any of {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes and shorter timing (< 2 min on 2 cores)")
    p.add_argument("--json", metavar="PATH", help="write the results (with date, device, torch, build info) here")
    p.add_argument("--plot", metavar="DIR", help="write one PNG chart of speedups per family here")
    p.add_argument("--plot-from", metavar="JSON", nargs="+",
                   help="run nothing: chart these --json results side by side (e.g. one per CPU level) "
                        "into the --plot DIR")
    p.add_argument("--table-from", metavar="JSON", nargs="+",
                   help="run nothing: print these --json results side by side as a Markdown table (per run: "
                        "embedops ms and speedup, ✓ / ✗ against the target), the rows with a target")
    p.add_argument("--all-rows", action="store_true", help="--table-from: every row, not only those with a target")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--only", metavar="I[,J...]",
                   help="run only these cases of each family, by 0-based position in its case list")
    p.add_argument("--cpu-capability", choices=sorted(CPU_LEVEL_ENV),
                   help="run embedops at this CPU level and cap torch / MKL / oneDNN / faiss to the same "
                        "instruction set (re-runs the bench in a fresh process with those variables set)")
    args = p.parse_args(argv)
    if args.table_from:
        table = markdown_table(_load_reports(args.table_from), all_rows=args.all_rows)
        print(table)
        if table.count("\n") < 2:
            print("(no row of these runs has a target: runs saved before 2026-12-08 did not record them; "
                  "--all-rows shows every row)", file=sys.stderr)
        return 0
    if args.plot_from:
        if not args.plot:
            p.error("--plot-from needs --plot DIR")
        for path in plot_levels(_load_reports(args.plot_from), args.plot):
            print(f"wrote {path}")
        return 0
    if args.cpu_capability and os.environ.get(_CHILD) != args.cpu_capability:
        env = dict(os.environ, **CPU_LEVEL_ENV[args.cpu_capability], **{_CHILD: args.cpu_capability})
        argv_child = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "embedops.bench", *argv_child], env=env)

    try:
        only = [int(i) for i in args.only.split(",")] if args.only else None
    except ValueError:
        p.error(f"--only: expected comma-separated case positions like 2,3, got {args.only!r}")
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    import embedops

    if args.device == "cuda" and not embedops.build_info()["cuda"]:
        p.error("--device cuda: this embedops build has no CUDA kernels (see python -m embedops info)")
    if args.threads:
        torch.set_num_threads(args.threads)

    selected = {}
    for name in args.families or FAMILIES:
        module = load_family(name)
        if module is None:
            print(f"(no benchmarks for {name} yet)", file=sys.stderr)
            continue
        builders = module.cases(args.device, args.quick)
        if only is not None:
            builders = [builders[i] for i in only if 0 <= i < len(builders)]
        selected[name] = builders
    level = cpu_level_report()
    if args.cpu_capability:
        problems = check_cpu_level(args.cpu_capability, level)
        level["requested"] = args.cpu_capability
        level["problems"] = problems
        for msg in problems:
            print(f"WARNING --cpu-capability {args.cpu_capability}: {msg}", file=sys.stderr)
    report = run(selected, args.device, args.quick)
    report["cpu_level"] = level
    print_table(report)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(report, args.plot):
            print(f"wrote {path}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
