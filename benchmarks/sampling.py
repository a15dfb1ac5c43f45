"""Sampling throughput: medrl's sampler (trajectory + per-step log-probs) against diffusers'
own ``StableDiffusionPipeline.__call__`` on the same model, steps, batch and guidance,
measured in the same run, alternating the two so machine load hits both alike.

    python benchmarks/sampling.py [--steps 10] [--batch 8] [--repeats 20] [--lora] [key.sub=value ...]

``--lora`` attaches the config's RL adapter (``lora.*``) first, as the RL samplers carry it;
both sides then run with it. Reported: the paired median over repetitions of
medrl images/s / pipeline images/s (issue 14: >= 1.05 with the LoRA), and the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from generators.model import build_generator
from generators.sampling import sample
from medrl.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--lora", action="store_true", help="attach the config's RL LoRA adapter")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    gen = build_generator(cfg.model, seed=0)
    if args.lora:
        from generators.lora import attach_lora

        attach_lora(gen.unet, cfg.lora)
        gen.unet.eval()
    res = cfg.model.resolution
    prompts = [
        f"colour fundus photograph, {'left' if i % 2 else 'right'} eye" for i in range(args.batch)
    ]

    def ours() -> None:
        sample(
            gen,
            prompts,
            list(range(args.batch)),
            num_steps=args.steps,
            eta=1.0,
            guidance_scale=args.guidance,
            batch_size=args.batch,
        )

    def pipeline() -> None:
        with torch.no_grad():
            gen.pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                eta=1.0,
                height=res,
                width=res,
                output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(args.batch)],
            )

    for fn in (ours, pipeline):  # warm-up
        fn()
    times: dict[str, list[float]] = {"medrl": [], "diffusers": []}
    for r in range(args.repeats):
        pair = (("medrl", ours), ("diffusers", pipeline))
        for name, fn in pair if r % 2 == 0 else pair[::-1]:  # alternate who goes first
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    paired = statistics.median(
        d / m for d, m in zip(times["diffusers"], times["medrl"], strict=True)
    )
    print(
        f"model: {res} px, {args.steps} DDIM steps, batch {args.batch}, CFG {args.guidance}, "
        f"LoRA {'on' if args.lora else 'off'}, torch threads {torch.get_num_threads()}, "
        f"{args.repeats} interleaved repeats"
    )
    print(f"diffusers StableDiffusionPipeline : {ips['diffusers']:7.2f} images/s (median)")
    print(f"medrl sample (+latents, log-probs): {ips['medrl']:7.2f} images/s (median)")
    print(
        f"medrl/diffusers images/s: paired median {paired:.3f}, "
        f"ratio of medians {ips['medrl'] / ips['diffusers']:.3f}  (target >= 1.05)"
    )


if __name__ == "__main__":
    main()
