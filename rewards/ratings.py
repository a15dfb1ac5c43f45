"""Expert ratings: the CS787-compatible ratings CSV, the SQLite store, agreement between raters.

The flow is ``ratings.csv`` -> :func:`ingest_ratings` (validates every row; stores all
of them in one transaction, or nothing) -> the project's SQLite file -> training
(:func:`read_ratings`), :func:`export_ratings` (CSV or Parquet) and
:func:`agreement_report`. docs/rewards.md describes every column.

Row numbers in messages are CSV line numbers (header = line 1), as in
:mod:`generators.csv_rows`, whose :class:`DataValidationError` and :class:`RowProblem`
are reused here.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from generators.config import MODALITIES
from generators.csv_rows import DataValidationError, RowProblem, map_columns, read_csv_rows
from rewards import rounds
from rewards.sheet import (
    ASPECT_MAX,
    ASPECTS,
    COLUMN_ALIASES,
    COLUMNS,
    EXPORT_COLUMNS,
    RATING_VALUES,
    REQUIRED_COLUMNS,
    ROUND_COLUMN,
)
from runfiles import atomic_path

log = logging.getLogger(__name__)


#: 1: the CS787 columns and aspects, unique (image_path, rater_id, timestamp).
#: 2: a ``round`` column, unique (image_path, rater_id, timestamp, round); version 1
#: stores are migrated when opened (their ratings get round "").
SCHEMA_VERSION = 2
_RATINGS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY,
    image_path TEXT NOT NULL,
    rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 3),
    modality TEXT NOT NULL DEFAULT '',
    expert_level TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL DEFAULT '',
    rater_id TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    generator_ckpt TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    round TEXT NOT NULL DEFAULT '',
    clinical_realism REAL CHECK (clinical_realism BETWEEN 0 AND 10),
    prompt_faithfulness REAL CHECK (prompt_faithfulness BETWEEN 0 AND 10),
    abnormality_detectability REAL CHECK (abnormality_detectability BETWEEN 0 AND 10),
    colour_contrast REAL CHECK (colour_contrast BETWEEN 0 AND 10),
    intra_set_diversity REAL CHECK (intra_set_diversity BETWEEN 0 AND 10),
    confidence_of_use REAL CHECK (confidence_of_use BETWEEN 0 AND 10),
    source TEXT NOT NULL DEFAULT '',
    source_line INTEGER,
    ingested_at TEXT NOT NULL,
    UNIQUE (image_path, rater_id, timestamp, round)
)"""
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL,
    applied_at TEXT NOT NULL
);
"""
    + _RATINGS_TABLE.format(name="ratings")
    + """;
