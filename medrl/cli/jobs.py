"""``medrl submit`` and ``medrl demo``: a command as a Ray job, and the whole path on the default."""

from __future__ import annotations

import argparse
import sys

from medrl.cli.common import add_config_args, config_of


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
        args.root_parser.parse_args(job_args)
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
            allow_insecure_token=args.allow_insecure_token,
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

    run_demo(config_of(args))
    return 0


def add_parsers(sub: argparse._SubParsersAction, root: argparse.ArgumentParser) -> None:
    """The ``submit`` and ``demo`` commands; submit checks its command with ``root``."""
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
    p.add_argument(
        "--allow-insecure-token",
        action="store_true",
        help="send the token over plain http to a host other than this machine (refused "
        "otherwise: use a tunnel to 127.0.0.1 or https)",
    )
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the medrl command")
    p.set_defaults(func=cmd_submit, root_parser=root)

    p = sub.add_parser("demo", help="the whole path on the embedded default (phantom data, CPU)")
    add_config_args(p)
    p.set_defaults(func=cmd_demo)
