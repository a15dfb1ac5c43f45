"""Image-text datasets: the data CSV, its validation, the Parquet manifest, the training set.

The flow is ``data.csv`` -> :func:`ingest_csv` (validates every row, writes
``manifest.parquet`` or nothing) -> :func:`read_manifest` / :class:`ManifestDataset`.
The formats are described in docs/data.md.

Row numbers in every message are *CSV line numbers* as a text editor shows them: the
header is line 1, the first data row is line 2 (a quoted field spanning several lines
is counted by the line its row starts on); reading CSV rows, mapping headers and the error
that lists the bad rows are :mod:`generators.csv_rows`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from generators.config import MODALITIES, SPLITS
from generators.csv_rows import DataValidationError, RowProblem, map_columns, read_csv_rows
from generators.images import ImageDecodeError, center_square, load_image, resize, to_tensor
from runfiles import atomic_path, check_format

log = logging.getLogger(__name__)

#: Our data CSV columns, in order; the first three are required.
COLUMNS: tuple[str, ...] = (
    "path",
    "Text",
    "modality",
    "split",
    "source_dataset",
    "label",
    "laterality",
    "patient_id",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "Text", "modality")

#: Other header names accepted for our columns (MINIM and CS787 CSVs); matching ignores case.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("image_path", "image", "filepath"),
    "Text": ("text", "prompt", "caption", "report"),
    "modality": ("modal",),
}

LATERALITIES: tuple[str, ...] = ("left", "right", "unknown")

#: Smallest and largest image side (pixels) ingestion accepts.
MIN_SIDE, MAX_SIDE = 16, 16384

#: Key of the JSON metadata in the manifest's Parquet schema, and the format version.
MANIFEST_KEY = b"medrl"
MANIFEST_FORMAT = "medrl-manifest"
MANIFEST_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("path", pa.string()),
        ("Text", pa.string()),
        ("modality", pa.string()),
        ("split", pa.string()),
        ("source_dataset", pa.string()),
        ("label", pa.string()),
        ("laterality", pa.string()),
        ("patient_id", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("sha256", pa.string()),
    ]
)


# --------------------------------------------------------------------------- ingestion


@dataclass
class IngestReport:
    """What :func:`ingest_csv` wrote."""

    manifest: Path
    rows: int
    modalities: dict[str, int]
    splits: dict[str, int]
    #: Groups of paths whose files have identical bytes (same split: a warning only).
    duplicates: list[list[str]] = field(default_factory=list)


@dataclass
class _Row:
    line: int
    values: dict[str, str]
    rel: str = ""
    resolved: Path | None = None
    width: int = 0
    height: int = 0
    sha256: str = ""
    problems: list[RowProblem] = field(default_factory=list)


def _check_fields(row: _Row) -> None:
    v, line, problems = row.values, row.line, row.problems
    if not v["Text"].strip():
        problems.append(RowProblem(line, "Text", "Text is empty"))
    modality = v["modality"].strip().lower()
    if modality not in MODALITIES:
        what = f"unknown modality {v['modality']!r}" if modality else "modality is empty"
        problems.append(RowProblem(line, "modality", f"{what}; allowed: {', '.join(MODALITIES)}"))
    split = v["split"].strip().lower() or "train"
    if split not in SPLITS:
        problems.append(
            RowProblem(line, "split", f"unknown split {v['split']!r}; allowed: {', '.join(SPLITS)}")
        )
    laterality = v["laterality"].strip().lower()
    if laterality and laterality not in LATERALITIES:
        problems.append(
            RowProblem(
                line,
                "laterality",
                f"unknown laterality {v['laterality']!r}; allowed: {', '.join(LATERALITIES)} "
                "or empty",
            )
        )


def _check_path(row: _Row, root: Path, root_resolved: Path) -> None:
    """Lexical and symlink containment, existence. Sets ``rel`` and ``resolved``."""
    raw, line = row.values["path"].strip(), row.line
    if not raw:
        row.problems.append(RowProblem(line, "path", "path is empty"))
        return
    if PurePosixPath(raw).is_absolute() or os.path.isabs(raw):
        row.problems.append(
            RowProblem(
                line, "path", f"{raw!r} is absolute; paths must be relative to the dataset root"
            )
        )
        return
    rel = posixpath.normpath(raw.replace(os.sep, "/"))
    if rel == ".." or rel.startswith("../"):
        row.problems.append(RowProblem(line, "path", f"{raw!r} escapes the dataset root {root}"))
        return
    candidate = root / rel
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte
        row.problems.append(RowProblem(line, "path", f"{raw!r} cannot be resolved ({exc})"))
        return
    if not resolved.is_relative_to(root_resolved):
        row.problems.append(
            RowProblem(
                line,
                "path",
                f"{raw!r} resolves to {resolved} (through a symlink), "
                f"outside the dataset root {root_resolved}",
            )
        )
        return
    if not resolved.exists():
        row.problems.append(RowProblem(line, "path", f"{raw!r}: no such file {candidate}"))
        return
    if not resolved.is_file():
        row.problems.append(RowProblem(line, "path", f"{raw!r} is not a file ({candidate})"))
        return
    row.rel, row.resolved = rel, resolved


def _check_image(row: _Row) -> _Row:
    """Hash and decode one image (runs in a worker thread)."""
    assert row.resolved is not None
    raw = row.values["path"].strip()
    try:
        data = row.resolved.read_bytes()
        row.sha256 = hashlib.sha256(data).hexdigest()
        image = load_image(row.resolved)
    except ImageDecodeError as exc:
        reason = str(exc)
        prefix = f"{row.resolved}: "
        reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
        row.problems.append(RowProblem(row.line, "path", f"{raw!r}: {reason}"))
        return row
    except OSError as exc:
        row.problems.append(RowProblem(row.line, "path", f"{raw!r}: cannot read ({exc})"))
        return row
    row.height, row.width = int(image.shape[0]), int(image.shape[1])
    if min(row.width, row.height) < MIN_SIDE or max(row.width, row.height) > MAX_SIDE:
        row.problems.append(
            RowProblem(
                row.line,
                "path",
                f"{raw!r} is {row.width}x{row.height} px; each side must be "
                f"{MIN_SIDE} to {MAX_SIDE} px",
            )
        )
    return row


def _cross_row_checks(rows: list[_Row]) -> list[list[str]]:
    """Duplicate paths (error) and duplicate bytes (warning; error across splits)."""
    first_by_file: dict[Path, _Row] = {}
    for row in rows:
        if row.resolved is None:
            continue
        first = first_by_file.setdefault(row.resolved, row)
        if first is not row:
            row.problems.append(
                RowProblem(
                    row.line,
                    "path",
                    f"duplicate row: {row.values['path'].strip()!r} is the same file as line "
                    f"{first.line}",
                )
            )
    by_hash: dict[str, list[_Row]] = defaultdict(list)
    for row in first_by_file.values():
        if row.sha256 and not row.problems:
            by_hash[row.sha256].append(row)
    duplicates: list[list[str]] = []
    for digest, group in by_hash.items():
        if len(group) < 2:
            continue
        splits = {_split(r) for r in group}
        if len(splits) == 1:
            duplicates.append([r.rel for r in group])
            continue
        first = group[0]
        for row in group[1:]:
            if _split(row) != _split(first):
                row.problems.append(
                    RowProblem(
                        row.line,
                        "path",
                        f"same image bytes (sha256 {digest[:12]}) as line {first.line} "
                        f"{first.rel!r}, which is in split {_split(first)!r} while this row "
                        f"is in {_split(row)!r}: the copy leaks evaluation data",
                    )
                )
    return duplicates


def _split(row: _Row) -> str:
    return row.values["split"].strip().lower() or "train"


def ingest_csv(
    csv: str | os.PathLike,
    root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
) -> IngestReport:
    """Validate every row of a data CSV and write its Parquet manifest.

    Args:
        csv: the data CSV (``path,Text,modality[,split,...]``; aliases accepted).
        root: dataset root every image must lie in; default: the CSV's directory.
        out: manifest path; default ``<root>/manifest.parquet``.
        workers: threads decoding images (default: up to 8).

    Raises:
        DataValidationError: any bad row; lists all of them, and nothing is written.
        FileNotFoundError / ValueError: the CSV or root cannot be read at all.
    """
    csv_path = Path(csv).absolute()
    root_path = Path(root).absolute() if root is not None else csv_path.parent
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {root_path} is not a directory")
    root_resolved = root_path.resolve()
    out_path = Path(out).absolute() if out is not None else root_path / "manifest.parquet"

    rows = _read_rows(csv, csv_path, root_path, root_resolved)
    _check_images(rows, workers or min(8, os.cpu_count() or 1), csv_path.name)
    duplicates = _cross_row_checks(rows)
    problems = [p for r in rows for p in r.problems]
    if problems:
        raise DataValidationError(csv, problems)
    for group in duplicates:
        log.warning(
            "%s: identical image bytes under different paths (same split): %s",
            csv_path.name,
            ", ".join(group),
        )
    _warn_patients_across_splits(rows, csv_path.name)
    table = _write_manifest(rows, root_resolved, csv_path, out_path)
    return IngestReport(
        manifest=out_path,
        rows=len(rows),
        modalities=dict(Counter(table.column("modality").to_pylist())),
        splits=dict(Counter(table.column("split").to_pylist())),
        duplicates=duplicates,
    )


def _read_rows(
    csv: str | os.PathLike, csv_path: Path, root_path: Path, root_resolved: Path
) -> list[_Row]:
    """Read the data CSV's rows and check each one's fields and path (not its image)."""
    header, raw_rows = read_csv_rows(csv_path)
    columns, problems, ignored = map_columns(header, COLUMNS, COLUMN_ALIASES, REQUIRED_COLUMNS)
    if problems:
        raise DataValidationError(csv, problems)
    if ignored:
        log.info("%s: ignoring columns %s", csv_path.name, ", ".join(ignored))
    rows: list[_Row] = []
    for line, cells in raw_rows:
        values = {
            c: (cells[columns[c]] if c in columns and columns[c] < len(cells) else "")
            for c in COLUMNS
        }
        row = _Row(line, values)
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header) :]):
            row.problems.append(
                RowProblem(line, "row", f"{len(cells)} fields but the header has {len(header)}")
            )
        _check_fields(row)
        _check_path(row, root_path, root_resolved)
        rows.append(row)
    if not rows:
        raise DataValidationError(csv, [RowProblem(1, "header", "no data rows under the header")])
    return rows


def _check_images(rows: list[_Row], workers: int, name: str) -> None:
    """Hash and decode the image of every row whose path passed, in ``workers`` threads."""
    to_decode = [r for r in rows if r.resolved is not None]
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(rows), desc=f"checking {name}", unit="row") as bar,
    ):
        bar.update(len(rows) - len(to_decode))
        for _ in pool.map(_check_image, to_decode):
            bar.update(1)


def _warn_patients_across_splits(rows: list[_Row], name: str) -> None:
    """Warn when a patient's images lie in more than one split."""
    patient_splits: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.values["patient_id"].strip():
            patient_splits[row.values["patient_id"].strip()].add(_split(row))
    crossing = sorted(p for p, s in patient_splits.items() if len(s) > 1)
    if crossing:
        log.warning(
            "%s: %d patient(s) have images in more than one split (e.g. %s); "
            "split by patient to keep evaluation honest",
            name,
            len(crossing),
            ", ".join(crossing[:5]),
        )


