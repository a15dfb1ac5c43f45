"""``medrl ratings``: the ratings store, the rating workbench, rating rounds, simulated raters."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medrl.cli.common import add_config_args, config_of


def _ratings_db(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    return config_of(args).rewards.ratings_db


def cmd_ratings_ingest(args: argparse.Namespace) -> int:
    from rewards.ratings import ingest_ratings

    # a rating sheet's image paths are stored relative to the root training will use
    images_root = args.images_root or config_of(args).rewards.images_root or None
    report = ingest_ratings(
        args.csv,
        _ratings_db(args),
        images_root=images_root,
        round_dir=args.round_dir,
        images_from=args.images_from,
    )
    print(report.summary())
    return 0


def cmd_ratings_export(args: argparse.Namespace) -> int:
    from rewards.ratings import export_ratings

    print(f"wrote {export_ratings(_ratings_db(args), args.out)}")
    return 0


def cmd_ratings_agreement(args: argparse.Namespace) -> int:
    from rewards.agreement import agreement_report, format_agreement
    from rewards.ratings import connect, read_ratings
    from rewards.workbench.queues import self_agreement

    db = _ratings_db(args)
    frame = read_ratings(db)
    if args.round is not None:
        frame = frame[frame["round"] == args.round]
        if frame.empty:
            raise ValueError(f"{db}: no ratings of round {args.round!r}")
    report = agreement_report(frame)
    conn = connect(db, readonly=True)
    try:
        report["self_agreement"] = self_agreement(conn, args.round)
    finally:
        conn.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_agreement(report))
    for s in report["self_agreement"]:
        print(
            f"  {s['rater']} (round {s['round']}): self-agreement {s['exact']:.0%} same rating "
            f"on {s['pairs']} repeated images, mean |difference| {s['mean_abs_diff']:.2f}"
        )
    return 0


def _workbench(args: argparse.Namespace, register: bool):
    from rewards.workbench.store import Workbench

    cfg = config_of(args)
    db = args.db or cfg.rewards.ratings_db
    return Workbench(
        db,
        args.round,
        protocol=getattr(args, "protocol", None),
        repeats=getattr(args, "repeats", None),
        seed=getattr(args, "seed", 0),
        images_root=cfg.rewards.images_root or None,
        register=register,
    )


def cmd_ratings_invite(args: argparse.Namespace) -> int:
    bench = _workbench(args, register=False)
    token = bench.invite(
        args.name, role="admin" if args.admin else "rater", expert_level=args.expert_level
    )
    page = "/admin" if args.admin else "/"
    print(f"{'admin' if args.admin else 'rater'} {args.name!r}, round {bench.round!r}:")
    print(f"  {args.url.rstrip('/')}{page}#token={token}")
    print("send this link to them only (it is shown once; inviting again replaces it)")
    return 0


def cmd_ratings_serve(args: argparse.Namespace) -> int:
    from rewards.workbench.app import serve

    bench = _workbench(args, register=True)
    print(
        f"round {bench.round!r} ({len(bench.images)} images, protocol {bench.protocol}, "
        f"{bench.repeats} repeats) on http://{args.host}:{args.port}/ ; raters: "
        f"{', '.join(bench.raters()) or 'none yet (medrl ratings invite NAME --round ...)'}"
    )
    serve(bench, host=args.host, port=args.port, allow_remote=args.allow_remote)
    return 0


def cmd_ratings_export_round(args: argparse.Namespace) -> int:
    from generators.finetune import require_merged
    from rewards.rounds import NO_ADAPTER, export_round, next_round_name, round_prompts

    cfg = config_of(args)
    run_dir = Path(args.run)
    if not run_dir.is_dir() and (Path(cfg.run.root) / args.run).is_dir():
        run_dir = Path(cfg.run.root) / args.run  # a run name
    generator_dir = Path(args.generator) if args.generator else run_dir / "generator"
    if not (generator_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{generator_dir}: no generator (run `medrl finetune` first)")
    if not args.generator:
        require_merged(run_dir)
    if args.adapter:
        adapters = [None if a == NO_ADAPTER else a for a in args.adapter]
    elif (run_dir / "rl" / "adapter").is_dir():
        adapters = [str(run_dir / "rl" / "adapter")]
    else:
        adapters = [None]
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()][: args.prompts]
    else:
        prompts = round_prompts(cfg.data.manifest_path, args.prompts, args.seed, args.split)
    rounds_dir = Path(args.out).parent if args.out else Path(_ratings_db(args)).parent / "rounds"
    name = args.round or (Path(args.out).name if args.out else next_round_name(rounds_dir))
    out = Path(args.out) if args.out else rounds_dir / name
    s = cfg.sampling
    sheet = export_round(
        generator_dir,
        prompts,
        out,
        round_name=name,
        adapters=adapters,
        per_prompt=args.per_prompt,
        num_steps=s.num_steps,
        eta=s.eta,
        guidance_scale=s.guidance_scale,
        batch_size=s.batch_size,
        seed=args.seed,
        modality=args.modality,
        device=cfg.run.device,
        dtype=cfg.model.dtype,
    )
    n = len(prompts) * args.per_prompt * len(adapters)
    shown = ", ".join(a or "no adapter" for a in adapters)
    print(f"round {name!r}: {n} images of {len(prompts)} prompts ({shown})")
    print(f"blind rating sheet: {sheet} with {out / 'images'}; hand the raters only these two")
    print(f"private key (do not share): {out / '.key.json'}")
    print(f"when filled: medrl ratings ingest {sheet}")
    return 0


def cmd_ratings_simulate(args: argparse.Namespace) -> int:
    from rewards.simulated import simulate_ratings, write_demo_pool

    if args.pool:
        path = write_demo_pool(
            args.images_dir,
            count=args.count,
            size=args.size,
            seed=args.seed,
            mismatch_fraction=args.mismatch_fraction,
            raters=args.raters,
            noise=args.noise,
        )
    else:
        path = simulate_ratings(
            args.images_dir,
            args.out,
            raters=args.raters,
            noise=args.noise,
            seed=args.seed,
            use_records=not args.from_pixels,
        )
    print(f"wrote {path} (SIMULATED expert ratings, not from people)")
    return 0


#: ``--db``'s help, the same for every command that opens the store.
DB_HELP = "SQLite ratings store (default: rewards.ratings_db of the config)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``ratings`` commands."""
    ratings = sub.add_parser(
        "ratings", help="expert ratings: ingest into SQLite, export, agreement, simulate"
    ).add_subparsers(dest="ratings_command", required=True)
    _store_parsers(ratings)
    _workbench_parsers(ratings)
    _round_parsers(ratings)


