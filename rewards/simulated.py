"""A SIMULATED expert for the demo phantom: rule-based ratings, not a clinician's.

It stands in for ophthalmologists so the rating -> reward model -> RL path can run end
to end on the embedded phantom; every rating it writes says so (``rater_id``
``simulated-expert-N``, ``expert_level`` ``simulated``). Its rules:

- **quality** (the CSV ``rating``, 1-3): the phantom's own quality grade when the
  image's :class:`~generators.phantom.PhantomRecord` is known (blur, uneven
  illumination and noise decide it, :func:`generators.phantom.quality_grade_for`);
  for other images (generated ones) the same rule applied to defect levels estimated
  by :func:`generators.fundus_measure.measure` (sharpness, illumination uniformity, noise;
  thresholds calibrated on phantoms, see :data:`MEASURE_LEVELS`).
- **alignment** (the ``prompt_faithfulness`` aspect, 0/5/10 for 1-3): whether the image
  shows what the prompt says: the eye (laterality) and the diabetic retinopathy grade,
  compared in bins (none, mild, moderate, severe or proliferative). A wrong eye costs
  one step, a grade one bin off one step, lesions claimed but absent (or present but
  denied) or a grade two or more bins off two steps; 3 - steps, at least 1. The
  image's grade bin is the record's, or for generated images estimated from the lesion
  area measure() finds (:data:`LESION_BINS`). Cup-to-disc ratio and the quality words
  are not judged here (quality is the selector's job).

Ratings are deterministic given the seed: each one draws its optional rater noise (move
one step up or down with probability ``noise``) from a generator seeded by the seed,
the rater and the image path, so the order of images does not matter.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from generators.fundus_measure import measure
from generators.images import load_image, save_png
from generators.phantom import (
    BLUR_LEVELS,
    DR_GRADE_NAMES,
    ILLUMINATION_LEVELS,
    NOISE_LEVELS,
    PhantomRecord,
    prompt_for,
    quality_grade_for,
    sample_record,
)
from generators.phantom_dataset import load_records
from generators.phantom_render import render
from rewards.sheet import CS787_COLUMNS
from runfiles import atomic_path, require_empty_folder, staged_folder

#: expert_level of every simulated rating.
SIMULATED_LEVEL = "simulated"
#: Fixed default start time (item i is rated i seconds later): re-running a simulation
#: gives identical rows, so re-ingesting its CSV adds nothing.
DEFAULT_TIMESTAMP = "2025-01-01T00:00:00+00:00"
#: Images are measured at this side (thresholds below were calibrated at it).
ANALYSIS_SIZE = 64
#: measure() thresholds (level 1, level 2) for each defect at 64 px, fitted on 600
#: phantoms with random defects against the record's defect levels (level accuracy:
#: noise 98%, illumination 96%, blur 93%). Sharpness and uniformity fall as the defect
#: grows, noise rises.
MEASURE_LEVELS: dict[str, tuple[float, float]] = {
    "noise": (0.0223, 0.0456),
    "illumination_uniformity": (0.776, 0.620),
    "sharpness": (0.0177, 0.0089),
}
#: Lesion area (red + exudate + cotton wool fractions from measure()) separating grade
#: bins 0 | 1 | 2 | 3+ at 64 px (from the per-grade spread on good-quality phantoms).
LESION_BINS: tuple[float, float, float] = (0.0002, 0.004, 0.02)
ASPECT_FOR_RATING = {1: 0.0, 2: 5.0, 3: 10.0}
RATINGS_COLUMNS: tuple[str, ...] = CS787_COLUMNS + ("prompt_faithfulness",)


def grade_bin(grade: int) -> int:
    """DR grade 0..4 -> bin 0 (none), 1 (mild), 2 (moderate), 3 (severe or proliferative)."""
    return min(int(grade), 3)


def parse_prompt(prompt: str) -> dict[str, Any]:
    """What a phantom-style prompt claims: ``laterality`` and ``dr_grade`` (None: unstated)."""
    text = prompt.lower()
    lat = re.findall(r"\b(left|right)\s+eye\b", text)
    grade = None
    for g in sorted(range(len(DR_GRADE_NAMES)), key=lambda g: -len(DR_GRADE_NAMES[g])):
        if DR_GRADE_NAMES[g] in text:
            grade = g
            break
    return {"laterality": lat[0] if len(set(lat)) == 1 else None, "dr_grade": grade}


def _defect_level(value: float, thresholds: tuple[float, float], rising: bool) -> int:
    a, b = thresholds
    return int(value >= a) + int(value >= b) if rising else int(value <= a) + int(value <= b)


def quality_from_measure(m: dict[str, Any]) -> int:
    """Quality 1-3 from measure() output, by the phantom's own grading rule."""
    levels = (
        _defect_level(m["sharpness"], MEASURE_LEVELS["sharpness"], rising=False),
        _defect_level(
            m["illumination_uniformity"], MEASURE_LEVELS["illumination_uniformity"], False
        ),
        _defect_level(m["noise"], MEASURE_LEVELS["noise"], rising=True),
    )
    # quality_grade_for takes defect amounts; feed it each level's lower threshold
    amounts = [
        (0.0, *t)[lvl]
        for lvl, t in zip(levels, (BLUR_LEVELS, ILLUMINATION_LEVELS, NOISE_LEVELS), strict=True)
    ]
    return quality_grade_for(*amounts)


