"""Does the RL loop learn at the demo's budget? Held-out reward per iteration, medrl's
defaults against DDPO's published ones, measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/rl_learning.py                  # ~5 min on 2 CPU cores
    python benchmarks/rl_learning.py --seeds 0,1,2,3,4 --control        # + a no-signal run
    python benchmarks/rl_learning.py --only dpo,control --control-of dpo \
        --config dpo="rl.algorithm=dpo rl.dpo_beta=200"                  # another learner

The generator is the RL tests' one (tests/rl/conftest.py: 32 px demo model, VAE trained
120 steps on phantoms, UNet untrained), built once into --generator. Each run is the
single-process loop (rl.loop.run_local: one Sampler, the spatial
reward, Learner), 4 training prompts x 8 images per iteration, and evaluates 16 images
of held-out prompts with fixed seeds before every iteration and after the last. The
table in docs/rl.md ("Defaults that learn") comes from this script.

Settings compared (``--config NAME="k=v k=v"`` adds more):

- ``medrl``: rl.* defaults (lr 5e-3, clip 0.2, adv clip 5, 4 optimizer steps of 8
  images per iteration, one pass, DDIM steps with sigma_t >= 0.05; LoRA on attention and
  resnet convolutions);
- ``ddpo``: DDPO's published defaults (trl 0.23 DDPOConfig: lr 3e-4, clip 1e-4, adv clip
  5, one pass, every DDIM step), on the same LoRA, with one optimizer step per iteration
  (32 images): DDPO takes one per 256 images, so this gives it 8x more steps than it
  would take;
- ``--control``: medrl's settings (or ``--control-of NAME``'s) with the training rewards
  replaced by uniform random numbers (the evaluation still scores the spatial reward): how
  far the held-out reward drifts without a learning signal;
- ``--reverse``: the same setting with the training reward reversed, 1 - r, and the gate
  applied to the reversed reward (``spatial:0.51`` then keeps r <= 0.49): a learner that
  follows its reward moves the held-out (unreversed) reward down.

``--generator generators/assets/demo-base`` with ``model.resolution=64 data.demo_size=64``
in the setting runs the demo's shipped base (a trained UNet) instead of the fixture;
``{selector}`` in a setting is replaced by a tiny random quality selector built for the run
(tests/rl/conftest.py: feature_align's expert in the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.rl.conftest import (  # noqa: E402
    EVAL_PROMPTS,
    PROMPTS,
    ReversedTrainingRewards,
    build_rl_generator,
    build_tiny_selector,
    rl_config,
)

DEFAULT_BATCH = ["rl.prompts_per_iteration=4", "rl.group_size=8", "rl.micro_batch=8"]
CONFIGS = {
    "medrl": ["rl.lr=5e-3"],  # the code's default (the demo preset sets its own rl.lr)
    "ddpo": [
        "rl.lr=3e-4",
        "rl.clip_range=1e-4",
        "rl.adv_clip=5",
        "rl.inner_epochs=1",
        "rl.updates_per_epoch=1",
        "rl.min_noise_std=0",
    ],
}


class RandomTrainingRewards:
    """The reward with its training scores replaced by uniform random numbers, and which
    training samples pass the gate shuffled (as many pass, chosen at random), so a gated
    learner (filter_retrain) gets no signal either."""

    def __init__(self, inner, seed: int):
        self.inner, self.gen = inner, torch.Generator().manual_seed(seed)
        self.shuffle = torch.Generator().manual_seed(seed + 1_000_003)

    def score(self, images, prompts, ids):
        result = self.inner.score(images, prompts, ids)
        train = [sid for sid in result.scores if not sid.startswith("eval")]
        passed = [result.scores[sid].passed for sid in train]
        order = torch.randperm(len(train), generator=self.shuffle).tolist()
        for k, sid in enumerate(train):
            r = float(torch.rand((), generator=self.gen))
            s = result.scores[sid]
            result.scores[sid] = replace(s, reward=r, quality=r, passed=passed[order[k]])
        return result


def run_once(gen_dir: Path, work: Path, overrides: list[str], seed: int, iterations: int,
             eval_images: int, control: str = "") -> list[float]:  # fmt: skip
    from rewards.scorers import build_reward
    from rl.loop import run_local

    cfg = rl_config(
        work, f"run.name=s{seed}", f"run.seed={seed}", f"rl.iterations={iterations}",
        *DEFAULT_BATCH, *overrides,
    )  # fmt: skip
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    reward = build_reward(cfg.rl.reward, cfg.rewards)
    if control == "random":
        reward = RandomTrainingRewards(reward, seed)
    elif control == "reverse":
        reward = ReversedTrainingRewards(reward)
    inputs = {
        "run_dir": str(cfg.run_dir),
        "generator_dir": str(gen_dir),
        "train_prompts": PROMPTS,
        "eval_prompts": (EVAL_PROMPTS * eval_images)[:eval_images],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        records, _ = run_local(cfg, inputs, reward, learner_seed=seed)
    return [r["eval_reward"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="", help="generator dir; empty: build one")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds, comma-separated")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=16)
    parser.add_argument("--control", action="store_true", help="add the random-reward run")
    parser.add_argument("--reverse", action="store_true", help="add the reversed-reward run")
    parser.add_argument(
        "--control-of",
        default="medrl",
        metavar="NAME",
        help="the setting the control and reversed runs use",
    )
    parser.add_argument("--only", default="", help="run only these settings (comma-separated)")
    parser.add_argument(
        "--config", action="append", default=[], metavar='NAME="k=v ..."',
        help="another setting to compare: a name and config overrides",
    )  # fmt: skip
    args = parser.parse_args()
    os.chdir(ROOT)  # rl_config reads configs/demo.yaml
    torch.set_num_threads(1)
    configs = dict(CONFIGS)
    for item in args.config:
        name, _, overrides = item.partition("=")
        configs[name] = overrides.split()
    runs = [(name, ov, "") for name, ov in configs.items()]
    if args.control:
        runs.append(("control", configs[args.control_of], "random"))
    if args.reverse:
        runs.append(("reverse", configs[args.control_of], "reverse"))
    if args.only:
        runs = [r for r in runs if r[0] in args.only.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    work = Path(tempfile.mkdtemp(prefix="rl_learning."))
    if any("{selector}" in o for _, ov, _ in runs for o in ov):  # feature_align's expert
        selector = str(build_tiny_selector(work / "selector"))
        runs = [(n, [o.replace("{selector}", selector) for o in ov], c) for n, ov, c in runs]
    gen_dir = Path(args.generator) if args.generator else None
    if gen_dir is None or not (gen_dir / "model_index.json").is_file():
        t0 = time.perf_counter()
        root = gen_dir.parent if gen_dir else work / "gen"
        root.mkdir(parents=True, exist_ok=True)
        gen_dir = build_rl_generator(root)
        print(f"built the test generator in {time.perf_counter() - t0:.0f} s: {gen_dir}")

    gains: dict[str, list[float]] = {}
    print(f"held-out spatial reward, {args.eval_images} images, before each iteration")
    for name, overrides, control in runs:
        for seed in seeds:
            t0 = time.perf_counter()
            evals = run_once(
                gen_dir, work / name, overrides, seed, args.iterations, args.eval_images, control
            )
            gain = evals[-1] - evals[0]
            gains.setdefault(name, []).append(gain)
            curve = " ".join(f"{e:.4f}" for e in evals)
            print(
                f"{name:>8} seed {seed}: {curve}  gain {gain:+.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    print("\n| setting | gain per seed | mean | sd |\n| --- | --- | --- | --- |")
    for name, g in gains.items():
        sd = statistics.stdev(g) if len(g) > 1 else float("nan")
        per = ", ".join(f"{x:+.4f}" for x in g)
        print(f"| {name} | {per} | {statistics.mean(g):+.4f} | {sd:.4f} |")
    if "medrl" in gains and "ddpo" in gains:
        ours, theirs = statistics.mean(gains["medrl"]), statistics.mean(gains["ddpo"])
        ratio = f"{ours / theirs:.0f}x" if theirs > 0 else "n/a (DDPO's defaults did not gain)"
        print(f"\nmean gain, medrl defaults / DDPO defaults: {ratio}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
