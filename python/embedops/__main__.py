"""``python -m embedops info``: print how embedops was built."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedops")
    parser.add_argument("command", choices=["info"], help="info: print build information")
    parser.parse_args(argv)
    import torch

    import embedops

    info = embedops.build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"{'torch_runtime':<{width}}  {torch.__version__}")
    from embedops.integrations import available

    found = available()
    listed = ", ".join(f"{name} ({'importable' if ok else 'not installed'})" for name, ok in found.items())
    print(f"{'integrations':<{width}}  {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
