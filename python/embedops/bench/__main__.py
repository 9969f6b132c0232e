"""CLI: python -m embedops.bench [families...] [--device cpu|cuda] [--quick] [--only I,J] [--json PATH] [--plot DIR]"""

from __future__ import annotations

import argparse
import sys

import torch

from . import FAMILIES, load_family
from .core import plot, print_table, run, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m embedops.bench",
        description="Check embedops against its baselines, then time both side by side.")
    p.add_argument("families", nargs="*", metavar="family", help=f"any of {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes and shorter timing (< 2 min on 2 cores)")
    p.add_argument("--json", metavar="PATH", help="write the results (with date, device, torch, build info) here")
    p.add_argument("--plot", metavar="DIR", help="write one PNG chart of speedups per family here")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--only", metavar="I[,J...]",
                   help="run only these cases of each family, by 0-based position in its case list")
    args = p.parse_args(argv)

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
    report = run(selected, args.device, args.quick)
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
