"""The workbench's tables in the ratings store, and a round's serving settings (protocol,
repeats, queue seed, form-token secret), fixed when the round is first served."""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rewards.ratings_csv import parse_timestamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS workbench_rounds (
    round TEXT PRIMARY KEY,
    protocol TEXT NOT NULL,
    repeats INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    round_dir TEXT NOT NULL,
    created_at TEXT NOT NULL,
    secret TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workbench_raters (
    token_hash TEXT PRIMARY KEY,
    round TEXT NOT NULL,
    rater_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('rater', 'admin')),
    expert_level TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    UNIQUE (round, rater_id, role)
);
CREATE TABLE IF NOT EXISTS workbench_queue (
    item_id TEXT PRIMARY KEY,
    round TEXT NOT NULL,
    rater_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    image TEXT NOT NULL,
    repeat_of INTEGER,
    UNIQUE (round, rater_id, pos)
);
CREATE TABLE IF NOT EXISTS workbench_answers (
    id INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 3),
    aspects TEXT NOT NULL DEFAULT '{}',
    comment TEXT NOT NULL DEFAULT '',
    rating_id INTEGER,
    nonce TEXT NOT NULL UNIQUE,
    submitted_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS workbench_answers_by_item ON workbench_answers (item_id);
"""


def timestamp_now() -> str:
    """The current UTC time, as the store's timestamps are written."""
    return parse_timestamp(datetime.now(timezone.utc).isoformat())


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the workbench's tables where they are missing (inside the caller's
    transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


@dataclass(frozen=True)
class RoundSettings:
    """How a round is served; ``secret`` signs its form tokens (empty: not registered)."""

    protocol: str
    repeats: int
    seed: int
    secret: bytes


def round_settings(
    conn: sqlite3.Connection,
    round_name: str,
    round_dir: Path,
    *,
    images: int,
    protocol: str | None,
    repeats: int | None,
    seed: int,
    register: bool,
) -> RoundSettings:
    """The round's stored settings, or (``register``) new ones stored now: ``protocol``
    (default cs787), ``repeats`` (default: a tenth of the ``images``, at most 5), ``seed``
    and a new secret. Unregistered and not ``register``: empty settings, nothing stored.

    Raises:
        ValueError: ``protocol`` or ``repeats`` asked for differs from the stored one.
    """
    row = conn.execute(
        "SELECT protocol, repeats, seed, secret FROM workbench_rounds WHERE round = ?",
        (round_name,),
    ).fetchone()
    if row is None and not register:
        return RoundSettings("", 0, seed, b"")
    if row is None:
        secret = secrets.token_hex(32)
        settings = RoundSettings(
            protocol or "cs787",
            min(5, images // 10) if repeats is None else repeats,
            seed,
            bytes.fromhex(secret),
        )
        conn.execute(
            "INSERT INTO workbench_rounds VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                round_name,
                settings.protocol,
                settings.repeats,
                seed,
                str(round_dir),
                timestamp_now(),
                secret,
            ),
        )
        return settings
    stored = RoundSettings(row[0], int(row[1]), int(row[2]), bytes.fromhex(row[3]))
    for name, asked, value in (
        ("protocol", protocol, stored.protocol),
        ("repeats", repeats, stored.repeats),
    ):
        if asked is not None and asked != value:
            raise ValueError(
                f"round {round_name!r} is served with {name} {value!r} "
                f"(first serve); it cannot change to {asked!r}"
            )
    return stored
