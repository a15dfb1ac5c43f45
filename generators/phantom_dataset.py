"""The embedded demo dataset: :func:`write_demo_dataset` renders phantoms into a folder
of PNGs with ``data.csv`` and ``phantom.jsonl`` (the records, the ground truth), committed
in one step; :func:`grid_figure` draws the labelled grids of the docs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from generators.datasets import COLUMNS
from generators.images import make_grid, save_png
from generators.phantom import DR_GRADE_PROBS, PHANTOM_VERSION, PhantomRecord, sample_record
from generators.phantom_render import render
from runfiles import commit_folder

#: the dataset's data.csv columns: those of medrl's data CSV
CSV_COLUMNS = COLUMNS
#: the dataset's parameters (count, size, seed, version): a folder made with others is redone
PARAMS_FILE = "phantom.json"


# --------------------------------------------------------------------------- dataset


def _dataset_records(count: int, seed: int) -> list[tuple[PhantomRecord, str]]:
    """(record, patient id): images 2k and 2k+1 are the right and left eye of one patient.

    The second eye has the first eye's DR grade with probability 0.6, else a fresh draw
    (both are draws from DR_GRADE_PROBS, so the grade shares stay as listed).
    """
    rng = np.random.default_rng(seed)
    out: list[tuple[PhantomRecord, str]] = []
    for i in range(count):
        laterality = "right" if i % 2 == 0 else "left"
        if i % 2 == 1 and rng.random() < 0.6:
            grade = out[-1][0].dr_grade
        else:
            grade = int(rng.choice(5, p=DR_GRADE_PROBS))
        record = sample_record(rng, f"phantom-{i:05d}", laterality=laterality, dr_grade=grade)
        out.append((record, f"phantom-p{i // 2:05d}"))
    return out


def _val_patients(n_patients: int, val_fraction: float, seed: int) -> set[int]:
    """Patients (both eyes) in the val split: a seeded shuffle, round(fraction * n)."""
    n_val = round(val_fraction * n_patients)
    if val_fraction > 0 and n_patients > 1:
        n_val = max(n_val, 1)
    order = np.random.default_rng([seed, 1]).permutation(n_patients)
    return {int(p) for p in order[:n_val]}


def _dataset_params(count: int, size: int, seed: int, val_fraction: float) -> dict[str, Any]:
    return {
        "generator": "medrl phantom",
        "version": PHANTOM_VERSION,
        "count": count,
        "size": size,
        "seed": seed,
        "val_fraction": val_fraction,
    }


def write_demo_dataset(
    out: str | os.PathLike,
    count: int = 384,
    size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> Path:
    """Write the phantom dataset to ``out`` and return the path of its data.csv.

    ``out`` gets images/phantom-NNNNN.png, data.csv (the generator CSV columns), phantom.jsonl
    (one record per line, with its image "path") and phantom.json (the parameters). All of
    it is written to a temporary sibling directory that is renamed into place at the end,
    so an interrupted run leaves nothing. An existing non-empty ``out`` is an error unless
    it is a complete phantom dataset with the same parameters (then it is kept as is).
    """
    if count < 1 or size < 16 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"bad phantom parameters: count={count} size={size} val={val_fraction}")
    out = Path(out)
    params = _dataset_params(count, size, seed, val_fraction)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            try:
                same = json.loads((out / PARAMS_FILE).read_text()) == params
            except (OSError, ValueError):
                same = False
            if same and (out / "data.csv").is_file() and (out / "phantom.jsonl").is_file():
                print(f"phantom dataset already in {out} (same parameters): keeping it")
                return out / "data.csv"
            raise FileExistsError(
                f"{out}: directory is not empty and is not a phantom dataset with "
                f"count={count}, size={size}, seed={seed}, val_fraction={val_fraction}; "
                "choose another directory or remove it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling made with mkdir (not mkdtemp: the dataset keeps the umask's mode)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        records = _dataset_records(count, seed)
        val = _val_patients((count + 1) // 2, val_fraction, seed)
        rows, lines = [], []
        for i, (record, patient) in enumerate(
            tqdm(records, desc=f"phantom {size}px", unit="img", mininterval=1.0)
        ):
            rel = f"images/{record.id}.png"
            save_png(render(record, size), tmp / rel)
            split = "val" if i // 2 in val else "train"
            rows.append((rel, record.prompt, "fundus", split, "phantom", record.dr_grade,
                         record.laterality, patient))  # fmt: skip
            lines.append(json.dumps({"path": rel, **record.to_dict()}))
        with open(tmp / "data.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
        (tmp / "phantom.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        commit_folder(tmp, out)  # fsynced; out was empty (removed above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "data.csv"


def load_records(out: str | os.PathLike) -> list[PhantomRecord]:
    """The records of a phantom dataset directory (from its phantom.jsonl), in file order."""
    path = Path(out) / "phantom.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [PhantomRecord.from_dict(json.loads(line)) for line in fh if line.strip()]


# --------------------------------------------------------------------------- figures


def grid_figure(size: int, count: int, seed: int, ncols: int | None = None) -> np.ndarray:
    """A labelled grid of phantoms covering DR grades 0..4 in turn (the docs figures)."""
    rng = np.random.default_rng(seed)
    records = [sample_record(rng, f"grid-{i}", dr_grade=i % 5) for i in range(count)]
    images = [render(record, size) for record in records]
    if size < 128:  # make_grid fits about size / 6 characters under each image
        labels = [f"DR{r.dr_grade} {r.laterality[0].upper()} Q{r.quality_grade}" for r in records]
    else:
        labels = [
            f"DR{r.dr_grade}, {r.laterality} eye, CDR {r.cup_to_disc:.1f}, quality {r.quality_grade}"
            for r in records
        ]
    if ncols is None:
        rows = math.ceil(count / (8 if size <= 128 else 3))
        ncols = math.ceil(count / rows)
    return make_grid(images, ncols=ncols, labels=labels)
