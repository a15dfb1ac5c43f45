"""Rounds of expert rating: blind rating sheets of the generator's own samples.

A round is one batch of images the experts rate. ``medrl ratings export-round`` draws
samples of a run's generator (with its RL adapter, or several generator variants) and
writes a **blind** rating sheet, a folder::

    sheet.csv     the CS787 ratings CSV with image_path, prompt, modality and round
                  filled, the rater's cells (rating, rater_id, timestamp, aspects) empty
    images/       the samples under random names (no generator, adapter, version or
                  seed in them), listed in the sheet in random order
    .key.json     private: which generator / adapter and seed made each image

The raters get ``sheet.csv`` and ``images/`` (never the key), fill in the sheet, and
``medrl ratings ingest <folder>/sheet.csv`` (or any CSV placed in the folder) takes it
back: :func:`rewards.ratings.ingest_ratings` finds the key beside the CSV and calls
:func:`apply_key`, which checks each rated row against the key and fills
``generator_ckpt``, ``seed`` and ``round`` back in. Rows nobody rated are skipped.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from generators.csv_rows import RowProblem
from runfiles import require_empty_folder, staged_folder

SHEET_FILE = "sheet.csv"
KEY_FILE = ".key.json"
IMAGES_DIR = "images"
#: ``--adapter`` value for the generator without an adapter.
NO_ADAPTER = "none"
KEY_VERSION = 1


def find_key(
    csv_path: str | os.PathLike, round_dir: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """The round key beside a ratings CSV (or in ``round_dir`` when given: a filled sheet
    kept elsewhere), or None when the CSV is not a rating sheet.

    Raises:
        FileNotFoundError: ``round_dir`` given but it holds no key.
    """
    path = (Path(round_dir) if round_dir is not None else Path(csv_path).parent) / KEY_FILE
    if not path.is_file():
        if round_dir is not None:
            raise FileNotFoundError(f"{round_dir}: no {KEY_FILE}; not a rating round folder")
        return None
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
        if key.get("version") != KEY_VERSION or not isinstance(key.get("images"), dict):
            raise ValueError(f"version {key.get('version')!r}, expected {KEY_VERSION}")
    except ValueError as exc:
        raise ValueError(f"{path}: not a rating round key ({exc})") from exc
    return key


def next_round_name(rounds_dir: str | os.PathLike) -> str:
    """``round-N`` with N one more than the highest round-N folder in ``rounds_dir``."""
    taken = [0]
    root = Path(rounds_dir)
    if root.is_dir():
        for p in root.iterdir():
            name = p.name.lstrip(".").split(".tmp-")[0]
            if name.startswith("round-") and name[6:].isdigit():
                taken.append(int(name[6:]))
    return f"round-{max(taken) + 1}"


def round_prompts(
    manifest: str | os.PathLike, count: int, seed: int = 0, split: str = "all"
) -> list[str]:
    """``count`` distinct prompts of a manifest: held-out ones (split != train) first.

    ``split``: ``heldout`` (only held-out prompts), ``train`` (only training prompts) or
    ``all`` (held-out first, then training). The choice within each group is seeded.
    """
    from generators.datasets import read_manifest

    if split not in ("all", "heldout", "train"):
        raise ValueError(f"split must be all, heldout or train, got {split!r}")
    table = read_manifest(manifest)
    rng = np.random.default_rng([seed, 10])
    groups = []
    if split in ("all", "heldout"):
        groups.append(list(dict.fromkeys(table.loc[table.split != "train", "Text"])))
    if split in ("all", "train"):
        groups.append(list(dict.fromkeys(table.loc[table.split == "train", "Text"])))
    chosen: list[str] = []
    for group in groups:
        chosen.extend(group[i] for i in rng.permutation(len(group)))
    chosen = list(dict.fromkeys(chosen))[:count]
    if not chosen:
        raise ValueError(f"{manifest}: no prompts for split {split!r}")
    return chosen


def _variant_name(generator_dir: Path, adapter: str | None) -> str:
    return f"{generator_dir}+{adapter}" if adapter else str(generator_dir)


def _checked_adapters(
    prompts: Sequence[str], per_prompt: int, round_name: str, adapters: Sequence[str | None]
) -> list[str | None]:
    """The round's variants: one adapter each, None for the generator alone.

    Raises:
        ValueError: no prompts, ``per_prompt`` < 1, or a blank or padded round name.
        FileNotFoundError: an adapter that is not there.
    """
    if per_prompt < 1 or not prompts:
        raise ValueError(f"export_round: need prompts and per_prompt >= 1, got {per_prompt}")
    if not round_name.strip() or round_name != round_name.strip():
        raise ValueError(f"export_round: bad round name {round_name!r}")
    adapters = list(adapters) or [None]
    for a in adapters:
        if a and not Path(a).exists():
            raise FileNotFoundError(f"{a}: no such adapter")
    return adapters


def _sample_variant(
    generator_dir: Path,
    adapter: str | None,
    jobs: list[tuple[str, int]],
    tmp: Path,
    device: Any,
    dtype: str,
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Draw ``jobs`` (prompt, seed) from the generator with ``adapter`` into
    ``tmp/images`` under random names; the key's entry of each image (with its path)."""
    import torch

    from generators.images import save_png, to_uint8
    from generators.lora import load_adapter_into
    from generators.model import inference_dtype, load_generator
    from generators.sampling import sample

    gen = load_generator(generator_dir)
    if adapter:
        load_adapter_into(gen.pipe, adapter)
    gen = gen.to(device, inference_dtype(dtype, device))  # model.dtype on a GPU
    with torch.inference_mode():
        batch = sample(
            gen,
            [p for p, _ in jobs],
            [s for _, s in jobs],
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
        )
    entries = []
    for (prompt, s), img in zip(jobs, to_uint8(batch.images), strict=True):
        rel = f"{IMAGES_DIR}/{secrets.token_hex(8)}.png"
        save_png(img, tmp / rel)
        entries.append(
            {
                "path": rel,
                "prompt": prompt,
                "generator_ckpt": _variant_name(generator_dir, adapter),
                "generator": str(generator_dir),
                "adapter": str(adapter or ""),
                "seed": s,
                "num_steps": num_steps,
                "eta": eta,
                "guidance_scale": guidance_scale,
            }
        )
    return entries


