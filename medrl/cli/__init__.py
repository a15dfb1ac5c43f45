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


def one_line(exc: BaseException) -> str:
    """An error as one line: a learner's failure by its lowest failed rank's own error
    (Ray Train's ``WorkerGroupError`` carries every rank's traceback in its text); else
    the message's lines joined, or only its last line when it holds a traceback."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank]
        return f"learner rank {rank} failed: {type(inner).__name__}: {one_line(inner)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. Every error ends in one line on stderr naming
    the file, row or key (exit 2 for bad input, 1 for a failed run); ``-v`` shows the
    traceback of an unexpected one."""
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
        print(f"medrl: config error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a missing, unreadable or bad input file or value
        print(f"medrl: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medrl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        name = type(exc).__name__
        print(f"medrl: {name}: {one_line(exc)} (-v shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
