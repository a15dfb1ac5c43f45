"""medrl against the reference kit's anchors, on the kit's fixed tiny model, in one process.

    python benchmarks/anchors.py [--reps 10] [--learner-reps 5] [--trl-results DIR] \
        [--kit DIR] [--threads 2] [--only sampler|learner] [--json FILE] \
        [--sampler-variants medrl,unmerged,compiled]

The model is the kit's (``benchmarks/anchor_model.py`` rebuilds it; with the kit present its
weights are checked against the kit's manifest): UNet 32/64 with cross-attention, 16x16
latents, 64 px, 10 DDIM steps, eta 1, CFG 5, batch 8, LoRA r4 on the attention projections.
Timed in this process, interleaved (who goes first alternates), after one warm-up each:

- **sampler**: medrl's :class:`rl.samplers.Sampler` (trajectory and per-step log-probs)
  against diffusers' plain ``StableDiffusionPipeline.__call__`` with the same LoRA;
  reported as medrl images/s over plain images/s, the median of the per-repetition ratios;
  ``--sampler-variants`` times several medrl settings against it in the same rounds
  (:data:`VARIANTS`; each one's first draw, with ``compile`` the compilation, apart);
- **learner**: :meth:`rl.learner.Learner.train` on one batch of 8 of medrl's samples with the
  kit's DDPO settings (8 samples x 10 timesteps, one AdamW step) against a plain DDPO step
  written on diffusers (one CFG UNet forward and backward per timestep, as trl 0.23.1's
  ``_train_batched_samples`` does); s per (sample x timestep), paired ratio.

trl 0.23.1 cannot share this environment: its figures come from the kit run in its own venv
(``setup.sh``, then ``bench_trl_epoch.py`` and ``bench_trl_sampling.py`` with
``ANCHOR_RESULTS_DIR=DIR``), read from ``--trl-results DIR``; medrl's learner over trl's is
then a ratio across processes (run the two back to back, alternating: docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchor_model as am  # noqa: E402

#: the kit beside the checkout (``../shared/anchors``) unless ``MEDRL_ANCHOR_KIT`` names it
KIT = Path(
    os.environ.get("MEDRL_ANCHOR_KIT") or Path(__file__).resolve().parents[2] / "shared/anchors"
)
SAMPLES_X_STEPS = am.BATCH * am.STEPS


def _lora_and_sampling(**options):
    """The kit's LoRA and sampling settings; ``options``: other ``sampling.*`` keys."""
    from generators.config import LoraConfig, SamplingConfig

    lora = LoraConfig(rank=am.LORA["r"], alpha=float(am.LORA["lora_alpha"]),
                      target_modules=tuple(am.LORA["target_modules"]), init="gaussian")  # fmt: skip
    sampling = SamplingConfig(
        num_steps=am.STEPS, eta=am.ETA, guidance_scale=am.GUIDANCE, batch_size=am.BATCH, **options
    )
    return lora, sampling


