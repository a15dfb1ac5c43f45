"""Finding the generated images of a run, and choosing and decoding the images eval uses.

``medrl eval`` takes a run directory (``RUN/samples/samples.parquet``), any directory holding
a ``samples.parquet`` (or the table itself), or a folder of images without a table (one
prompt, ``"(unknown)"``). Every image is centre-cropped to a square and resized to one side
before any metric (:func:`load_square`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from generators.images import IMAGE_SUFFIXES, center_square, load_image, resize, to_tensor, to_uint8

SAMPLES_TABLE = "samples.parquet"  # as generators.generate.SAMPLES_TABLE (not imported: torch-free)
#: Prompt used for generated images that come without a table.
UNKNOWN_PROMPT = "(unknown)"
#: Optional samples.parquet column naming the paraphrase group of a prompt (for Agreement).
PARAPHRASE_COLUMN = "paraphrase_group"


@dataclass
class Samples:
    """The generated images to evaluate."""

    run_dir: Path
    source: Path
    table: Path | None
    sample_ids: list[str]
    prompts: list[str]
    paths: list[Path]
    #: Paths as written in the table (relative to it), for the report.
    shown_paths: list[str]
    #: ``{group: [prompt, ...]}`` from the ``paraphrase_group`` column; None without it.
    paraphrase_groups: dict[str, list[str]] | None
    metrics_jsonl: Path | None


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def find_samples(run_or_dir: str | os.PathLike) -> Samples:
    """Locate the generated images of a run directory, a samples directory or an image folder.

    Looks for ``RUN/samples/samples.parquet``, then ``DIR/samples.parquet`` (or takes a path to
    the table itself); without a table, the images directly in the directory (or in its
    ``images/``) with one prompt, ``"(unknown)"``.

    Raises:
        FileNotFoundError: no such directory, no table and no images, or an image file the
            table lists is missing (the message names the table and the file).
        ValueError: the table is unreadable, empty, or lacks the ``prompt`` / ``path`` columns.
    """
    given = Path(run_or_dir)
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such run directory or samples directory")
    if given.is_file():
        table, run_dir = given, given.parent
    else:
        run_dir = given
        table = next(
            (t for t in (given / "samples" / SAMPLES_TABLE, given / SAMPLES_TABLE) if t.is_file()),
            None,
        )
    metrics_jsonl = run_dir / "metrics.jsonl"
    if not metrics_jsonl.is_file() and run_dir.name == "samples":
        metrics_jsonl = run_dir.parent / "metrics.jsonl"
    jsonl = metrics_jsonl if metrics_jsonl.is_file() else None
    if table is None:
        return _folder_samples(given, jsonl)
    return _table_samples(table, run_dir, jsonl)


def _folder_samples(given: Path, jsonl: Path | None) -> Samples:
    """The images directly in ``given`` (or in its ``images/``), one unknown prompt."""
    files = _image_files(given)
    if not files and (given / "images").is_dir():
        files = _image_files(given / "images")
    if not files:
        raise FileNotFoundError(
            f"{given}: no {SAMPLES_TABLE} (looked in {given / 'samples'} and {given}) and no "
            f"image files ({', '.join(IMAGE_SUFFIXES)}); generate samples with "
            "`medrl generate` first"
        )
    return Samples(
        run_dir=given,
        source=given,
        table=None,
        sample_ids=[p.stem for p in files],
        prompts=[UNKNOWN_PROMPT] * len(files),
        paths=files,
        shown_paths=[p.name for p in files],
        paraphrase_groups=None,
        metrics_jsonl=jsonl,
    )


def _table_samples(table: Path, run_dir: Path, jsonl: Path | None) -> Samples:
    """The images a samples table lists, with their prompts, ids and paraphrase groups."""
    try:
        frame = pd.read_parquet(table)
    except Exception as exc:  # pyarrow raises several types for non-Parquet files
        raise ValueError(f"{table}: not a readable Parquet samples table ({exc})") from exc
    missing_cols = [c for c in ("prompt", "path") if c not in frame.columns]
    if missing_cols:
        raise ValueError(
            f"{table}: samples table lacks column(s) {', '.join(missing_cols)} "
            f"(it has {', '.join(map(str, frame.columns)) or 'none'})"
        )
    if frame.empty:
        raise ValueError(f"{table}: the samples table is empty (no generated images to evaluate)")
    shown = [str(p) for p in frame["path"]]
    paths = [Path(p) if Path(p).is_absolute() else table.parent / p for p in shown]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{table}: {len(missing)} image file(s) listed in the table are missing, e.g. "
            + ", ".join(str(p) for p in missing[:3])
        )
    prompts = [
        str(p) if isinstance(p, str) and p.strip() else UNKNOWN_PROMPT for p in frame["prompt"]
    ]
    ids = (
        [str(s) for s in frame["sample_id"]]
        if "sample_id" in frame.columns
        else [p.stem for p in paths]
    )
    groups = None
    if PARAPHRASE_COLUMN in frame.columns:
        groups = {}
        for g, p in zip(frame[PARAPHRASE_COLUMN], prompts, strict=True):
            if isinstance(g, str) and g.strip() and p not in groups.setdefault(g, []):
                groups[g].append(p)
    return Samples(run_dir, table, table, ids, prompts, paths, shown, groups, jsonl)


def round_robin(prompts: Sequence[str], limit: int) -> list[int]:
    """Indices of at most ``limit`` items, taking one per prompt in turn (table order kept)."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    chosen: list[int] = []
    k = 0
    while len(chosen) < min(limit, len(prompts)):
        for idx in by_prompt.values():
            if k < len(idx) and len(chosen) < limit:
                chosen.append(idx[k])
        k += 1
    return sorted(chosen)


def seeded_subset(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """All of ``range(n)``, or a seeded sorted random subset of ``limit`` of them."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def load_square(path: str | os.PathLike, size: int | None) -> np.ndarray:
    """Decode an image, centre-crop it to a square and resize it to ``size`` (None: keep)."""
    img = center_square(load_image(path))
    if size is not None and img.shape[0] != size:
        img = to_uint8(resize(to_tensor(img), size))
    return img
