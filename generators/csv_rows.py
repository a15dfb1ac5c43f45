"""Reading a user's CSV (the data CSV, the ratings CSV) row by row with line numbers, mapping
its header onto medrl's columns (aliases, normalised names), and the error that lists every
bad row by CSV line (header = line 1) before anything is stored.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- errors


class RowProblem(NamedTuple):
    """One problem of one CSV row. ``row`` is the CSV line number (header = line 1)."""

    row: int
    column: str
    reason: str


class DataValidationError(ValueError):
    """A data or label file has bad rows; every problem is listed and nothing was written."""

    def __init__(self, file: str | os.PathLike, problems: list[RowProblem]):
        self.file = Path(file)
        self.problems = sorted(problems, key=lambda p: p.row)
        super().__init__(self.render())

    def __reduce__(self):  # picklable (Ray sends exceptions between processes)
        return (type(self), (self.file, self.problems))

    def render(self) -> str:
        """All problems, one per line: ``line N (column): reason``."""
        rows = {p.row for p in self.problems if p.row > 1}
        header = any(p.row <= 1 for p in self.problems)
        parts = []
        if header:
            parts.append("bad header")
        if rows:
            parts.append(f"{len(rows)} bad row" + ("s" if len(rows) != 1 else ""))
        lines = [f"{self.file}: {' and '.join(parts) or 'invalid'}, nothing written:"]
        lines += [f"  line {p.row} ({p.column}): {p.reason}" for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


# --------------------------------------------------------------------------- CSV reading


def read_csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Read a CSV as (stripped header, iterator of (start line, cells)); blank rows skipped.

    Shared by ingestion and the label converters. Raises ValueError for unreadable files
    (:class:`DataValidationError` naming the line of a record that `csv` cannot read).
    """
    if path.suffix.lower() in (".xlsx", ".xls", ".xlsm"):
        raise ValueError(
            f"{path}: this is an Excel workbook; export the sheet to CSV (UTF-8) first "
            "(medrl reads CSV only; openpyxl is not a dependency)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as fh:
        if fh.read(4) == b"PK\x03\x04":
            raise ValueError(
                f"{path}: this is a zip/Excel file, not CSV; export the sheet to CSV (UTF-8) first"
            )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); save the file as CSV UTF-8") from exc
    records = _records(csv.reader(io.StringIO(text, newline="")), path)
    header: list[str] | None = None
    for _, cells in records:
        if any(c.strip() for c in cells):
            header = [c.strip() for c in cells]
            break
    if header is None:
        raise ValueError(f"{path}: empty file (no header row)")

    def rows() -> Iterator[tuple[int, list[str]]]:
        for start, cells in records:
            if any(c.strip() for c in cells):
                yield start, cells

    return header, rows()


def _records(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(start line, cells) of every record of ``reader``; one that ``csv`` cannot read
    raises :class:`DataValidationError` naming its line (nothing after it can be trusted)."""
    previous = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            column = "header" if previous == 0 else "row"
            raise DataValidationError(path, [RowProblem(previous + 1, column, _why(exc))]) from None
        yield previous + 1, cells
        previous = reader.line_num


def _why(exc: csv.Error) -> str:
    """What a ``csv.Error`` means for the person who wrote the file."""
    if "field larger than field limit" in str(exc):
        return (
            f"a field is longer than {csv.field_size_limit():,} characters; a quote opened "
            "and never closed makes the rest of the file one field: check the quotes from "
            "this line on"
        )
    return f"not readable as CSV ({exc})"


def map_columns(
    header: Sequence[str],
    columns: Sequence[str],
    aliases: Mapping[str, Sequence[str]],
    required: Sequence[str],
    normalise: Callable[[str], str] = str.lower,
) -> tuple[dict[str, int], list[RowProblem], list[str]]:
    """Map a CSV header onto ``columns`` (with their ``aliases``, compared after
    ``normalise``): (column -> position, problems on line 1, header names not used).

    A column given twice (under two of its names) and a missing ``required`` column are
    problems; unknown names are returned as ignored. Used for the data CSV here and for
    the ratings CSV (rewards.ratings).
    """
    lookup = {normalise(c): c for c in columns}
    for canonical, names in aliases.items():
        lookup.update({normalise(a): canonical for a in names})
    found: dict[str, int] = {}
    problems: list[RowProblem] = []
    ignored: list[str] = []
    for i, name in enumerate(header):
        canonical = lookup.get(normalise(name))
        if canonical is None:
            if name:
                ignored.append(name)
            continue
        if canonical in found:
            other = header[found[canonical]]
            problems.append(
                RowProblem(
                    1,
                    "header",
                    f"columns {other!r} and {name!r} both mean {canonical!r}; keep one",
                )
            )
            continue
        found[canonical] = i
    missing = [c for c in required if c not in found]
    if missing:
        accepted = "; ".join(
            f"{c}" + (f" (or {', '.join(aliases[c])})" if c in aliases else "") for c in missing
        )
        problems.append(
            RowProblem(
                1,
                "header",
                f"missing required column(s): {accepted}; header is {','.join(header)}",
            )
        )
    return found, problems, ignored
