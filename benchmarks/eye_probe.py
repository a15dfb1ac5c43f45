"""How fast does the demo generator learn the prompt's eye? Two probes behind docs/rl.md's
account of why RL does not move the eye on the demo.

    # supervised LoRA fine-tuning on the generator's own samples that show the prompt's
    # eye (filter and retrain, the eye as a perfect reward), 3 rounds; --keep random: the
    # control, a random subset of the same size
    python benchmarks/eye_probe.py filter --run runs/demo [--keep eye|random] [--train-text-encoder]

    # the UNet trained from scratch on the phantoms for --steps (the shipped VAE), with the
    # demo's own text encoder or with a pretrained one (a BERT folder), same budget
    python benchmarks/eye_probe.py scratch --steps 300 [--text-encoder DIR]

    # every checkpoint of a fine-tuning run, e.g. the demo base's recipe kept with
    # `python -m medrl.demo_weights --out /tmp/base --keep-run` (the run: /tmp/.base.run)
    python benchmarks/eye_probe.py checkpoints /tmp/.base.run

Each prints the share of held-out images whose optic disc is on the prompt's side (the
SIMULATED expert's ``measure`` from pixels), and ``filter`` also gold, per round. The
held-out images are the RL evaluation's: the first 8 validation prompts x 4 seeds from
1234 (benchmarks/expert_loop.py), plus, for ``scratch``, 48 short prompts naming only the
eye. One thread, about 4 minutes per ``filter`` run and 8 per ``scratch`` run of 300 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KW = dict(num_steps=10, eta=1.0, guidance_scale=5.0)
SHORT = [f"colour fundus photograph, {e} eye" for e in ("left", "right")]


def eye_share(gen, prompts, seeds) -> tuple[float, float, float]:
    """(eye match, gold combined, gold quality) of samples of ``gen`` for prompts x seeds."""
    from generators.sampling import sample
    from rl.gold import SimulatedGold

    gen.unet.eval()
    gen.text_encoder.eval()
    with torch.no_grad():
        images = sample(gen, prompts, seeds, **KW).images
    from eval.features import FallbackFeatures

    j = SimulatedGold(features=FallbackFeatures()).judge(images, prompts)
    return j["gold_eye_match"], j["gold_combined"], j["gold_quality"]


def held_out(manifest: Path) -> tuple[list[str], list[int]]:
    from generators.datasets import read_manifest

    table = read_manifest(manifest)
    val = table.loc[table.split == "val", "Text"].tolist()[:8]
    prompts = [p for p in val for _ in range(4)]
    return prompts, [1234 + i for i in range(len(prompts))]


def probe_filter(args) -> None:
    from generators.config import LoraConfig
    from generators.datasets import read_manifest
    from generators.images import to_uint8
    from generators.lora import attach_lora, lora_parameters
    from generators.model import load_generator
    from generators.sampling import sample
    from generators.training_common import ImageTextData
    from rl.gold import SimulatedGold

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    run = Path(args.run)
    manifest = run.parent.parent / "data" / "demo" / "manifest.parquet"
    manifest = Path(args.manifest) if args.manifest else manifest
    gen = load_generator(run / "generator")
    attach_lora(gen.unet, LoraConfig())
    groups = [{"params": lora_parameters(gen.unet), "lr": args.lr}]
    if args.train_text_encoder:
        gen.text_encoder.requires_grad_(True)
        groups.append({"params": list(gen.text_encoder.parameters()), "lr": args.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    table = read_manifest(manifest)
    train_prompts = table.loc[table.split == "train", "Text"].tolist()
    real = ImageTextData.from_manifest(manifest, gen.resolution, split="train")
    eval_p, eval_s = held_out(manifest)
    eye, gold, q = eye_share(gen, eval_p, eval_s)
    print(f"base: eye {eye:.2f}, gold {gold:.2f}, quality {q:.2f}", flush=True)
    sched, scaling = gen.scheduler, gen.vae.config.scaling_factor
    for r in range(args.rounds):
        t0 = time.time()
        prompts = [p for p in rng.sample(train_prompts, 16) for _ in range(8)]
        seeds = [10_000 * (r + 1) + 1000 * args.seed + i for i in range(len(prompts))]
        gen.unet.eval()
        with torch.no_grad():
            images = sample(gen, prompts, seeds, **KW).images
        shows = np.array(
            [
                bool(SimulatedGold.rate(u, p)[2])
                for u, p in zip(to_uint8(images), prompts, strict=True)
            ]
        )
        n_keep = int(shows.sum())
        keep = (np.nonzero(shows)[0] if args.keep == "eye"
                else np.array(rng.sample(range(len(prompts)), n_keep)))  # fmt: skip
        x, texts = images[keep].clamp(-1, 1), [prompts[i] for i in keep]
        gen.unet.train()
        if args.train_text_encoder:
            gen.text_encoder.train()
        for _ in range(args.steps):
            n_real = int(16 * args.real_share)
            idx = torch.randint(0, len(x), (16 - n_real,))
            xb, tb = x[idx], [texts[i] for i in idx.tolist()]
            if n_real:
                xr, tr = real.batch(torch.randint(0, len(real), (n_real,)))
                xb, tb = torch.cat([xb, xr]), tb + list(tr)
            tb = ["" if rng.random() < 0.1 else t for t in tb]  # CFG dropout, as fine-tuning
            with torch.no_grad():
                lat = gen.vae.encode(xb).latent_dist.sample() * scaling
            with torch.set_grad_enabled(args.train_text_encoder):
                cond = gen.encode_prompts(tb)
            noise = torch.randn_like(lat)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(lat),))
            pred = gen.unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        eye, gold, q = eye_share(gen, eval_p, eval_s)
        print(
            f"round {r}: {shows.mean():.2f} of {len(prompts)} samples showed the prompt's eye; "
            f"trained {args.steps} steps on {n_keep} kept ({args.keep}); held-out eye "
            f"{eye:.2f}, gold {gold:.2f}, quality {q:.2f} ({time.time() - t0:.0f} s)",
            flush=True,
        )


def probe_scratch(args) -> None:
    from generators.finetune import finetune
    from medrl.config import load_config

    every = args.every or args.steps
    overrides = [
        "model.unet.pretrained=null",
        "model.unet.subfolder=null",
        f"finetune.steps={args.steps}",
        f"finetune.lr={args.lr}",
        "finetune.sample_every=0",
        f"finetune.checkpoint_every={every}",
        f"finetune.keep_checkpoints={args.steps // every + 1}",
        "finetune.vae_steps=0",
    ]
    if args.text_encoder:
        overrides += [f"model.text_encoder.pretrained={args.text_encoder}",
                      "model.text_encoder.subfolder=null", "model.text_encoder.tokenizer=null",
                      "model.text_encoder.tokenizer_subfolder=null",
                      "finetune.train_text_encoder=false"]  # fmt: skip
    else:
        overrides += ["model.text_encoder.pretrained=null", "model.text_encoder.subfolder=null",
                      "model.text_encoder.tokenizer_subfolder=null"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, *args.set])
    manifest = Path(args.manifest or "data/demo/manifest.parquet")
    data = dataclasses.replace(cfg.data, root=str(manifest.parent))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        finetune(Path(tmp) / "run", cfg.model, data, cfg.finetune, cfg.sampling, seed=0,
                       device="cpu")  # fmt: skip
        seconds = time.time() - t0
        print(
            f"UNet from scratch, {args.steps} steps at lr {args.lr}, text encoder "
            f"{args.text_encoder or 'the demo one, trained with it'} {' '.join(args.set)} "
            f"({seconds:.0f} s):"
        )
        judge_checkpoints(Path(tmp) / "run", manifest, final=False)


def judge_checkpoints(run: Path, manifest: Path, final: bool = True) -> None:
    """Print eye, gold and quality of every checkpoint of a fine-tuning run (and of its
    final generator when ``final``)."""
    from rewards.pools import list_checkpoints, load_checkpoint_generator

    eval_p, eval_s = held_out(manifest)
    short = [SHORT[i % 2] for i in range(48)]
    for ckpt in [*list_checkpoints(run), *([None] if final else [])]:
        gen = load_checkpoint_generator(run, ckpt)
        eye, gold, q = eye_share(gen, eval_p, eval_s)
        eye_short, _, _ = eye_share(gen, short, list(range(48)))
        name = ckpt.name if ckpt is not None else "generator (final)"
        print(
            f"  {name}: held-out eye {eye:.2f} (gold {gold:.2f}, quality {q:.2f}); "
            f"short prompts eye {eye_short:.2f}",
            flush=True,
        )


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("filter")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--manifest", default=None)
    p.add_argument("--keep", choices=["eye", "random"], default="eye")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--real-share", type=float, default=0.25)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("scratch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text-encoder", default=None, help="a pretrained BERT folder")
    p.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    p.add_argument("--every", type=int, default=0, help="measure every N steps (0: the end)")
    p.add_argument("--manifest", default=None)
    p = sub.add_parser("checkpoints")
    p.add_argument("run", help="a fine-tuning run directory (checkpoints/, generator/)")
    p.add_argument("--manifest", default=None)
    args = parser.parse_args()

    def probe_checkpoints(args) -> None:
        judge_checkpoints(Path(args.run), Path(args.manifest or "data/demo/manifest.parquet"))

    probes = {"filter": probe_filter, "scratch": probe_scratch, "checkpoints": probe_checkpoints}
    probes[args.probe](args)


if __name__ == "__main__":
    main()
