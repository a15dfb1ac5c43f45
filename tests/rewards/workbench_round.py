"""A rating round folder as ``medrl ratings export-round`` writes it, without a generator:
``n`` procedural fundus phantoms (generators.phantom) with their prompts, the sheet and
the private key."""

from __future__ import annotations

import csv
import json
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from generators.phantom import prompt_for, sample_record
from generators.phantom_render import render
from rewards.sheet import COLUMNS


def make_round(root: Path, n: int = 12, name: str = "round-1", size: int = 64) -> Path:
    out = root / name
    (out / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    rows = []
    for i in range(n):
        rel = f"images/{secrets.token_hex(8)}.png"
        record = sample_record(rng, f"p{i}")
        Image.fromarray(render(record, size)).save(out / rel)
        prompt = prompt_for(record)
        images[rel] = {"prompt": prompt, "generator_ckpt": f"runs/x/generator+adapter-v{i % 2}",
                       "generator": "runs/x/generator", "adapter": f"adapter-v{i % 2}",
                       "seed": 1000 + i, "num_steps": 10, "eta": 1.0, "guidance_scale": 5.0}  # fmt: skip
        rows.append({"image_path": rel, "prompt": prompt, "modality": "fundus", "round": name})
    with open(out / "sheet.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    key = {"version": 1, "round": name, "created": "2026-12-04T00:00:00+00:00", "images": images}
    (out / ".key.json").write_text(json.dumps(key))
    return out
