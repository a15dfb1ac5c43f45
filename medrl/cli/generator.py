"""``medrl finetune``, ``generate`` and ``export``: the generator and its adapters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medrl.cli.common import add_config_args, config_of


def cmd_finetune(args: argparse.Namespace) -> int:
    from medrl.runs import finetune_run

    result = finetune_run(config_of(args))
    print(f"fine-tuned generator: {result}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from generators.generate import generate_from_cli

    cfg = config_of(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts.extend(line.strip() for line in lines if line.strip())
    if not prompts:
        print(
            "medrl generate: give --prompt TEXT (repeatable) or --prompts-file FILE",
            file=sys.stderr,
        )
        return 2
    table = generate_from_cli(
        cfg,
        prompts,
        num_per_prompt=args.num_per_prompt,
        seed=args.seed,
        out=args.out,
        generator_dir=args.generator,
        adapter=args.adapter,
    )
    print(f"{len(prompts) * args.num_per_prompt} images; table: {table}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from generators.lora import export_run_adapter

    paths = export_run_adapter(
        args.adapter, args.out, formats=args.format, generator=args.generator
    )
    for p in paths:
        print(f"wrote {p}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``finetune``, ``generate`` and ``export`` commands."""
    p = sub.add_parser("finetune", help="supervised fine-tuning of the generator on a manifest")
    add_config_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="sample images: PNGs plus a Parquet row per image")
    add_config_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument(
        "--seed", type=int, default=0, help="first seed; image i of a prompt gets seed+i"
    )
    p.add_argument("--out", default=None, help="output dir (default: runs/<name>/samples)")
    p.add_argument(
        "--generator", default=None, help="generator dir (default: runs/<name>/generator)"
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="LoRA adapter dir or .safetensors to apply, e.g. runs/<name>/rl/best (what "
        "fine-tuning learned is part of the run's generator already)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export a LoRA adapter (diffusers and/or kohya format)")
    p.add_argument("adapter", help="adapter directory or pytorch_lora_weights.safetensors")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format", action="append", choices=["diffusers", "kohya"], help="repeatable; default both"
    )
    p.add_argument(
        "--generator",
        default=None,
        help="generator dir the adapter is for (runs/<name>/generator): refuse an adapter "
        "that does not load into it completely",
    )
    p.set_defaults(func=cmd_export)
