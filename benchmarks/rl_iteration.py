"""Time per RL iteration: the Ray loop against a single-process loop doing the same work.

Both run :func:`rl.loop.run_iterations` on the same config, generator, prompts and reward,
for the same number of iterations, one after the other in this run:

- ray: ``run_rl`` as ``medrl rl train`` runs it: a local Ray, ``rl.num_samplers`` sampler
  actors, a reward service actor, one Ray Train worker holding the DeepSpeed learner
  (rank 0 draws, scores and broadcasts through the actors);
- local: one process, :class:`rl.samplers.Sampler`, the reward object and the
  :class:`rl.learner.Learner` called directly (``LocalBackend``).

An iteration's time is the ``seconds`` of its metrics record (from the end of the
previous iteration to the end of this one: evaluation images, drawing, scoring,
training, checkpoint, reporting). The first iteration of each path is a warm-up and not
counted. Start-up (Ray, actors, Ray Train workers) is printed separately: it is paid once
per run, not per iteration.

    python benchmarks/rl_iteration.py [--iterations 4] [--threads 1] [--generator DIR] \
        [--no-dashboard] [key.sub=value ...]

Without ``--generator`` a randomly initialised generator is built from ``model.*`` of
the config (time does not depend on the weights). The reward defaults to ``spatial``
(a pixel reward: the loop's cost, not a reward model's, is measured). Prints the median
seconds per iteration of both paths and their ratio ray / local; the orchestration
should cost under 15 % on a 2-core machine (ratio < 1.15).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROMPTS = [
    f"colour fundus photograph, {eye} eye, {grade} diabetic retinopathy"
    for eye in ("left", "right")
    for grade in ("no", "mild", "moderate", "severe")
]


def _seconds(records: list[dict]) -> list[float]:
    return [float(r["seconds"]) for r in records if r.get("stage_n", 0) != 0 and "seconds" in r]


def run_ray(cfg) -> tuple[list[float], float]:
    from cluster.driver import run_rl

    t0 = time.perf_counter()
    out = run_rl(cfg)
    wall = time.perf_counter() - t0
    return _seconds(out["records"]), wall


def run_local(cfg, threads: int) -> tuple[list[float], float]:
    from rl.inputs import resolve_inputs
    from rl.loop import run_local

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    records, _ = run_local(cfg, resolve_inputs(cfg))
    wall = time.perf_counter() - t0
    return _seconds(records), wall


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--iterations", type=int, default=4, help="per path; the first is warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local loop")
    ap.add_argument("--generator", default=None, help="generator dir (default: a random one)")
    ap.add_argument(
        "--no-dashboard", action="store_true", help="start the local Ray without its dashboard"
    )
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args()
    if args.iterations < 2:
        ap.error("--iterations must be >= 2 (the first is a warm-up)")
    if args.no_dashboard:
        os.environ["MEDRL_RAY_DASHBOARD"] = "0"

    from medrl.config import load_config
    from medrl.runs import prepare_run_dir

    with tempfile.TemporaryDirectory(prefix="medrl-bench-rl-") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        base = [
            "rl.reward=spatial",
            *args.overrides,
            f"rl.iterations={args.iterations}",
            f"rl.prompts_file={prompts}",
            f"run.root={tmp / 'runs'}",
        ]
        cfg = load_config(args.config, base)
        generator = args.generator
        if generator is None:
            from generators.model import build_generator

            generator = str(build_generator(cfg.model, seed=0).save(tmp / "generator"))
        base.append(f"rl.generator={generator}")
        ray_cfg = load_config(args.config, [*base, "run.name=bench-ray"])
        local_cfg = load_config(args.config, [*base, "run.name=bench-local"])
        rl = ray_cfg.rl
        print(
            f"RL iteration benchmark: {rl.iterations} iterations of "
            f"{rl.prompts_per_iteration} prompts x {rl.group_size} images "
            f"(+{rl.eval_prompts} eval), {ray_cfg.sampling.num_steps} DDIM steps, "
            f"{ray_cfg.model.resolution} px; ray: {rl.num_samplers} samplers, "
            f"{ray_cfg.rewards.service_replicas} reward service, {rl.learner_workers} learner "
            f"worker(s); local: {args.threads} thread(s); {os.cpu_count()} CPUs",
            flush=True,
        )
        # Ray first: the local learner sets torch.distributed env vars in this process
        prepare_run_dir(ray_cfg)
        ray_s, ray_wall = run_ray(ray_cfg)
        prepare_run_dir(local_cfg)
        local_s, local_wall = run_local(local_cfg, args.threads)

    ray_med = statistics.median(ray_s[1:])
    local_med = statistics.median(local_s[1:])
    print("\nseconds per iteration (first = warm-up, not counted):")
    print(f"  ray:   {' '.join(f'{s:.2f}' for s in ray_s)}")
    print(f"  local: {' '.join(f'{s:.2f}' for s in local_s)}")
    print(
        f"start-up and tail: ray {ray_wall - sum(ray_s):.1f} s, local "
        f"{local_wall - sum(local_s):.1f} s (once per run)"
    )
    print(f"median s/iteration: ray {ray_med:.2f}, local {local_med:.2f}")
    print(f"ratio ray / local: {ray_med / local_med:.3f} (orchestration target: < 1.15)")


if __name__ == "__main__":
    main()