def _store_parsers(ratings: argparse._SubParsersAction) -> None:
    """ingest, export, agreement: the store."""
    p = ratings.add_parser("ingest", help="validate a ratings CSV and add it to the store")
    p.add_argument("csv", help="ratings CSV, or a filled rating sheet (its round key beside it)")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument(
        "--images-root",
        default=None,
        help="rating sheets and --images-from: store image paths relative to this "
        "(default: rewards.images_root, else the store's folder; absolute outside it)",
    )
    p.add_argument(
        "--images-from",
        default=None,
        help="the CSV's image paths are relative to this folder (a rating pool's); "
        "stored relative to --images-root",
    )
    p.add_argument(
        "--round-dir",
        default=None,
        help="the round folder of a filled sheet kept elsewhere (default: the CSV's folder "
        "when it holds the round key)",
    )
    add_config_args(p)
    p.set_defaults(func=cmd_ratings_ingest)
    p = ratings.add_parser("export", help="write the stored ratings to OUT (.csv or .parquet)")
    p.add_argument("out")
    p.add_argument("--db", default=None, help=DB_HELP)
    add_config_args(p)
    p.set_defaults(func=cmd_ratings_export)
    p = ratings.add_parser("agreement", help="inter-rater agreement (Krippendorff alpha, kappa)")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--round", default=None, help="only the ratings of this round")
    add_config_args(p)
    p.set_defaults(func=cmd_ratings_agreement)


