"""``medrl rewards``, ``medrl rl`` and ``medrl tune``: reward models, the RL loop, sweeps."""

from __future__ import annotations

import argparse
from pathlib import Path

from medrl.cli.common import add_config_args, config_of


def cmd_rewards_train(args: argparse.Namespace) -> int:
    from rewards.training import train_rewards
    from rewards.training_report import format_report

    cfg = config_of(args)
    ratings = args.ratings or cfg.rewards.ratings_db
    out = Path(args.out) if args.out else cfg.run_dir / "rewards"
    images_root = args.images_root or cfg.rewards.images_root or None
    report = train_rewards(ratings, images_root, out, cfg.rewards, device=cfg.run.device)
    print(format_report(report))
    print(f"reward models and report.json in {out}")
    return 0


def cmd_rewards_serve(args: argparse.Namespace) -> int:
    from rewards.http import serve_rewards

    cfg = config_of(args)
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
    from medrl.runs import open_run, print_proxy_and_gold
    from rl.inputs import resolve_inputs
    from rl.records import eval_curve

    cfg = config_of(args)
    resolve_inputs(cfg)  # a missing generator, reward or prompts fails before Ray starts
    with open_run(cfg) as run_dir:  # a second driver on this run directory is refused
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
    from medrl.runs import open_run
    from rl.inputs import resolve_inputs

    cfg = config_of(args)
    parse_space(cfg.tune.space)  # a bad search space fails before Ray starts
    inputs = resolve_inputs(cfg)  # so do a missing generator, reward or prompts
    # trials rebuild their config from the same preset and overrides; they keep this
    # working directory (cluster.tune sets RAY_CHDIR_TO_TRIAL_DIR=0), so relative paths hold
    out = run_tune(
        cfg,
        make_config=functools.partial(load_config, args.config),
        prepare=open_run,
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``rewards``, ``rl`` and ``tune`` commands."""
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
    add_config_args(p)
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
    add_config_args(p)
    p.set_defaults(func=cmd_rewards_serve)

    rl = sub.add_parser("rl", help="RL from expert feedback (DDPO on Ray)").add_subparsers(
        dest="rl_command", required=True
    )
    p = rl.add_parser(
        "train",
        help="improve a generator's LoRA adapter against the reward (samplers, reward "
        "service and DeepSpeed learner on Ray; dashboard on 127.0.0.1)",
    )
    add_config_args(p)
    p.set_defaults(func=cmd_rl_train)

    p = sub.add_parser(
        "tune",
        help="Ray Tune sweep over the RL loop (ASHA; tune.space, configs/sweep.yaml): "
        "results.csv and best.yaml",
    )
    add_config_args(p)
    p.set_defaults(func=cmd_tune)