def lesion_bin_from_measure(m: dict[str, Any]) -> int:
    """Estimated DR grade bin 0..3 from the lesion area measure() found."""
    area = m["red_lesion_fraction"] + m["exudate_fraction"] + m["cotton_wool_fraction"]
    return int(sum(area >= t for t in LESION_BINS))


def alignment_rating(claims: dict[str, Any], laterality: str | None, image_bin: int) -> int:
    """Alignment 1-3 of an image (its eye and DR grade bin) with what the prompt claims."""
    steps = 0
    if claims["laterality"] is not None and laterality is not None:
        steps += int(claims["laterality"] != laterality)
    if claims["dr_grade"] is not None:
        claimed = grade_bin(claims["dr_grade"])
        if (claimed == 0) != (image_bin == 0) or abs(claimed - image_bin) >= 2:
            steps += 2
        elif claimed != image_bin:
            steps += 1
    return 3 - min(steps, 2)


def _stable_seed(*parts: object) -> list[int]:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


@dataclass(frozen=True)
class SimulatedExpert:
    """A simulated rater (see the module docstring for the rules). Not a clinician."""

    rater_id: str = "simulated-expert-1"
    seed: int = 0
    #: Probability that a rating moves one step (up or down, kept in 1..3).
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not self.rater_id.startswith("simulated"):
            raise ValueError(
                f"simulated expert rater_id must start with 'simulated', got {self.rater_id!r}"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"simulated expert noise must be in [0, 1], got {self.noise}")

    def _jitter(self, rating: int, key: str, what: str) -> int:
        if self.noise <= 0:
            return rating
        rng = np.random.default_rng(_stable_seed(self.seed, self.rater_id, key, what))
        if rng.random() >= self.noise:
            return rating
        step = 1 if rating == 1 else -1 if rating == 3 else int(rng.choice([-1, 1]))
        return rating + step

    def rate(
        self,
        prompt: str,
        *,
        record: PhantomRecord | None = None,
        image: np.ndarray | None = None,
        key: str = "",
    ) -> tuple[int, int]:
        """(quality, alignment), each 1-3, from the record when given, else from the pixels.

        ``key`` (the image path) seeds the rater noise.
        """
        if record is not None:
            quality = record.quality_grade
            laterality, image_bin = record.laterality, grade_bin(record.dr_grade)
        elif image is not None:
            m = measure_at_analysis_size(image)
            quality = quality_from_measure(m)
            laterality, image_bin = str(m["laterality"]), lesion_bin_from_measure(m)
        else:
            raise ValueError("SimulatedExpert.rate: give the record or the image")
        alignment = alignment_rating(parse_prompt(prompt), laterality, image_bin)
        return self._jitter(quality, key, "quality"), self._jitter(alignment, key, "alignment")


def measure_at_analysis_size(image: np.ndarray) -> dict[str, Any]:
    """measure() on the image resized to :data:`ANALYSIS_SIZE` (where thresholds hold)."""
    if image.shape[0] != ANALYSIS_SIZE or image.shape[1] != ANALYSIS_SIZE:
        pil = Image.fromarray(image).resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
        image = np.asarray(pil)
    return measure(image)


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True)
class PoolItem:
    """An image to rate: its path (relative to the pool), the prompt, what is known."""

    path: str
    prompt: str
    record: PhantomRecord | None = None
    seed: int | None = None
    generator_ckpt: str = ""
    #: The rating round of a rating sheet (``medrl ratings export-round``), else "".
    round: str = ""


POOL_FILE = "pool.jsonl"