def _write_sheet_and_key(
    tmp: Path, entries: list[dict[str, Any]], round_name: str, modality: str
) -> None:
    """Write the blind sheet (the images in random order, the rater's cells empty) and the
    round's private key into ``tmp``."""
    from rewards.sheet import COLUMNS

    secrets.SystemRandom().shuffle(entries)  # the sheet's order says nothing either
    rows = [
        {
            "image_path": e["path"],
            "prompt": e["prompt"],
            "modality": modality,
            "round": round_name,
        }
        for e in entries
    ]
    with open(tmp / SHEET_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    key = {
        "version": KEY_VERSION,
        "round": round_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images": {e.pop("path"): e for e in entries},
    }
    (tmp / KEY_FILE).write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")


def export_round(
    generator_dir: str | os.PathLike,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    round_name: str,
    adapters: Sequence[str | None] = (None,),
    per_prompt: int = 2,
    num_steps: int = 10,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    seed: int = 0,
    modality: str = "fundus",
    device: str = "auto",
    dtype: str = "float32",
) -> Path:
    """Sample ``per_prompt`` images per prompt from each generator variant; a blind sheet.

    Args:
        generator_dir: the run's generator (a diffusers pipeline directory).
        prompts: what to draw (the sheet shows each image with its prompt).
        out: the round folder (must not exist or be empty); written to a temporary
            sibling and renamed into place.
        round_name: stored with every rating of the round.
        adapters: one variant per entry: a LoRA adapter (dir or weights file) applied to
            the generator, or None for the generator alone. Every variant draws the same
            (prompt, seed) pairs, so the raters compare like with like without knowing it.
        per_prompt: images per prompt and variant; seeds are drawn from ``seed``.

    Returns:
        The sheet CSV path.
    """
    from generators.model import resolve_device

    adapters = _checked_adapters(prompts, per_prompt, round_name, adapters)
    generator_dir = Path(generator_dir)
    out = require_empty_folder(out, " (a round is kept)")
    rng = np.random.default_rng([seed, 11])
    jobs = [(p, int(s)) for p in prompts for s in rng.integers(0, 2**31 - 1, size=per_prompt)]
    with staged_folder(out) as tmp:
        dev = resolve_device(device)
        entries: list[dict[str, Any]] = []
        for adapter in adapters:
            entries += _sample_variant(
                generator_dir,
                adapter,
                jobs,
                tmp,
                dev,
                dtype,
                num_steps=num_steps,
                eta=eta,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
            )
        _write_sheet_and_key(tmp, entries, round_name, modality)
    return out / SHEET_FILE


def read_sheet(sheet_dir: str | os.PathLike) -> pd.DataFrame:
    """The sheet's (image_path, prompt, round) rows, in sheet order."""
    frame = pd.read_csv(Path(sheet_dir) / SHEET_FILE, dtype=str, keep_default_na=False)
    return frame[["image_path", "prompt", "round"]]


def stored_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def apply_key(
    rows: list[dict[str, Any]],
    key: dict[str, Any],
    sheet_dir: Path,
    images_root: Path,
    problems: list[RowProblem],
) -> list[dict[str, Any]]:
    """Check a filled sheet's rows against the round key and complete them.

    Each row must name an image of the round (its image_path as in the sheet) with the
    prompt it was drawn for; ``round``, ``generator_ckpt`` and ``seed`` left empty are
    filled from the key, and given ones must agree with it. ``image_path`` becomes the
    image's path relative to ``images_root`` (absolute when outside it). Problems are
    appended (by CSV line); returns the completed rows.
    """
    images: dict[str, dict[str, Any]] = key["images"]
    round_name = str(key["round"])
    out = []
    for row in rows:
        line = row["source_line"]
        given = Path(row["image_path"].replace("\\", "/"))  # a sheet saved on Windows
        rel = stored_path(given, sheet_dir) if given.is_absolute() else given.as_posix()
        entry = images.get(rel)
        if entry is None:
            problems.append(
                RowProblem(
                    line,
                    "image_path",
                    f"{row['image_path']!r} is not an image of round {round_name!r}",
                )
            )
            continue
        expected = {
            "prompt": entry["prompt"],
            "round": round_name,
            "generator_ckpt": entry["generator_ckpt"],
            "seed": int(entry["seed"]),
        }
        bad = False
        for column, value in expected.items():
            if row[column] in ("", None):
                row[column] = value
            elif row[column] != value:
                what = "the round's" if column == "round" else f"the sheet's {column}"
                problems.append(
                    RowProblem(line, column, f"{row[column]!r} is not {what} ({value!r})")
                )
                bad = True
        if bad:
            continue
        row["image_path"] = stored_path(sheet_dir / rel, images_root)
        out.append(row)
    return out
