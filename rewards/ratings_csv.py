"""Reading a ratings CSV (the CS787 columns, the six aspects, a round): the header mapped
onto medrl's columns, every row checked and normalised, problems listed by CSV line.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from generators.config import MODALITIES
from generators.csv_rows import DataValidationError, RowProblem, map_columns, read_csv_rows
from rewards.sheet import (
    ASPECT_MAX,
    ASPECTS,
    COLUMN_ALIASES,
    COLUMNS,
    RATING_VALUES,
    REQUIRED_COLUMNS,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- CSV parsing


def _norm_header(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def map_header(header: Sequence[str]) -> tuple[dict[str, int], list[RowProblem], list[str]]:
    """Map our column names to header positions (aliases, any case and punctuation)."""
    return map_columns(header, COLUMNS, COLUMN_ALIASES, REQUIRED_COLUMNS, _norm_header)


def parse_timestamp(text: str) -> str:
    """ISO 8601 (``2025-03-01T10:00:00Z``) or Unix seconds -> canonical ISO 8601 text.

    Canonical text is what the unique key compares, so ``2025-03-01 10:00`` and
    ``2025-03-01T10:00:00`` are the same moment. Raises ValueError when unreadable.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("timestamp is empty")
    try:
        seconds = float(raw)
    except ValueError:
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(
                f"timestamp {raw!r} is neither ISO 8601 (2025-03-01T10:00:00Z) nor Unix seconds"
            ) from None
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"timestamp {raw!r} is not a finite number")
        moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat()


def _parse_row(line: int, cells: dict[str, str], problems: list[RowProblem]) -> dict[str, Any]:
    """One CSV row -> a store row; appends every problem found."""
    row: dict[str, Any] = {}
    n_before = len(problems)
    image_path = cells["image_path"].strip()
    if not image_path:
        problems.append(RowProblem(line, "image_path", "image_path is empty"))
    row["image_path"] = image_path

    raw = cells["rating"].strip()
    try:
        value = float(raw)
        if not value.is_integer() or int(value) not in RATING_VALUES:
            raise ValueError
        row["rating"] = int(value)
    except ValueError:
        what = "rating is empty" if not raw else f"rating {raw!r} is not 1, 2 or 3"
        problems.append(RowProblem(line, "rating", f"{what} (1 poor, 2 fair, 3 good)"))

    modality = cells["modality"].strip().lower()
    if modality and modality not in MODALITIES:
        problems.append(
            RowProblem(
                line,
                "modality",
                f"unknown modality {cells['modality']!r}; allowed: {', '.join(MODALITIES)} "
                "or empty",
            )
        )
    row["modality"] = modality
    row["expert_level"] = cells["expert_level"].strip()
    row["prompt"] = cells["prompt"].strip()
    row["rater_id"] = cells["rater_id"].strip()
    if not row["rater_id"]:
        problems.append(RowProblem(line, "rater_id", "rater_id is empty"))
    try:
        row["timestamp"] = parse_timestamp(cells["timestamp"])
    except ValueError as exc:
        problems.append(RowProblem(line, "timestamp", str(exc)))
    row["generator_ckpt"] = cells["generator_ckpt"].strip()
    row["round"] = cells["round"].strip()

    raw = cells["seed"].strip()
    row["seed"] = None
    if raw:
        try:
            seed = float(raw)
            if not seed.is_integer():
                raise ValueError
            row["seed"] = int(seed)
        except ValueError:
            problems.append(RowProblem(line, "seed", f"seed {raw!r} is not an integer"))

    for aspect in ASPECTS:
        raw = cells[aspect].strip()
        row[aspect] = None
        if not raw:
            continue
        try:
            value = float(raw)
            if not 0.0 <= value <= ASPECT_MAX:  # also rejects nan
                raise ValueError
            row[aspect] = value
        except ValueError:
            problems.append(
                RowProblem(line, aspect, f"{aspect} {raw!r} is not a number from 0 to 10")
            )
    row["_ok"] = len(problems) == n_before
    return row


#: Cells a rater fills; a row of a rating sheet with all of them empty was not rated.
_RATER_CELLS: tuple[str, ...] = ("rating", "rater_id", "timestamp") + ASPECTS


def read_csv(
    path: Path, skip_unrated: bool = False
) -> tuple[list[dict[str, Any]], list[RowProblem], int]:
    """Rows that parsed (``source_line`` = CSV line), every problem found, and the number
    of rows skipped as not rated (``skip_unrated``: rows whose rater cells are all empty,
    as a rating sheet's rows are until a rater fills them).

    A header problem raises at once (the rows cannot be read without the header).
    """
    header, raw_rows = read_csv_rows(path)
    columns, problems, ignored = map_header(header)
    if problems:
        raise DataValidationError(path, problems)
    if ignored:
        log.info("%s: ignoring columns %s", path.name, ", ".join(ignored))
    rows: list[dict[str, Any]] = []
    first_line: dict[tuple[str, str, str, str], int] = {}
    seen = unrated = 0
    for line, cells in raw_rows:
        seen += 1
        values = {
            c: (cells[columns[c]] if c in columns and columns[c] < len(cells) else "")
            for c in COLUMNS
        }
        if skip_unrated and not any(values[c].strip() for c in _RATER_CELLS):
            unrated += 1
            continue
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header) :]):
            problems.append(
                RowProblem(line, "row", f"{len(cells)} fields but the header has {len(header)}")
            )
        row = _parse_row(line, values, problems)
        if not row.pop("_ok"):
            continue
        key = rating_key(row)
        if key in first_line:
            problems.append(
                RowProblem(
                    line,
                    "row",
                    f"same image_path, rater_id, timestamp and round as line {first_line[key]}",
                )
            )
            continue
        first_line[key] = line
        row["source"] = path.name
        row["source_line"] = line
        rows.append(row)
    if not seen:
        problems.append(RowProblem(1, "header", "no data rows under the header"))
    elif skip_unrated and unrated == seen:
        problems.append(RowProblem(1, "row", "no row of this sheet has been rated yet"))
    return rows, problems, unrated


def rating_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """The store's unique key of a row: one rater's rating of one image at one time in
    one round."""
    return (row["image_path"], row["rater_id"], row["timestamp"], row["round"])


def parse_ratings_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a ratings CSV; returns store rows (``source_line`` = CSV line).

    Raises:
        DataValidationError: any bad row or header; every problem listed with its line.
        FileNotFoundError / ValueError: the file cannot be read as CSV at all.
    """
    path = Path(path)
    rows, problems, _ = read_csv(path)
    if problems:
        raise DataValidationError(path, problems)
    return rows
