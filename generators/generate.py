"""``medrl generate``: sample a pool of images, PNGs plus one Parquet row per image.

The table (``samples.parquet`` in the output directory) has one row per image:
``sample_id, prompt, seed, path, adapter, generator, num_steps, eta, guidance_scale``.
Running again into the same directory adds rows (an existing sample id is replaced).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from generators.config import SamplingConfig
from generators.images import save_png, to_uint8
from generators.lora import load_adapter_into
from generators.model import Generator, inference_dtype, load_generator, resolve_device
from generators.sampling import sample
from runfiles import atomic_path

log = logging.getLogger(__name__)

SAMPLES_TABLE = "samples.parquet"


def sample_id(prompt: str, seed: int) -> str:
    """A stable id for an image: the same prompt and seed always get the same id."""
    return f"{hashlib.sha1(prompt.encode()).hexdigest()[:10]}-{seed}"


def generate_images(
    gen: Generator,
    prompts: Sequence[str],
    out: str | os.PathLike,
    sampling: SamplingConfig,
    num_per_prompt: int = 1,
    seed: int = 0,
    adapter: str = "",
    generator_name: str = "",
    progress: bool = True,
) -> Path:
    """Sample ``num_per_prompt`` images per prompt (seeds ``seed .. seed+n-1``) into ``out``.

    Returns:
        The path of the Parquet table.
    """
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    out = Path(out)
    jobs = [(p, seed + i) for p in prompts for i in range(num_per_prompt)]
    batch = sample(
        gen,
        [p for p, _ in jobs],
        [s for _, s in jobs],
        num_steps=sampling.num_steps,
        eta=sampling.eta,
        guidance_scale=sampling.guidance_scale,
        batch_size=sampling.batch_size,
        progress=progress,
    )
    rows = []
    for (prompt, s), img in zip(jobs, to_uint8(batch.images), strict=True):
        sid = sample_id(prompt, s)
        rel = Path("images") / f"{sid}.png"
        save_png(img, out / rel)
        rows.append(
            {
                "sample_id": sid,
                "prompt": prompt,
                "seed": s,
                "path": rel.as_posix(),
                "adapter": adapter,
                "generator": generator_name,
                "num_steps": sampling.num_steps,
                "eta": sampling.eta,
                "guidance_scale": sampling.guidance_scale,
            }
        )
    table = pd.DataFrame(rows)
    path = out / SAMPLES_TABLE
    if path.is_file():
        old = pd.read_parquet(path)
        table = pd.concat([old[~old.sample_id.isin(table.sample_id)], table], ignore_index=True)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def generate_from_cli(
    cfg,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int,
    out: str | None,
    generator_dir: str | None,
    adapter: str | None,
) -> Path:
    """What ``medrl generate`` runs: load the run's fine-tuned generator (+ an adapter, such
    as RL's ``rl/best``) and sample."""
    from generators.finetune import load_run_generator

    run_dir = Path(cfg.run.root) / cfg.run.name
    gdir = Path(generator_dir) if generator_dir else run_dir / "generator"
    gen = load_generator(gdir) if generator_dir else load_run_generator(run_dir)
    if adapter:
        load_adapter_into(gen.pipe, adapter)
    device = resolve_device(cfg.run.device)
    gen = gen.to(device, inference_dtype(cfg.model.dtype, device))
    with torch.inference_mode():
        return generate_images(
            gen,
            prompts,
            out or run_dir / "samples",
            cfg.sampling,
            num_per_prompt=num_per_prompt,
            seed=seed,
            adapter=adapter or "",
            generator_name=str(gdir),
        )
