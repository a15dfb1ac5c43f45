"""Expert ratings as training data: rating targets, the image source of a rating, the
held-out split by image, and the rated images loaded at the models' input size.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from generators.images import ImageDecodeError, load_image, resize, to_tensor
from rewards.agreement import latest_per_rater
from rewards.sheet import ASPECT_MAX

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


def rating_targets(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per rated (image_path, prompt): the targets in [0, 1] and rater counts.

    Each rater's latest rating counts once; several raters are averaged. ``quality`` is
    the normalised rating (r - 1) / 2; ``alignment`` is prompt_faithfulness / 10 where a
    rating gives it, else the normalised rating (a CS787 CSV has only the one rating).
    """
    if frame.empty:
        raise ValueError("no ratings to train on")
    latest = latest_per_rater(frame)
    faithful = latest["prompt_faithfulness"] / ASPECT_MAX
    latest = latest.assign(
        quality=latest["rating_norm"],
        alignment=faithful.fillna(latest["rating_norm"]),
        from_faithfulness=faithful.notna(),
    )
    grouped = latest.groupby(["image_path", "prompt"], sort=False)
    out = grouped.agg(
        quality=("quality", "mean"),
        alignment=("alignment", "mean"),
        raters=("rater_id", "nunique"),
        from_faithfulness=("from_faithfulness", "sum"),
    )
    return out.reset_index()


def image_source(generator_ckpt: str) -> str:
    """Where a rated image came from, by its ``generator_ckpt``: ``phantom`` (empty or
    ``phantom``), ``real``, ``reconstruction`` (``vae:...``) or ``generated`` (a generator
    checkpoint or adapter)."""
    ckpt = str(generator_ckpt or "").strip()
    if ckpt in ("", "phantom"):
        return "phantom"
    if ckpt == "real":
        return "real"
    return "reconstruction" if ckpt.startswith("vae:") else "generated"


def holdout_split(
    image_paths: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out), split by image so one image never lands in both.

    An image is held out when a hash of (``seed``, its path) falls below ``fraction``, so
    its side never depends on the other images: a retraining on more ratings (the next
    rating round, ``rewards.init_from``) keeps every held-out image held out. With two or
    more images and ``fraction`` > 0, each side gets at least one.
    """
    unique = sorted(set(image_paths))
    if not unique:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}\0{p}".encode()).digest()[:8], "big") / 2**64
            for p in unique
        ]
    )
    is_held_u = u < fraction
    if fraction > 0 and len(unique) > 1:
        if not is_held_u.any():
            is_held_u[np.argmin(u)] = True
        if is_held_u.all():
            is_held_u[np.argmax(u)] = False
    held = {p for p, h in zip(unique, is_held_u, strict=True) if h}
    is_held = np.array([p in held for p in image_paths], dtype=bool)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def resolve_image(root: Path, image_path: str) -> Path:
    """An image_path from the ratings, resolved against ``root`` (absolute paths kept)."""
    path = Path(image_path)
    return path if path.is_absolute() else root / path


def load_images(root: Path, image_paths: Sequence[str], size: int) -> torch.Tensor:
    """All images as uint8 (N, 3, size, size); every missing or broken file named at once."""
    out = torch.empty((len(image_paths), 3, size, size), dtype=torch.uint8)
    problems: list[str] = []
    for i, rel in enumerate(
        tqdm(image_paths, desc="loading rated images", unit="img", mininterval=1.0)
    ):
        try:
            x = resize(to_tensor(load_image(resolve_image(root, rel))), size)
        except (FileNotFoundError, ImageDecodeError) as exc:
            problems.append(f"{rel}: {exc}")
            continue
        out[i] = x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{len(problems)} rated image(s) cannot be read under images root {root}:\n  {shown}{more}"
        )
    return out


def pixels_on(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images_u8.to(device).float().div(127.5).sub(1.0)
