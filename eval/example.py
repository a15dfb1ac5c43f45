"""A small example run for ``medrl eval``: phantom real data and phantom "generated" images.

Nothing is trained: the "generated" images are procedural fundus phantoms
(:mod:`generators.phantom`) drawn with other seeds for the same conditions as the real ones,
plus one planted near copy of a training image, so the privacy check has something to flag.
The run directory also gets a ``metrics.jsonl`` with made-up VAE, UNet and RL curves. Used by
the report test and by ``medrl dev report-example OUT`` (docs/images/report.png).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from generators.datasets import ingest_csv
from generators.images import save_png
from generators.phantom import DR_GRADE_NAMES, sample_record
from generators.phantom_render import render

#: (laterality, DR grade) of each example prompt.
CONDITIONS: tuple[tuple[str, int], ...] = (("right", 0), ("left", 2), ("right", 3), ("left", 4))
PROMPT_TEMPLATE = "colour fundus photograph, {laterality} eye, {grade}"


@dataclass
class ExampleRun:
    """Where the example was written, and what was planted in it."""

    run_dir: Path
    manifest: Path
    prompts: list[str]
    #: sample_id of the planted near copy, and the manifest path of the image it copies.
    near_copy_id: str
    near_copy_source: str
    #: sample ids of the other generated images (fresh phantom draws).
    novel_ids: list[str]


def _write_real_data(
    data: Path,
    rng: np.random.Generator,
    prompt_template: str,
    size: int,
    train_per_prompt: int,
    val_per_prompt: int,
) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    """Write the real phantom images and ``data.csv``; return the prompts and images by prompt."""
    prompts: list[str] = []
    rows: list[list[str]] = []
    real: dict[str, list[np.ndarray]] = {}
    for c, (laterality, grade) in enumerate(CONDITIONS):
        prompt = prompt_template.format(laterality=laterality, grade=DR_GRADE_NAMES[grade])
        prompts.append(prompt)
        for k in range(train_per_prompt + val_per_prompt):
            record = sample_record(rng, f"real-{c}-{k}", laterality=laterality, dr_grade=grade)
            image = render(record, size)
            rel = f"images/real-{c}-{k}.png"
            save_png(image, data / rel)
            split = "train" if k < train_per_prompt else "val"
            rows.append([rel, prompt, "fundus", split, "phantom", str(grade), laterality,
                         f"p{c}-{k}"])  # fmt: skip
            real.setdefault(prompt, []).append(image)
    with open(data / "data.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "Text", "modality", "split", "source_dataset", "label",
                         "laterality", "patient_id"])  # fmt: skip
        writer.writerows(rows)
    return prompts, real


def _write_samples(
    samples: Path,
    rng: np.random.Generator,
    prompts: list[str],
    real: dict[str, list[np.ndarray]],
    size: int,
    generated_per_prompt: int,
    seed: int,
) -> tuple[str, list[str]]:
    """Write the "generated" images and ``samples.parquet``, the first a near copy of the
    first real image; return the near copy's sample id and the others'."""
    table = []
    near_id, novel = "", []
    for c, (laterality, grade) in enumerate(CONDITIONS):
        for k in range(generated_per_prompt):
            sid = f"gen-{c}-{k}"
            if c == 0 and k == 0:
                noise = np.random.default_rng(seed + 1).integers(-2, 3, real[prompts[0]][0].shape)
                image = np.clip(real[prompts[0]][0].astype(int) + noise, 0, 255).astype(np.uint8)
                near_id = sid
            else:
                record = sample_record(rng, sid, laterality=laterality, dr_grade=grade)
                image = render(record, size)
                novel.append(sid)
            rel = f"images/{sid}.png"
            save_png(image, samples / rel)
            table.append({"sample_id": sid, "prompt": prompts[c], "seed": 1000 + k,
                          "path": rel, "adapter": "example"})  # fmt: skip
    pd.DataFrame(table).to_parquet(samples / "samples.parquet", index=False)
    return near_id, novel


def _write_curves(run: Path, rl_iterations: int) -> None:
    """Write ``metrics.jsonl`` with made-up VAE, UNet and RL curves."""
    records = []
    for step in range(0, 201, 25):
        records.append({"stage": "vae", "step": step, "loss": 0.08 * math.exp(-step / 80) + 0.01,
                        "kl": 2.0 + step / 100})  # fmt: skip
    for step in range(25, 501, 25):
        records.append({"stage": "unet", "step": step, "loss": 0.9 * math.exp(-step / 150) + 0.1})
    for it in range(rl_iterations):
        records.append({"stage": "rl", "iteration": it,
                        "reward_mean": 0.35 + 0.3 * (1 - math.exp(-it / 4)),
                        "reward_std": 0.12 - 0.004 * it, "pass_rate": 0.3 + 0.04 * it,
                        "approx_kl": 0.002 * it})  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_example(
    out: str | os.PathLike,
    size: int = 64,
    train_per_prompt: int = 4,
    val_per_prompt: int = 2,
    generated_per_prompt: int = 4,
    rl_iterations: int = 12,
    prompt_template: str = PROMPT_TEMPLATE,
    seed: int = 0,
) -> ExampleRun:
    """Write ``OUT/data`` (images, data.csv, manifest.parquet) and ``OUT/run`` (samples, curves).

    Every prompt has ``train_per_prompt`` training and ``val_per_prompt`` held-out real images
    (labelled with the DR grade) and ``generated_per_prompt`` generated ones; the first
    generated image of the first prompt is replaced by a copy of that prompt's first training
    image with ±2 grey levels of noise.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; choose a new directory for the example")
    data, run = out / "data", out / "runs" / "example"
    rng = np.random.default_rng(seed)
    prompts, real = _write_real_data(
        data, rng, prompt_template, size, train_per_prompt, val_per_prompt
    )
    manifest = ingest_csv(data / "data.csv", root=data, workers=1).manifest
    near_id, novel = _write_samples(
        run / "samples", rng, prompts, real, size, generated_per_prompt, seed
    )
    _write_curves(run, rl_iterations)
    return ExampleRun(run, manifest, prompts, near_id, "images/real-0-0.png", novel)
