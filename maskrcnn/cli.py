"""Command line entry point: ``maskrcnn <command>``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskrcnn", description="Mask R-CNN in plain PyTorch.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="run the demo (until the full pipeline lands: an operator smoke check)")
    args = parser.parse_args(argv)
    if args.version:
        from maskrcnn import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        from maskrcnn.demo import run_demo

        return run_demo()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
