"""Expert ratings: the CS787-compatible ratings CSV, the SQLite store, agreement between raters.

The flow is ``ratings.csv`` -> :func:`ingest_ratings` (validates every row; stores all
of them in one transaction, or nothing) -> the project's SQLite file -> training
(:func:`read_ratings`), :func:`export_ratings` (CSV or Parquet) and
:func:`rewards.agreement.agreement_report`. Reading and checking the CSV's rows is
:mod:`rewards.ratings_csv`. docs/rewards.md describes every column.

Row numbers in messages are CSV line numbers (header = line 1), as in
:mod:`generators.csv_rows`, whose :class:`DataValidationError` and :class:`RowProblem`
are reused here.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from generators.csv_rows import DataValidationError, RowProblem
from rewards import rounds
from rewards.ratings_csv import parse_ratings_csv, rating_key, read_csv
from rewards.sheet import (
    ASPECTS,
    COLUMNS,
    EXPORT_COLUMNS,
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


def normalise_rating(rating: Any) -> Any:
    """Rating 1..3 -> [0, 1] as (r - 1) / 2 (CS787); a number or a pandas column."""
    return (rating - 1.0) / 2.0


# --------------------------------------------------------------------------- the store

#: Seconds a writer waits for another writer's lock on the store before giving up.
BUSY_TIMEOUT_S = 30.0


class StoreLockedError(ValueError):
    """Another connection holds the ratings store's write lock past the busy timeout."""


def _is_locked(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED") or (
        "database is locked" in str(exc)
    )


def _locked(path: Path) -> StoreLockedError:
    return StoreLockedError(
        f"{path}: the ratings store is locked by another writer (waited {BUSY_TIMEOUT_S:g} s); "
        "try again, or close the other process that is writing to it"
    )


def _store_error(path: Path, exc: sqlite3.DatabaseError) -> ValueError:
    """What opening the store at ``path`` failing with ``exc`` means."""
    if _is_locked(exc):
        return _locked(path)
    return ValueError(f"{path}: not a medrl ratings store (SQLite said: {exc})")


@contextmanager
def locked_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn SQLite's "database is locked" inside the block into :class:`StoreLockedError`."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if _is_locked(exc):
            raise _locked(Path(path)) from exc
        raise


def connect(db: str | os.PathLike, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a ratings store, schema checked: for writing (created if needed, WAL mode,
    an older schema migrated) or ``readonly`` (takes no write lock, so a writer busy with
    the store does not block it).

    The connection is in autocommit mode; writers open their own transaction, and wait
    up to :data:`BUSY_TIMEOUT_S` for another writer's lock.

    Raises:
        StoreLockedError: another writer held the lock past the busy timeout.
        ValueError: the file is not SQLite, or its schema is newer than this medrl.
    """
    path = Path(db)
    if readonly:
        return _connect_readonly(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
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
        raise _store_error(path, exc) from exc
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
    conn.row_factory = sqlite3.Row
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing store of this schema (an older or empty one
    is first brought to it by a writing :func:`connect`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ratings store")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            conn.close()
            raise _store_error(path, exc) from exc
        version = None  # an empty SQLite file: a writer makes it a store
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _store_error(path, exc) from exc
    if version != SCHEMA_VERSION:  # a writer migrates an older store, refuses a newer one
        conn.close()
        connect(path).close()
        return _connect_readonly(path)
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


def _rows_as_stored(
    csv_path: Path,
    root: Path,
    round_dir: str | os.PathLike | None,
    images_from: str | os.PathLike | None,
) -> tuple[list[dict[str, Any]], list[RowProblem], int]:
    """The CSV's rows with their image paths as stored (relative to ``root`` where they lie
    under it; a rating sheet's completed from its round key), every problem found, and the
    number of unrated sheet rows skipped."""
    key = rounds.find_key(csv_path, round_dir)
    sheet_dir = Path(round_dir) if round_dir is not None else csv_path.parent
    rows, problems, unrated = read_csv(csv_path, skip_unrated=key is not None)
    if key is not None:
        rows = rounds.apply_key(rows, key, sheet_dir, root, problems)
    elif images_from is not None:
        for row in rows:
            if not Path(row["image_path"]).is_absolute():
                row["image_path"] = rounds.stored_path(Path(images_from) / row["image_path"], root)
    if key is not None or images_from is not None:
        _check_keys_unique(rows, problems)  # rewritten paths: check the file's own key again
    return rows, problems, unrated


def _check_keys_unique(rows: list[dict[str, Any]], problems: list[RowProblem]) -> None:
    """Add a problem for every row whose store key an earlier row of the file has."""
    keys: dict[tuple[str, str, str, str], int] = {}
    for row in rows:
        if rating_key(row) in keys:
            problems.append(
                RowProblem(
                    row["source_line"],
                    "row",
                    f"same image, rater_id, timestamp and round as line {keys[rating_key(row)]}",
                )
            )
        keys.setdefault(rating_key(row), row["source_line"])


def _new_rows(
    conn: sqlite3.Connection, rows: list[dict[str, Any]], problems: list[RowProblem]
) -> list[dict[str, Any]]:
    """The rows whose key is not stored yet; a problem for every row whose key is stored
    with different values (one stored with the same values is neither)."""
    fresh: list[dict[str, Any]] = []
    for row in rows:
        stored = conn.execute(
            "SELECT * FROM ratings WHERE image_path = ? AND rater_id = ? "
            "AND timestamp = ? AND round = ?",
            rating_key(row),
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
    return fresh


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
    root = Path(images_root) if images_root is not None else Path(db).parent
    rows, problems, unrated = _rows_as_stored(csv_path, root, round_dir, images_from)
    conn = connect(db)
    try:
        with locked_as_error(db):  # lock first, so checks and inserts see one state
            conn.execute("BEGIN IMMEDIATE")
        try:
            fresh = _new_rows(conn, rows, problems)
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
        conn = connect(path, readonly=True)
        try:
            frame = pd.read_sql_query(f"SELECT {', '.join(COLUMNS)} FROM ratings ORDER BY id", conn)
        finally:
            conn.close()
    frame["seed"] = frame["seed"].astype("Int64")
    for aspect in ASPECTS:
        frame[aspect] = frame[aspect].astype("float64")
    frame["rating"] = frame["rating"].astype("int64")
    frame["rating_norm"] = normalise_rating(frame["rating"])
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