CREATE INDEX IF NOT EXISTS ratings_by_image ON ratings (image_path, prompt);
"""
)


def normalise_rating(rating: float) -> float:
    """Rating 1..3 -> [0, 1] as (r - 1) / 2 (CS787)."""
    return (float(rating) - 1.0) / 2.0


# --------------------------------------------------------------------------- the store


def connect(db: str | os.PathLike) -> sqlite3.Connection:
    """Open (creating if needed) a ratings store: WAL mode, schema checked.

    The connection is in autocommit mode; writers open their own transaction.

    Raises:
        ValueError: the file is not SQLite, or its schema is newer than this medrl.
    """
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        version = row[0]
        if version is None:
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (SCHEMA_VERSION, _now()),
            )
        elif version > SCHEMA_VERSION:
            raise ValueError(
                f"{path}: ratings store schema version {version} is newer than this medrl "
                f"reads ({SCHEMA_VERSION}); upgrade medrl"
            )
        elif version < SCHEMA_VERSION:
            _migrate(conn, int(version), path)
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ValueError(f"{path}: not a medrl ratings store (SQLite said: {exc})") from exc
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
    conn.row_factory = sqlite3.Row
    return conn


def _migrate(conn: sqlite3.Connection, version: int, path: Path) -> None:
    """Bring a store of an older schema to :data:`SCHEMA_VERSION` (inside the caller's
    transaction, so a failure leaves the store as it was)."""
    if version == 1:
        # SQLite cannot change a UNIQUE constraint in place: rebuild the table
        old = [r[1] for r in conn.execute("PRAGMA table_info(ratings)").fetchall()]
        conn.execute(_RATINGS_TABLE.format(name="ratings_v2"))
        kept = ", ".join(c for c in old if c != ROUND_COLUMN)
        conn.execute(f"INSERT INTO ratings_v2 ({kept}, round) SELECT {kept}, '' FROM ratings")
        conn.execute("DROP TABLE ratings")
        conn.execute("ALTER TABLE ratings_v2 RENAME TO ratings")
        conn.execute("CREATE INDEX IF NOT EXISTS ratings_by_image ON ratings (image_path, prompt)")
        n = conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
        log.info("%s: ratings store migrated to schema 2 (round column; %d ratings)", path, n)
        version = 2
    conn.execute(
        "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, _now())
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _read_csv(
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
        key = _key(row)
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


def _key(row: dict[str, Any]) -> tuple[str, str, str, str]:
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
    rows, problems, _ = _read_csv(path)
    if problems:
        raise DataValidationError(path, problems)
    return rows


# --------------------------------------------------------------------------- ingest / export

_STORED = COLUMNS + ("source", "source_line")


@dataclass
class RatingsIngestReport:
    """What :func:`ingest_ratings` did."""

    db: Path
    rows: int
    inserted: int
    #: Rows already stored with identical values (re-ingesting a file adds nothing).
    already_stored: int
    raters: dict[str, int] = field(default_factory=dict)
    images: int = 0
    total_in_store: int = 0
    #: Rows of a rating sheet nobody rated (skipped).
    unrated: int = 0
    #: Rows per rating round ("" for ratings outside a round).
    rounds: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rounds = ", ".join(f"{r or '(none)'} ({n})" for r, n in sorted(self.rounds.items()))
        return (
            f"{self.rows} rows valid: {self.inserted} stored, {self.already_stored} already "
            f"in {self.db} ({self.total_in_store} ratings there now, {self.images} images in "
            f"this file, raters: "
            + ", ".join(f"{r} ({n})" for r, n in sorted(self.raters.items()))
            + (f"; rounds: {rounds}" if rounds else "")
            + (f"; {self.unrated} sheet rows not rated, skipped" if self.unrated else "")
            + ")"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b))
    return a == b


def ingest_ratings(
    csv_path: str | os.PathLike,
    db: str | os.PathLike,
    *,
    images_root: str | os.PathLike | None = None,
    round_dir: str | os.PathLike | None = None,
    images_from: str | os.PathLike | None = None,
) -> RatingsIngestReport:
    """Validate a ratings CSV and add its rows to the SQLite store, in one transaction.

    A row whose key (image_path, rater_id, timestamp, round) is already stored with the
    same values is skipped, so ingesting a file twice adds nothing; the same key with
    different values is an error naming the line and what is stored.

    A CSV beside a rating round's key file (a sheet from ``medrl ratings export-round``,
    :mod:`rewards.rounds`) is a filled **rating sheet**: rows nobody rated are skipped,
    every rated row must name an image of the round with its prompt, and the key fills
    in ``generator_ckpt``, ``seed`` and ``round``; ``image_path`` is stored relative to
    ``images_root`` (default: the store's folder) when the image lies under it, else
    absolute, so training finds the images of every round from one root. ``round_dir``
    names the round folder of a filled sheet kept elsewhere.

    ``images_from`` (any CSV): the CSV's relative image paths are relative to this folder
    (e.g. a rating pool's); they are stored relative to ``images_root`` (default: the
    store's folder), or absolute when outside it, so ratings of images in several
    folders train from one images root.

    Raises:
        DataValidationError: bad rows, including clashes with stored ratings (all listed
            with their CSV line); nothing is stored.
    """
    csv_path = Path(csv_path)
    key = rounds.find_key(csv_path, round_dir)
    sheet_dir = Path(round_dir) if round_dir is not None else csv_path.parent
    rows, problems, unrated = _read_csv(csv_path, skip_unrated=key is not None)
    root = Path(images_root) if images_root is not None else Path(db).parent
    if key is not None:
        rows = rounds.apply_key(rows, key, sheet_dir, root, problems)
    elif images_from is not None:
        for row in rows:
            if not Path(row["image_path"]).is_absolute():
                row["image_path"] = rounds.stored_path(Path(images_from) / row["image_path"], root)
    if key is not None or images_from is not None:
        keys: dict[tuple[str, str, str, str], int] = {}
        for row in rows:  # rewritten paths: check the file's own key again
            if _key(row) in keys:
                problems.append(
                    RowProblem(
                        row["source_line"],
                        "row",
                        f"same image, rater_id, timestamp and round as line {keys[_key(row)]}",
                    )
                )
            keys.setdefault(_key(row), row["source_line"])
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")  # lock first, so checks and inserts see one state
        try:
            fresh: list[dict[str, Any]] = []
            for row in rows:
                stored = conn.execute(
                    "SELECT * FROM ratings WHERE image_path = ? AND rater_id = ? "
                    "AND timestamp = ? AND round = ?",
                    _key(row),
                ).fetchone()
                if stored is None:
                    fresh.append(row)
                    continue
                differ = [c for c in COLUMNS if not _same(row[c], stored[c])]
                if differ:
                    what = ", ".join(f"{c} {stored[c]!r} (file: {row[c]!r})" for c in differ)
                    problems.append(
                        RowProblem(
                            row["source_line"],
                            "row",
                            f"already stored from {stored['source']} line "
                            f"{stored['source_line']} with different values: {what}",
                        )
                    )
            if problems:
                raise DataValidationError(csv_path, problems)
            insert_ratings(conn, fresh, _now())
            total = conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return RatingsIngestReport(
        db=Path(db),
        rows=len(rows),
        inserted=len(fresh),
        already_stored=len(rows) - len(fresh),
        raters=dict(Counter(r["rater_id"] for r in rows)),
        images=len({r["image_path"] for r in rows}),
        total_in_store=int(total),
        unrated=unrated,
        rounds=dict(Counter(r["round"] for r in rows)),
    )


def insert_ratings(
    conn: sqlite3.Connection, rows: Sequence[dict[str, Any]], ingested_at: str
) -> list[int]:
    """Insert validated rows (every column of :data:`COLUMNS`, ``source``, ``source_line``)
    inside the caller's transaction; their row ids. :func:`ingest_ratings` and the rating
    workbench store ratings through here."""
    sql = (
        f"INSERT INTO ratings ({', '.join(_STORED)}, ingested_at) "
        f"VALUES ({', '.join('?' * (len(_STORED) + 1))})"
    )
    return [
        int(conn.execute(sql, tuple(r[c] for c in _STORED) + (ingested_at,)).lastrowid)
        for r in rows
    ]


def read_ratings(source: str | os.PathLike) -> pd.DataFrame:
    """All ratings from a store (``.db``/``.sqlite``), a ratings CSV or an exported Parquet.

    Columns: :data:`EXPORT_COLUMNS` (aspects NaN where not given, seed nullable), in
    insertion / file order. A CSV is validated exactly as by :func:`ingest_ratings`.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ratings store or file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.DataFrame(parse_ratings_csv(path), columns=list(COLUMNS))
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
        if ROUND_COLUMN not in frame.columns:  # exported before rounds existed
            frame[ROUND_COLUMN] = ""
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: not an exported ratings table (lacks {', '.join(missing)})")
        frame = frame[list(COLUMNS)]
    else:
        conn = connect(path)
        try:
            frame = pd.read_sql_query(f"SELECT {', '.join(COLUMNS)} FROM ratings ORDER BY id", conn)
        finally:
            conn.close()
    frame["seed"] = frame["seed"].astype("Int64")
    for aspect in ASPECTS:
        frame[aspect] = frame[aspect].astype("float64")
    frame["rating"] = frame["rating"].astype("int64")
    frame["rating_norm"] = (frame["rating"] - 1) / 2.0
    return frame.reset_index(drop=True)


def export_ratings(db: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write every stored rating to ``out`` (``.csv`` or ``.parquet``), atomically.

    The CSV has the CS787 columns, the six aspects and ``rating_norm``, and ingests
    back unchanged (``rating_norm`` is ignored on the way in).
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"{out}: export to a .csv or .parquet file")
    if not Path(db).is_file():
        raise FileNotFoundError(f"{db}: no such ratings store; ingest ratings first")
    frame = read_ratings(db)[list(EXPORT_COLUMNS)]
    with atomic_path(out) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(EXPORT_COLUMNS)
                for rec in frame.itertuples(index=False):
                    writer.writerow(["" if _missing(v) else _fmt(v) for v in rec])
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            pq.write_table(table, tmp)
    return out


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else repr(v)
    return str(v)


# --------------------------------------------------------------------------- agreement

Metric = Literal["nominal", "ordinal", "interval"]


def krippendorff_alpha(
    units: Iterable[Sequence[float]], metric: Metric = "ordinal"
) -> float | None:
    """Krippendorff's alpha of reliability data given as the values of each unit.

    Written here from Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability":
    the ``krippendorff`` package is not available offline and nothing else installed
    computes it. ``units`` holds, per rated item, the values the raters gave it (any
    number of raters, missing ones simply left out); units with fewer than two values
    are not pairable and ignored. With ``o`` the coincidence matrix (each ordered pair of
    values within a unit of m values adds 1/(m-1)) and ``n_c`` its margins,
    alpha = 1 - (n - 1) * sum(o_ck d_ck) / sum(n_c n_k d_ck), where d is the squared
    difference function of the metric: nominal 1[c != k]; interval (c - k)^2; ordinal
    (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2.

    Returns None when alpha is undefined (fewer than two pairable values, or all
    pairable values equal, so there is no expected disagreement).
    """
    if metric not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"krippendorff_alpha: unknown metric {metric!r}")
    pairable = [list(map(float, u)) for u in units if len(u) >= 2]
    if not pairable:
        return None
    values = sorted({v for u in pairable for v in u})
    index = {v: i for i, v in enumerate(values)}
    k = len(values)
    o = np.zeros((k, k))
    for unit in pairable:
        counts = np.bincount([index[v] for v in unit], minlength=k).astype(float)
        # ordered pairs of different raters: counts_c * counts_k, minus the self-pairs
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    v = np.asarray(values)
    if metric == "nominal":
        delta = 1.0 - np.eye(k)
    elif metric == "interval":
        delta = (v[:, None] - v[None, :]) ** 2
    else:
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        lo = np.minimum.outer(np.arange(k), np.arange(k))
        hi = np.maximum.outer(np.arange(k), np.arange(k))
        between = cum[hi + 1] - cum[lo]  # sum of n_g for g from min(c, k) to max(c, k)
        delta = (between - (n_c[:, None] + n_c[None, :]) / 2.0) ** 2
        np.fill_diagonal(delta, 0.0)
    expected = float((np.outer(n_c, n_c) * delta).sum())
    if expected == 0.0:
        return None
    observed = float((o * delta).sum())
    return 1.0 - (n - 1.0) * observed / expected


def latest_per_rater(frame: pd.DataFrame) -> pd.DataFrame:
    """One rating per (image, prompt, rater): the one with the latest timestamp.

    Over all rounds: a rater who rates the same (image, prompt) again in a later round
    counts once, with the newer rating (equal timestamps: the one stored last).
    """
    order = frame.assign(_t=pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601"))
    order = order.sort_values("_t", kind="stable")
    return order.drop_duplicates(["image_path", "prompt", "rater_id"], keep="last").drop(
        columns="_t"
    )


def agreement_report(source: str | os.PathLike | pd.DataFrame) -> dict[str, Any]:
    """Agreement between raters on the same (image, prompt): alpha and pairwise kappa.

    A unit is an (image_path, prompt) pair; each rater's latest rating of it counts.
    ``alpha_ordinal`` is Krippendorff's ordinal alpha of the 1-3 ratings over all raters;
    ``pairs`` has, for every two raters with common units, the quadratic weighted
    Cohen's kappa (scikit-learn); ``aspects`` the interval alpha of each 0-10 aspect.
    """
    from sklearn.metrics import cohen_kappa_score

    frame = source if isinstance(source, pd.DataFrame) else read_ratings(source)
    latest = latest_per_rater(frame)
    raters = sorted(latest["rater_id"].unique())
    units = latest.groupby(["image_path", "prompt"], sort=False)
    ratings = [g["rating"].tolist() for _, g in units]
    report: dict[str, Any] = {
        "ratings": int(len(frame)),
        "units": int(units.ngroups),
        "raters": raters,
        "pairable_units": int(sum(len(r) >= 2 for r in ratings)),
        "alpha_ordinal": krippendorff_alpha(ratings, "ordinal"),
        "pairs": [],
        "aspects": {},
    }
    wide = latest.pivot_table(
        index=["image_path", "prompt"], columns="rater_id", values="rating", aggfunc="first"
    )
    for a, b in combinations(raters, 2):
        both = wide[[a, b]].dropna()
        kappa = None
        if len(both) >= 2:
            value = cohen_kappa_score(
                both[a].astype(int), both[b].astype(int), labels=list(RATING_VALUES),
                weights="quadratic",
            )  # fmt: skip
            kappa = None if not np.isfinite(value) else float(value)
        report["pairs"].append(
            {"raters": [a, b], "units": int(len(both)), "kappa_quadratic": kappa}
        )
    for aspect in ASPECTS:
        given = latest.dropna(subset=[aspect])
        if given.empty:
            continue
        values = [g[aspect].tolist() for _, g in given.groupby(["image_path", "prompt"])]
        report["aspects"][aspect] = {
            "ratings": int(len(given)),
            "alpha_interval": krippendorff_alpha(values, "interval"),
        }
    return report


def format_agreement(report: dict[str, Any]) -> str:
    """The agreement report as a few lines of text (``medrl ratings agreement``)."""

    def num(x: float | None) -> str:
        return "undefined" if x is None else f"{x:.3f}"

    lines = [
        f"{report['ratings']} ratings of {report['units']} (image, prompt) units by "
        f"{len(report['raters'])} rater(s); {report['pairable_units']} units rated by 2+",
        f"Krippendorff's alpha (ordinal, ratings 1-3): {num(report['alpha_ordinal'])}",
    ]
    for pair in report["pairs"]:
        a, b = pair["raters"]
        lines.append(
            f"  {a} vs {b}: quadratic weighted kappa {num(pair['kappa_quadratic'])} "
            f"on {pair['units']} common units"
        )
    for aspect, info in report["aspects"].items():
        lines.append(f"  {aspect}: alpha (interval) {num(info['alpha_interval'])}")
    return "\n".join(lines)
