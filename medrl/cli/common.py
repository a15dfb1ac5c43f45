"""What every command group of the CLI shares: the config arguments and loading them."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config PRESET`` and ``key.sub=value`` overrides."""
    p.add_argument("--config", "-c", default=None, help="YAML preset (configs/demo.yaml, ...)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides applied after the preset, e.g. finetune.steps=100 run.name=try1",
    )


def config_of(args: argparse.Namespace):
    """The config that a command's ``--config`` and overrides resolve to."""
    from medrl.config import load_config

    return load_config(args.config, args.overrides)