def read_pool(images_dir: str | os.PathLike, use_records: bool = True) -> list[PoolItem]:
    """The images of a directory to rate, with their prompts.

    Understood layouts (first match wins): ``pool.jsonl`` (a rating pool from
    :func:`write_demo_pool` or :func:`rewards.pools.write_generated_pool`: path, prompt
    shown, phantom record where known, seed and generator_ckpt where given),
    ``sheet.csv`` (a blind rating sheet of ``medrl ratings export-round``: image_path,
    prompt, round; generator and seed stay unknown, the round key fills them in at
    ingestion), ``samples.parquet`` (``medrl generate`` output: path, prompt, seed,
    generator, adapter) and ``phantom.jsonl`` (a phantom dataset from
    ``medrl data demo``). With ``use_records=False`` records are dropped, so images are
    rated from their pixels.
    """
    from rewards.rounds import SHEET_FILE, read_sheet

    root = Path(images_dir)
    if (root / POOL_FILE).is_file():
        items = []
        for n, line in enumerate((root / POOL_FILE).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                record = PhantomRecord.from_dict(d["record"]) if d.get("record") else None
                seed = d.get("seed")
                items.append(
                    PoolItem(
                        d["path"],
                        d["prompt"],
                        record,
                        None if seed is None else int(seed),
                        str(d.get("generator_ckpt", "phantom")),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{root / POOL_FILE}: line {n}: {exc}") from exc
    elif (root / SHEET_FILE).is_file():
        items = [
            PoolItem(str(r.image_path), str(r.prompt), round=str(r.round))
            for r in read_sheet(root).itertuples(index=False)
        ]
    elif (root / "samples.parquet").is_file():
        frame = pd.read_parquet(root / "samples.parquet")
        missing = {"path", "prompt"} - set(frame.columns)
        if missing:
            raise ValueError(f"{root / 'samples.parquet'}: lacks columns {sorted(missing)}")
        items = []
        for row in frame.itertuples(index=False):
            ckpt = str(getattr(row, "generator", "") or "")
            adapter = str(getattr(row, "adapter", "") or "")
            seed = getattr(row, "seed", None)
            items.append(
                PoolItem(
                    str(row.path),
                    str(row.prompt),
                    None,
                    None if seed is None or pd.isna(seed) else int(seed),
                    f"{ckpt}+{adapter}" if adapter else ckpt,
                )
            )
    elif (root / "phantom.jsonl").is_file():
        paths = [
            json.loads(line)["path"]
            for line in (root / "phantom.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        items = [
            PoolItem(p, r.prompt, r, None, "phantom")
            for p, r in zip(paths, load_records(root), strict=True)
        ]
    else:
        raise FileNotFoundError(
            f"{root}: no {POOL_FILE}, samples.parquet (medrl generate) or phantom.jsonl "
            "(medrl data demo) to take images and prompts from"
        )
    if not use_records:
        items = [PoolItem(i.path, i.prompt, None, i.seed, i.generator_ckpt, i.round) for i in items]
    return items


def simulate_ratings(
    images_dir: str | os.PathLike,
    out_csv: str | os.PathLike | None = None,
    *,
    raters: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    use_records: bool = True,
    modality: str = "fundus",
    timestamp: str = DEFAULT_TIMESTAMP,
) -> Path:
    """Rate every image of a pool with ``raters`` simulated experts; write a ratings CSV.

    ``out_csv`` defaults to ``<images_dir>/ratings.csv``; its image_path values are
    relative to ``images_dir``. Item i of the pool gets ``timestamp`` + i seconds.
    Written atomically. Returns the CSV path.

    A rating sheet (``sheet.csv`` of ``medrl ratings export-round``) is filled this way:
    the CSV (in the sheet's folder, beside its key) gets a ``round`` column and
    ``medrl ratings ingest`` takes it like a sheet filled by people.
    """
    if raters < 1:
        raise ValueError(f"simulate_ratings: raters must be >= 1, got {raters}")
    root = Path(images_dir)
    items = read_pool(root, use_records=use_records)
    experts = [
        SimulatedExpert(f"simulated-expert-{i + 1}", seed=seed + i, noise=noise)
        for i in range(raters)
    ]
    start = datetime.fromisoformat(timestamp)
    rows = []
    for i, item in enumerate(
        tqdm(items, desc="simulated expert rating", unit="img", mininterval=1.0)
    ):
        # one second per item: a rater's ratings of one image under two prompts stay apart
        when = (start + timedelta(seconds=i)).isoformat()
        image = None if item.record is not None else load_image(root / item.path)
        for expert in experts:
            quality, alignment = expert.rate(
                item.prompt, record=item.record, image=image, key=item.path
            )
            rows.append(
                {
                    "image_path": item.path,
                    "rating": quality,
                    "modality": modality,
                    "expert_level": SIMULATED_LEVEL,
                    "prompt": item.prompt,
                    "rater_id": expert.rater_id,
                    "timestamp": when,
                    "generator_ckpt": item.generator_ckpt,
                    "seed": "" if item.seed is None else item.seed,
                    "round": item.round,
                    "prompt_faithfulness": ASPECT_FOR_RATING[alignment],
                }
            )
    out = Path(out_csv) if out_csv is not None else root / "ratings.csv"
    columns = RATINGS_COLUMNS
    if any(item.round for item in items):
        columns = CS787_COLUMNS + ("round", "prompt_faithfulness")
    else:
        for row in rows:
            del row["round"]
    _write_csv_atomic(out, columns, rows)
    return out


def _write_csv_atomic(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- demo pool


def _with_quality(record: PhantomRecord, grade: int, rng: np.random.Generator) -> PhantomRecord:
    """The record with defects drawn so that its quality grade is ``grade``."""
    blur, ill, noise = 0.0, float(rng.uniform(0.0, 0.25)), float(rng.uniform(0.002, 0.012))
    mild = {0: (0.006, 0.010), 1: (0.40, 0.60), 2: (0.024, 0.040)}
    severe = {0: (0.014, 0.022), 1: (0.70, 0.95), 2: (0.055, 0.080)}
    if grade == 2:
        chosen = {int(rng.integers(3)): mild}
    elif grade == 1:
        if rng.random() < 0.6:
            chosen = {int(rng.integers(3)): severe}
        else:
            a, b = rng.choice(3, size=2, replace=False)
            chosen = {int(a): mild, int(b): mild}
    else:
        chosen = {}
    for defect, ranges in chosen.items():
        value = float(rng.uniform(*ranges[defect]))
        if defect == 0:
            blur = value
        elif defect == 1:
            ill = value
        else:
            noise = value
    out = record.evolve(blur=round(blur, 4), illumination=round(ill, 3), noise=round(noise, 4))
    if out.quality_grade != grade:  # the ranges above sit inside the phantom's levels
        raise RuntimeError(f"{record.id}: drew quality {out.quality_grade}, wanted {grade}")
    return out


def mismatched_prompt(record: PhantomRecord, rng: np.random.Generator) -> tuple[str, str]:
    """A prompt that contradicts the image: wrong eye, wrong DR grade, or both."""
    kind = str(rng.choice(["laterality", "grade", "both"], p=[0.35, 0.4, 0.25]))
    laterality = record.laterality
    if kind in ("laterality", "both"):
        laterality = "left" if laterality == "right" else "right"
    grade = record.dr_grade
    if kind in ("grade", "both"):
        grade = int(rng.choice([g for g in range(5) if grade_bin(g) != grade_bin(grade)]))
    other = sample_record(rng, "other", laterality=laterality, dr_grade=grade)
    claimed = record.evolve(laterality=laterality, dr_grade=grade, lesions=other.lesions)
    return prompt_for(claimed), kind


def write_demo_pool(
    out: str | os.PathLike,
    count: int = 480,
    size: int = 64,
    seed: int = 0,
    mismatch_fraction: float = 0.5,
    raters: int = 1,
    noise: float = 0.0,
) -> Path:
    """A phantom rating pool for the reward models, rated by simulated experts.

    ``count`` phantoms at ``size`` px with quality grades 1/2/3 in equal shares. Every
    image is rated with its own prompt; a share ``mismatch_fraction`` of the images is
    rated a second time with a prompt that contradicts it (wrong eye and/or DR grade),
    so the alignment policy sees the same image with matching and contradicting text.
    Writes
    ``images/*.png``, ``pool.jsonl`` (path, prompt shown, record, mismatch kind) and
    ``ratings.csv`` (simulated ratings) to a temporary sibling directory renamed to
    ``out`` at the end. Returns the ratings CSV path.
    """
    if count < 1 or size < 32 or not 0.0 <= mismatch_fraction <= 1.0:
        raise ValueError(
            f"write_demo_pool: bad parameters count={count} size={size} "
            f"mismatch_fraction={mismatch_fraction}"
        )
    out = require_empty_folder(out)
    with staged_folder(out) as tmp:
        rng = np.random.default_rng([seed, 787])
        lines = []
        for i in tqdm(range(count), desc=f"demo rating pool {size}px", unit="img", mininterval=1.0):
            record = sample_record(rng, f"pool-{i:05d}")
            record = _with_quality(record, 3 - i % 3, rng)
            rel = f"images/{record.id}.png"
            save_png(render(record, size), tmp / rel)
            shown = [(record.prompt, "none")]
            if rng.random() < mismatch_fraction:
                shown.append(mismatched_prompt(record, rng))
            for prompt, kind in shown:
                entry = {"path": rel, "prompt": prompt, "mismatch": kind}
                lines.append(json.dumps({**entry, "record": record.to_dict()}))
        (tmp / POOL_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        simulate_ratings(tmp, tmp / "ratings.csv", raters=raters, noise=noise, seed=seed)
    return out / "ratings.csv"