def plain_pipeline(gen_dir: Path):
    """diffusers' pipeline loaded as the kit loads it, with the kit's LoRA (seed 0)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig as PeftLoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(
        gen_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.unet.add_adapter(PeftLoraConfig(**am.LORA))
    return pipe


def medrl_sampler(gen_dir: Path, **options):
    """medrl's Sampler with the kit's LoRA (``options``: ``sampling.*`` keys such as
    ``merge_lora``, ``compile``); returns (sampler, draw) where draw() takes one batch of the
    kit's 8 prompts with trajectories and log-probs."""
    from generators.lora import get_adapter_state
    from rl.samplers import Sampler, SampleRequest

    lora, sampling = _lora_and_sampling(**options)
    sampler = Sampler(str(gen_dir), lora, sampling, device="cpu")
    state = [get_adapter_state(sampler.gen.unet)]
    calls = [0]

    def draw():
        calls[0] += 1
        requests = [
            SampleRequest(f"s{i}", p, 1000 * calls[0] + i) for i, p in enumerate(am.PROMPTS)
        ]
        return sampler.sample(requests, 0, state)

    return sampler, draw


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """One untimed warm-up each, then ``reps`` rounds, alternating who goes first."""
    import gc

    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
        print(f"  rep {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              file=sys.stderr, flush=True)  # fmt: skip
    return times


def paired(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


#: medrl sampler settings ``--sampler-variants`` can time: name -> ``sampling.*`` keys
VARIANTS = {
    "medrl": {},
    "unmerged": {"merge_lora": False},
    "compiled": {"compile": True},
}


def bench_sampler(gen_dir: Path, reps: int, variants: list[str]) -> dict:
    """Plain diffusers + LoRA and medrl's sampler with each of ``variants``
    (:data:`VARIANTS`), interleaved; each sampler's first draw (with ``compile``: the
    compilation) is timed on its own. The first variant's figures are also at the top."""
    pipe = plain_pipeline(gen_dir)
    gen = torch.Generator().manual_seed(0)

    def plain():
        with torch.no_grad():
            return pipe(prompt=am.PROMPTS, num_inference_steps=am.STEPS, guidance_scale=am.GUIDANCE,
                        eta=am.ETA, output_type="pt", generator=gen).images  # fmt: skip

    fns, out = {"plain": plain}, {}
    for name in variants:
        sampler, fns[name] = medrl_sampler(gen_dir, **VARIANTS[name])
        t0 = time.perf_counter()
        fns[name]()
        out[name] = {"options": {**VARIANTS[name], "compiled": sampler.compiled},
                     "first_draw_s": time.perf_counter() - t0}  # fmt: skip
    t = interleaved(fns, reps)
    for name in variants:
        out[name]["images_per_s"] = am.BATCH / statistics.median(t[name])
        # medrl images/s over plain images/s = plain time over medrl time, per repetition
        out[name]["over_plain_images_per_s"] = paired(t["plain"], t[name])
    first = out[variants[0]]
    return {
        "plain_images_per_s": am.BATCH / statistics.median(t["plain"]),
        "medrl_images_per_s": first["images_per_s"],
        "medrl_over_plain_images_per_s": first["over_plain_images_per_s"],
        "variants": out,
        "reps": reps,
    }


def plain_ddpo_step(pipe, batch, embeds, optimizer, params) -> None:
    """trl 0.23.1's train step on diffusers: per timestep one CFG UNet forward and backward
    over the 8 samples (batch 16), gradients accumulated, grad norm clipped, one AdamW step."""
    from generators.sampling import ddim_step_with_logprob
    from rl.learner import ppo_loss

    cond, uncond = embeds
    unet, sched = pipe.unet, pipe.scheduler
    weights = torch.ones(len(batch))
    for j in range(len(batch.timesteps)):
        x, t = batch.latents[:, j], batch.timesteps[j]
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = out.chunk(2)
        pred = e_u + am.GUIDANCE * (e_c - e_u)
        _, logp = ddim_step_with_logprob(
            sched, pred, t, x, am.ETA, prev_sample=batch.latents[:, j + 1]
        )
        loss, _ = ppo_loss(
            logp, batch.log_probs[:, j], batch.advantages, am.RL_KEYS["clip_range"], weights
        )
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, am.RL_KEYS["grad_clip"])
    optimizer.step()
    optimizer.zero_grad()


def bench_learner(gen_dir: Path, reps: int) -> dict:
    from dataclasses import replace

    from rl.config import RLConfig
    from rl.learner import Learner

    lora, sampling = _lora_and_sampling()
    _, draw = medrl_sampler(gen_dir)
    traj = draw()
    brightness = traj.images.float().mean(dim=(1, 2, 3))  # the kit's reward, normalised
    adv = ((brightness - brightness.mean()) / brightness.std()).clamp(-5, 5)
    batch = traj.for_learner(adv, keep=list(range(len(traj))))
    cfg = replace(RLConfig(), **am.RL_KEYS)
    learner = Learner(gen_dir, lora, sampling, cfg)
    pipe = plain_pipeline(gen_dir)
    pipe.scheduler.set_timesteps(am.STEPS)
    pipe.unet.requires_grad_(False)
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    pipe.unet.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    with torch.no_grad():
        embeds = pipe.encode_prompt(am.PROMPTS, "cpu", 1, True, [""] * am.BATCH)
    it = iter(range(10**9))
    t = interleaved(
        {
            "plain": lambda: plain_ddpo_step(pipe, batch, embeds, opt, params),
            "medrl": lambda: learner.train(batch, iteration=next(it), seed=0),
        },
        reps,
    )
    return {
        "plain_s_per_sample_timestep": statistics.median(t["plain"]) / SAMPLES_X_STEPS,
        "medrl_s_per_sample_timestep": statistics.median(t["medrl"]) / SAMPLES_X_STEPS,
        "medrl_over_plain_time": paired(t["medrl"], t["plain"]),
        "steps_per_forward": cfg.steps_per_forward,
        "zero_stage": cfg.zero_stage,
        "reps": reps,
    }


def read_trl(directory: Path | None) -> dict:
    """trl 0.23.1's figures from a kit results directory (the kit's JSON files)."""
    if directory is None:
        return {}

    def load(*names: str) -> dict | None:
        for name in names:
            if (directory / name).is_file():
                return json.loads((directory / name).read_text().strip().splitlines()[-1])
        return None

    out: dict = {"dir": str(directory)}
    epoch = load("trl_epoch.json", "bench_trl_epoch.json")
    if epoch is None:
        raise FileNotFoundError(
            f"--trl-results {directory}: no trl_epoch.json (bench_trl_epoch.py)"
        )
    out["train_s_per_sample_timestep"] = epoch["train_s_per_sample_timestep"]["median"]
    out["time_utc"] = epoch.get("env", {}).get("time_utc")
    sampling = load("trl_sampling.json", "bench_trl_sampling.json")
    if sampling is not None:
        out["trl_over_plain_images_per_s"] = (
            1 / sampling["trl_over_plain_paired_time_ratio"]["median"]
        )
    return out


def report(result: dict) -> None:
    s, le, trl = result.get("sampler"), result.get("learner"), result["trl"]
    print(f"model: {result['weights']}")
    print(f"load average before / after: {result['load_before']} / {result['load_after']}")
    if s:
        print(f"sampler: medrl {s['medrl_images_per_s']:.2f} images/s, plain diffusers + LoRA "
              f"{s['plain_images_per_s']:.2f}; medrl / plain (paired median of {s['reps']}) "
              f"{s['medrl_over_plain_images_per_s']:.3f}  (target >= 1.05)")  # fmt: skip
        for name, v in s["variants"].items():
            print(f"  {name} {v['options']}: medrl / plain {v['over_plain_images_per_s']:.3f}, "
                  f"{v['images_per_s']:.2f} images/s; first draw (with compile: the "
                  f"compilation) {v['first_draw_s']:.1f} s")  # fmt: skip
        if "trl_over_plain_images_per_s" in trl:
            print(
                f"  trl 0.23.1 sampler / plain (kit run): {trl['trl_over_plain_images_per_s']:.3f}"
            )
    if le:
        print(f"learner: medrl {le['medrl_s_per_sample_timestep']:.5f} s per (sample x timestep), "
              f"plain DDPO step {le['plain_s_per_sample_timestep']:.5f}; medrl / plain (paired "
              f"median of {le['reps']}) {le['medrl_over_plain_time']:.3f}")  # fmt: skip
        if trl:
            ratio = le["medrl_s_per_sample_timestep"] / trl["train_s_per_sample_timestep"]
            result["medrl_over_trl_learner"] = ratio
            print(f"  trl 0.23.1: {trl['train_s_per_sample_timestep']:.5f} s (kit run "
                  f"{trl['time_utc']}); medrl / trl {ratio:.3f}  (target <= 0.67; across "
                  "processes: alternate runs)")  # fmt: skip
        else:
            print("  trl 0.23.1: no kit results given (--trl-results DIR): no trl ratio")
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=10, help="sampler repetitions (pairs)")
    ap.add_argument("--learner-reps", type=int, default=5, help="learner repetitions (pairs)")
    ap.add_argument("--trl-results", type=Path, default=None, help="kit results directory")
    ap.add_argument("--kit", type=Path, default=KIT, help="the kit, to check the weights")
    ap.add_argument("--generator", type=Path, default=None, help="where to build the model")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the kit's: 2)")
    ap.add_argument("--only", choices=["sampler", "learner"], default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--sampler-variants", default="medrl",
                    help="comma list of medrl sampler settings timed against plain in one "
                    "process: medrl (the defaults), unmerged (sampling.merge_lora=false), "
                    "compiled (sampling.compile=true)")  # fmt: skip
    args = ap.parse_args()
    variants = args.sampler_variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        ap.error(f"--sampler-variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    trl = read_trl(args.trl_results)
    with tempfile.TemporaryDirectory() as tmp:
        gen_dir = args.generator or Path(tmp) / "anchor_generator"
        if not (gen_dir / "model_index.json").is_file():
            am.build_anchor_generator(gen_dir)
        result: dict = {"bench": "anchors", "trl": trl, "threads": args.threads,
                        "weights": am.check_against_kit(gen_dir, args.kit),
                        "load_before": round(os.getloadavg()[0], 2)}  # fmt: skip
        if args.only in (None, "sampler"):
            result["sampler"] = bench_sampler(gen_dir, args.reps, variants)
        if args.only in (None, "learner"):
            result["learner"] = bench_learner(gen_dir, args.learner_reps)
    result["load_after"] = round(os.getloadavg()[0], 2)
    result["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report(result)
    if args.json:
        from runfiles import atomic_path

        with atomic_path(args.json) as tmp_path:
            Path(tmp_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