def _workbench_parsers(ratings: argparse._SubParsersAction) -> None:
    """serve, invite: the rating workbench."""
    p = ratings.add_parser(
        "serve", help="the rating workbench: raters rate a round in their browser"
    )
    p.add_argument("--round", required=True, help="round folder (medrl ratings export-round)")
    p.add_argument(
        "--protocol",
        choices=["cs787", "aspects"],
        default=None,
        help="cs787: one 1-3 rating; aspects: 1-3 plus six aspects 0-10 (fixed at the "
        "round's first serve; default cs787)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="images each rater sees twice, for self-agreement (fixed at the first serve; "
        "default: a tenth of the round, at most 5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the raters' queue orders")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve on a non-loopback --host (plain HTTP: only behind your own TLS proxy)",
    )
    p.add_argument("--db", default=None, help=DB_HELP)
    add_config_args(p)
    p.set_defaults(func=cmd_ratings_serve)
    p = ratings.add_parser("invite", help="a personal link for a rater (or --admin) of a round")
    p.add_argument("name", help="the rater's id (stored as rater_id with every rating)")
    p.add_argument("--round", required=True, help="round folder")
    p.add_argument("--admin", action="store_true", help="a link to the progress page instead")
    p.add_argument("--expert-level", default="", help="stored as expert_level with the ratings")
    p.add_argument(
        "--url", default="http://127.0.0.1:8787", help="the address raters open (a tunnel's)"
    )
    p.add_argument("--db", default=None, help=DB_HELP)
    add_config_args(p)
    p.set_defaults(func=cmd_ratings_invite)


def _round_parsers(ratings: argparse._SubParsersAction) -> None:
    """export-round, simulate: rating rounds and simulated raters."""
    p = ratings.add_parser(
        "export-round",
        help="draw the run's samples into a blind rating sheet (a new rating round)",
    )
    p.add_argument("run", help="run directory (runs/<name>) or run name")
    p.add_argument(
        "--adapter",
        action="append",
        help="LoRA adapter to sample with (repeatable, 'none': the generator alone; "
        "default: <run>/rl/adapter, else none; fine-tuning is part of <run>/generator)",
    )
    p.add_argument("--generator", default=None, help="generator dir (default: <run>/generator)")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--prompts-file", default=None, help="prompts, one a line (default: manifest)")
    p.add_argument(
        "--split",
        choices=["all", "heldout", "train"],
        default="all",
        help="manifest prompts: held-out first then training (all), or one of them",
    )
    p.add_argument("--per-prompt", type=int, default=2, help="images per prompt and adapter")
    p.add_argument("--round", default=None, help="round name (default: round-N, the next free)")
    p.add_argument(
        "--out", default=None, help="round folder (default: rounds/<round> beside the store)"
    )
    p.add_argument("--modality", default="fundus", help="modality written in the sheet")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and sampling seeds")
    p.add_argument("--db", default=None, help=DB_HELP)
    add_config_args(p)
    p.set_defaults(func=cmd_ratings_export_round)
    p = ratings.add_parser(
        "simulate", help="SIMULATED expert ratings of phantom images (demo only)"
    )
    p.add_argument(
        "images_dir",
        help="folder with samples.parquet, pool.jsonl or a rating sheet (sheet.csv); "
        "with --pool: output folder",
    )
    p.add_argument("--pool", action="store_true", help="first write a phantom rating pool there")
    p.add_argument("--out", default=None, help="ratings CSV (default: IMAGES_DIR/ratings.csv)")
    p.add_argument("--count", type=int, default=480, help="--pool: number of phantoms")
    p.add_argument("--size", type=int, default=64, help="--pool: image side in pixels")
    p.add_argument(
        "--mismatch-fraction",
        type=float,
        default=0.5,
        help="--pool: share re-rated with a wrong prompt",
    )
    p.add_argument("--raters", type=int, default=1, help="number of simulated raters")
    p.add_argument("--noise", type=float, default=0.0, help="rater noise (0: deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-pixels", action="store_true", help="ignore phantom records; measure")
    p.set_defaults(func=cmd_ratings_simulate)
