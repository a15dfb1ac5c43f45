"""The `medrl` command line: one subcommand per step of the pipeline.

Heavy imports (torch, diffusers, ray) happen inside the subcommands, so
``medrl --help`` and the data tools answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medrl.cli import data, generator, jobs, learning, ratings, reports


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each group of commands adds its own parsers."""
    parser = argparse.ArgumentParser(
        prog="medrl", description="RL from expert feedback for medical image diffusion models"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data.add_parsers(sub)
    generator.add_parsers(sub)
    reports.add_parsers(sub)
    ratings.add_parsers(sub)
    learning.add_parsers(sub)
    jobs.add_parsers(sub, parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from generators.csv_rows import DataValidationError
    from medrl.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except DataValidationError as exc:  # every bad row, by CSV line
        print(exc.render(), file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"medrl: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"medrl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
