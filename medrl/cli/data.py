"""``medrl data``: ingest a data CSV, convert public labels, the phantom dataset and grid."""

from __future__ import annotations

import argparse


def cmd_data_ingest(args: argparse.Namespace) -> int:
    from generators.datasets import ingest_csv

    report = ingest_csv(args.csv, root=args.root, out=args.out)
    print(f"{report.rows} rows valid; manifest written to {report.manifest}")
    for key, count in sorted(report.modalities.items()):
        print(f"  {key}: {count}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from generators.converters import convert_labels

    out = convert_labels(
        args.dataset,
        args.labels,
        out=args.out,
        image_dir=args.image_dir,
        ext=args.ext,
        split=args.split,
    )
    print(f"wrote {out}")
    return 0


def cmd_data_phantom_grid(args: argparse.Namespace) -> int:
    from generators.images import save_png
    from generators.phantom_dataset import grid_figure

    grid = grid_figure(args.size, args.count, args.seed, args.cols)
    if args.bits < 8:  # drop low bits (and spread the kept ones over 0..255)
        kept = grid & ((0xFF << (8 - args.bits)) & 0xFF)
        grid = kept | (kept >> args.bits)
    path = save_png(grid, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    from generators.phantom_dataset import write_demo_dataset

    csv = write_demo_dataset(
        args.out, count=args.count, size=args.size, seed=args.seed, val_fraction=args.val_fraction
    )
    print(f"phantom dataset: {csv} (ground truth beside it in phantom.jsonl)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``data`` commands."""
    data = sub.add_parser("data", help="data in: validate, convert, demo phantom").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("ingest", help="validate a data CSV and write a Parquet manifest")
    p.add_argument(
        "csv", help="CSV with path,Text,modality[,split,source_dataset,label,laterality,patient_id]"
    )
    p.add_argument("--root", default=None, help="dataset root (default: the CSV's directory)")
    p.add_argument("--out", default=None, help="manifest path (default: <root>/manifest.parquet)")
    p.set_defaults(func=cmd_data_ingest)

    p = data.add_parser("convert", help="turn a public fundus dataset's labels into a data CSV")
    p.add_argument("dataset", choices=["eyepacs", "aptos", "idrid", "odir", "messidor2", "airogs"])
    p.add_argument(
        "labels", help="the dataset's label file (CSV; IDRiD/ODIR/Messidor-2 as distributed)"
    )
    p.add_argument("--out", default=None, help="output CSV (default: data.csv beside the labels)")
    p.add_argument("--image-dir", default="", help="image folder relative to the dataset root")
    p.add_argument("--ext", default=None, help="image file extension when the labels omit it")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.set_defaults(func=cmd_data_convert)

    p = data.add_parser("demo", help="write the procedural fundus phantom dataset")
    p.add_argument("out", help="output directory")
    p.add_argument("--count", type=int, default=384)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.set_defaults(func=cmd_data_demo)
    p = data.add_parser(
        "phantom-grid", help="a labelled grid of phantom images covering DR grades 0-4 (PNG)"
    )
    p.add_argument("out", help="output PNG")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cols", type=int, default=None, help="columns (default: 8 for small images, 3 for large)"
    )
    p.add_argument(
        "--bits",
        type=int,
        default=8,
        choices=range(4, 9),
        help="bits kept per channel (6 makes a 512 px figure ~1/3 smaller, no visible change)",
    )
    p.set_defaults(func=cmd_data_phantom_grid)
