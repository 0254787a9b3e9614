"""The `specdec` command: one module per subcommand, the shared flags in `options`."""

from __future__ import annotations

import argparse
import logging
import sys

from specdec.cli import bench, convert, distill, generate, serve
from specdec.cli import eval as eval_command
from specdec.errors import SpecdecError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative-decoding inference server.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    distill.add_parsers(sub)
    convert.add_parser(sub)
    eval_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The server logs at INFO (one structured line per request); other commands only warn.
    level = logging.INFO if args.verbose or args.command == "serve" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except SpecdecError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2