def _write_manifest(
    rows: list[_Row], root_resolved: Path, csv_path: Path, out_path: Path
) -> pa.Table:
    """Write the checked rows and the manifest metadata to ``out_path`` atomically."""
    table = pa.table(
        {
            "row": [r.line for r in rows],
            "path": [r.rel for r in rows],
            "Text": [r.values["Text"].strip() for r in rows],
            "modality": [r.values["modality"].strip().lower() for r in rows],
            "split": [_split(r) for r in rows],
            "source_dataset": [r.values["source_dataset"].strip() for r in rows],
            "label": [r.values["label"].strip() for r in rows],
            "laterality": [r.values["laterality"].strip().lower() or "unknown" for r in rows],
            "patient_id": [r.values["patient_id"].strip() for r in rows],
            "width": [r.width for r in rows],
            "height": [r.height for r in rows],
            "sha256": [r.sha256 for r in rows],
        },
        schema=MANIFEST_SCHEMA,
    )
    meta = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "root": str(root_resolved),
        "csv": str(csv_path),
        "rows": len(rows),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    table = table.replace_schema_metadata({MANIFEST_KEY: json.dumps(meta).encode()})
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return table


# --------------------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Load a manifest written by :func:`ingest_csv`.

    ``path`` in the result is absolute (resolved against the stored root, or ``root`` when
    given, e.g. after the data moved); ``relpath`` keeps the stored relative path. The
    manifest metadata (root, source CSV, version) is in ``frame.attrs["medrl"]``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a medrl manifest (not Parquet, no metadata, wrong
            version or columns).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest; write one with `medrl data ingest`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a Parquet manifest ({exc})") from exc
    raw = (table.schema.metadata or {}).get(MANIFEST_KEY)
    if raw is None:
        raise ValueError(
            f"{path}: not a medrl manifest (no {MANIFEST_KEY.decode()!r} metadata); "
            "write one with `medrl data ingest <data.csv>`"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: manifest metadata is not JSON ({exc})") from exc
    check_format(meta, MANIFEST_FORMAT, MANIFEST_VERSION, str(path), "manifest",
                 "upgrade medrl or re-ingest")  # fmt: skip
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {', '.join(missing)}; re-ingest")
    base = Path(root).absolute() if root is not None else Path(meta["root"])
    if not base.is_dir():
        log.warning("%s: dataset root %s does not exist (pass root= if data moved)", path, base)
    frame = table.to_pandas()
    frame["relpath"] = frame["path"]
    frame["path"] = [str(base / p) for p in frame["relpath"]]
    frame.attrs["medrl"] = {**meta, "root": str(base), "manifest": str(path.absolute())}
    return frame


class ManifestDataset(torch.utils.data.Dataset):
    """Image-text pairs from a manifest, for fine-tuning.

    Each item is ``{"pixel_values": float (3, res, res) in [-1, 1], "text": str,
    "index": int}`` (``index`` = position in this dataset). Images are centre-cropped to
    a square and resized; there is deliberately no random horizontal flip: mirroring a
    fundus photograph turns a left eye into a right one (and moves the optic disc), so
    the image would contradict its laterality in the prompt.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | pd.DataFrame,
        resolution: int,
        split: str | None = "train",
        modality: str | None = None,
    ):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
        name = frame.attrs.get("medrl", {}).get("manifest", "<manifest>")
        keep = pd.Series(True, index=frame.index)
        if split is not None:
            keep &= frame["split"] == split.lower()
        if modality is not None:
            keep &= frame["modality"] == modality.lower()
        self.frame = frame[keep].reset_index(drop=True)
        self.resolution = resolution
        if self.frame.empty:
            raise ValueError(
                f"{name}: no rows with split={split!r}, modality={modality!r} "
                f"(it has splits {sorted(set(frame['split']))}, "
                f"modalities {sorted(set(frame['modality']))})"
            )

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def texts(self) -> list[str]:
        """The captions, in dataset order."""
        return self.frame["Text"].tolist()

    def __getitem__(self, i: int) -> dict:
        row = self.frame.iloc[i]
        image = center_square(load_image(row["path"]))
        pixels = resize(to_tensor(image), self.resolution)
        return {"pixel_values": pixels, "text": str(row["Text"]), "index": int(i)}
