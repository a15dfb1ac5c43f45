"""Raters, queues and answers of a rating round, kept in the ratings store.

A round folder (``medrl ratings export-round``: ``sheet.csv``, ``images/``, the private
``.key.json``) is served to raters who each hold a personal token (``medrl ratings
invite``; only its SHA-256 is stored). Each rater gets their own queue: the round's
images in an order randomised per rater, plus ``repeats`` images shown a second time
later in the queue to measure the rater's self-agreement. Queue entries have random ids,
so an id says nothing about the image and cannot be guessed for another rater's queue.

Every answer is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) that
- checks the answer's form token: issued with the item as an HMAC of (item, number of
  answers it has), so it is good for one answer; a replayed request or a form left open
  while another tab answered is refused, and viewing an item writes nothing,
- writes the rating to the ``ratings`` table exactly as ``medrl ratings ingest`` would
  for the filled sheet (the round key fills in generator and seed; the image path is
  stored relative to the store's folder), unless the entry is a repeat,
- and logs the answer, with the rater's comment, in ``workbench_answers``.
A changed answer is a new rating with a later timestamp: the history stays and training
uses each rater's latest (:func:`rewards.ratings.latest_per_rater`). Repeats go to the
log only, so each rater still counts once per image in training and agreement.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rewards import rounds
from rewards.ratings import ASPECTS, COLUMNS, connect, insert_ratings
from rewards.sheet import ASPECT_MAX
from rewards.workbench.protocol import (
    ASPECT_HELP,
    PROTOCOLS,
    RUBRIC,
    WorkbenchError,
    check_answer,
    form_token,
)
from rewards.workbench.queues import queue_order, self_agreement
from rewards.workbench.tables import create_tables, round_settings, timestamp_now

ROLES = ("rater", "admin")
MAX_RATER_ID = 64


@dataclass(frozen=True)
class Rater:
    rater_id: str
    role: str
    expert_level: str = ""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Workbench:
    """One round served from one ratings store. Thread-safe: a connection per thread.

    Args:
        db: the ratings store (``rewards.ratings_db``); created if missing.
        round_dir: the round folder (its ``.key.json`` names the round).
        protocol: ``cs787`` or ``aspects``; fixed when the round is first served (a later
            serve with another protocol is refused). None: the stored one, else cs787.
        repeats: images each rater sees twice (self-agreement); fixed like the protocol.
        seed: seeds every rater's queue order (with the rater's name).
        images_root: ratings store image paths relative to this folder (absolute outside
            it), as ``medrl ratings ingest`` does; default: the store's folder.
        register: fix the round's protocol and repeats now if they are not yet (serving
            does; inviting a rater does not, so raters can be invited before the round is
            first served).
    """

    def __init__(
        self,
        db: str | Path,
        round_dir: str | Path,
        *,
        protocol: str | None = None,
        repeats: int | None = None,
        seed: int = 0,
        images_root: str | Path | None = None,
        register: bool = True,
    ):
        self.db = Path(db)
        self.images_root = Path(images_root) if images_root else self.db.parent
        self.round_dir = Path(round_dir).resolve()
        self.key = rounds.find_key(self.round_dir / rounds.SHEET_FILE, self.round_dir)
        self.round = str(self.key["round"])
        sheet = pd.read_csv(self.round_dir / rounds.SHEET_FILE, dtype=str, keep_default_na=False)
        self.images: list[str] = list(dict.fromkeys(sheet["image_path"]))
        self.prompts: dict[str, str] = dict(zip(sheet["image_path"], sheet["prompt"], strict=True))
        self.modality: dict[str, str] = dict(
            zip(sheet["image_path"], sheet.get("modality", [""] * len(sheet)), strict=True)
        )
        missing = [p for p in self.images if p not in self.key["images"]]
        if missing:
            raise ValueError(f"{self.round_dir}: sheet images not in the round key: {missing[:3]}")
        if protocol is not None and protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if repeats is not None and not 0 <= repeats <= len(self.images) // 2:
            # repeats are drawn from the first half of a queue and shown in the second
            raise ValueError(
                f"repeats {repeats}: from 0 to half the round's {len(self.images)} images"
            )
        self._local = threading.local()
        # the server's threads take turns here rather than in SQLite's busy handler, whose
        # back-off sleeps (up to 100 ms each) made the p99 of an answer a second at 20 raters
        self._write_lock = threading.Lock()
        with self.transaction() as conn:
            create_tables(conn)
            settings = round_settings(
                conn,
                self.round,
                self.round_dir,
                images=len(self.images),
                protocol=protocol,
                repeats=repeats,
                seed=seed,
                register=register,
            )
        self.protocol, self.repeats, self.seed = settings.protocol, settings.repeats, settings.seed
        self._secret = settings.secret

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.db)
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: the store's write lock is taken first, so what is read
        inside is what the writes are checked against."""
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------ raters

    def invite(self, rater_id: str, *, role: str = "rater", expert_level: str = "") -> str:
        """A new personal token for ``rater_id`` (printed once; only its hash is kept).

        Inviting a rater again replaces their token (the old link stops working); their
        queue and answers stay.
        """
        rater_id = rater_id.strip()
        if not rater_id or len(rater_id) > MAX_RATER_ID or not rater_id.isprintable():
            raise ValueError(f"rater name {rater_id!r}: 1-{MAX_RATER_ID} printable characters")
        if role not in ROLES:
            raise ValueError(f"role {role!r}: rater or admin")
        token = secrets.token_urlsafe(24)
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM workbench_raters WHERE round = ? AND rater_id = ? AND role = ?",
                (self.round, rater_id, role),
            )
            conn.execute(
                "INSERT INTO workbench_raters VALUES (?, ?, ?, ?, ?, ?)",
                (hash_token(token), self.round, rater_id, role, expert_level, timestamp_now()),
            )
        return token

    def who(self, token: str | None) -> Rater:
        """The rater holding ``token`` in this round; WorkbenchError 401 otherwise."""
        if not token or len(token) > 200:
            raise WorkbenchError(401, "no rater token: open the link you were given")
        row = (
            self._conn()
            .execute(
                "SELECT rater_id, role, expert_level FROM workbench_raters "
                "WHERE token_hash = ? AND round = ?",
                (hash_token(token), self.round),
            )
            .fetchone()
        )
        if row is None:
            raise WorkbenchError(401, "unknown or replaced rater token: ask for a new link")
        return Rater(row[0], row[1], row[2])

    def raters(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT DISTINCT rater_id FROM workbench_raters WHERE round = ? AND role = 'rater' "
            "ORDER BY rater_id",
            (self.round,),
        )
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ queues

    def _ensure_queue(self, rater: Rater) -> int:
        """The rater's queue length (created on first use, in one transaction)."""
        if rater.role != "rater":
            raise WorkbenchError(403, "an admin token has no rating queue; use a rater link")
        conn = self._conn()
        n = conn.execute(
            "SELECT COUNT(*) FROM workbench_queue WHERE round = ? AND rater_id = ?",
            (self.round, rater.rater_id),
        ).fetchone()[0]
        if n:
            return int(n)
        order = queue_order(self.round, rater.rater_id, self.seed, self.images, self.repeats)
        with self.transaction() as conn:
            if conn.execute(
                "SELECT COUNT(*) FROM workbench_queue WHERE round = ? AND rater_id = ?",
                (self.round, rater.rater_id),
            ).fetchone()[0]:
                return len(order)  # another request of the same rater made it first
            conn.executemany(
                "INSERT INTO workbench_queue VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (secrets.token_urlsafe(12), self.round, rater.rater_id, pos, image, rep)
                    for pos, (image, rep) in enumerate(order)
                ],
            )
        return len(order)

    def _entry(self, rater: Rater, item_id: str) -> sqlite3.Row:
        row = (
            self._conn()
            .execute(
                "SELECT item_id, round, rater_id, pos, image, repeat_of FROM workbench_queue "
                "WHERE item_id = ?",
                (item_id,),
            )
            .fetchone()
        )
        if row is None or row["round"] != self.round:
            raise WorkbenchError(404, f"no item {item_id!r} in this round")
        if row["rater_id"] != rater.rater_id:
            raise WorkbenchError(403, "this item is in another rater's queue, not yours")
        return row

    def _answered(self, rater: Rater) -> set[int]:
        rows = self._conn().execute(
            "SELECT DISTINCT q.pos FROM workbench_answers a JOIN workbench_queue q "
            "ON a.item_id = q.item_id WHERE q.round = ? AND q.rater_id = ?",
            (self.round, rater.rater_id),
        )
        return {int(r[0]) for r in rows}

    def state(self, rater: Rater) -> dict[str, Any]:
        """What the rating page needs first: protocol, rubric, progress, where to resume."""
        total = self._ensure_queue(rater)
        answered = self._answered(rater)
        return {
            "rater": rater.rater_id,
            "round": self.round,
            "protocol": self.protocol,
            "protocol_text": PROTOCOLS[self.protocol],
            "rubric": {str(k): v for k, v in RUBRIC.items()},
            "aspects": {a: ASPECT_HELP[a] for a in ASPECTS} if self.protocol == "aspects" else {},
            "aspect_max": ASPECT_MAX,
            "total": total,
            "answered": len(answered),
            "resume": self.next_pos(rater, -1),
        }

    def next_pos(self, rater: Rater, after: int) -> int | None:
        """The first unanswered position after ``after``, wrapping round to skipped ones;
        None when every item is answered."""
        total = self._ensure_queue(rater)
        answered = self._answered(rater)
        for pos in [*range(after + 1, total), *range(0, min(after + 1, total))]:
            if pos not in answered:
                return pos
        return None

    def item(self, rater: Rater, pos: int) -> dict[str, Any]:
        """Queue position ``pos`` of this rater: the prompt, the image's URL, the rater's
        latest answer to it, and the form token for the next answer. Nothing in it names the
        generator, adapter, seed or file."""
        total = self._ensure_queue(rater)
        if not 0 <= pos < total:
            raise WorkbenchError(404, f"position {pos} is outside your queue (0-{total - 1})")
        conn = self._conn()
        row = conn.execute(
            "SELECT item_id, image FROM workbench_queue WHERE round = ? AND rater_id = ? "
            "AND pos = ?",
            (self.round, rater.rater_id, pos),
        ).fetchone()
        nonce = form_token(self._secret, row[0], self._answer_count(conn, row[0]))
        last = conn.execute(
            "SELECT rating, aspects, comment FROM workbench_answers WHERE item_id = ? "
            "ORDER BY id DESC LIMIT 1",
            (row[0],),
        ).fetchone()
        return {
            "item_id": row[0],
            "pos": pos,
            "total": total,
            "answered": len(self._answered(rater)),
            "prompt": self.prompts[row[1]],
            "image": f"/image/{row[0]}",
            "nonce": nonce,
            "answer": None
            if last is None
            else {"rating": last[0], "aspects": json.loads(last[1]), "comment": last[2]},
        }

    @staticmethod
    def _answer_count(conn: sqlite3.Connection, item_id: str) -> int:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM workbench_answers WHERE item_id = ?", (item_id,)
            ).fetchone()[0]
        )

    def image_file(self, rater: Rater, item_id: str) -> Path:
        entry = self._entry(rater, item_id)
        return self.round_dir / entry["image"]

    # ------------------------------------------------------------------ answers

    def submit(
        self,
        rater: Rater,
        item_id: str,
        nonce: str,
        rating: Any,
        aspects: dict[str, Any] | None = None,
        comment: str = "",
    ) -> dict[str, Any]:
        """Store one answer (see the module docstring); returns the rater's progress."""
        rating, clean = check_answer(self.protocol, rating, aspects, comment)
        entry = self._entry(rater, item_id)
        now = timestamp_now()
        with self.transaction() as conn:
            count = self._answer_count(conn, item_id)
            if not hmac.compare_digest(str(nonce), form_token(self._secret, item_id, count)):
                if any(
                    hmac.compare_digest(str(nonce), form_token(self._secret, item_id, k))
                    for k in range(count)
                ):
                    raise WorkbenchError(
                        409,
                        "this item was answered after this form was loaded (already stored: a "
                        "repeated request, or another tab); reload to see and change it",
                    )
                raise WorkbenchError(409, "this answer's form is not current: reload the page")
            rating_id = None
            if entry["repeat_of"] is None:
                (rating_id,) = insert_ratings(
                    conn, [self._sheet_row(entry["image"], rater, rating, clean, now)], now
                )
            conn.execute(
                "INSERT INTO workbench_answers (item_id, rating, aspects, comment, rating_id, "
                "nonce, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item_id, rating, json.dumps(clean), comment, rating_id, nonce, now),
            )
        answered = self._answered(rater)
        return {"answered": len(answered), "total": self._ensure_queue(rater)}

    def _sheet_row(
        self, image: str, rater: Rater, rating: int, aspects: dict[str, float], now: str
    ) -> dict[str, Any]:
        """The answer as the filled sheet's row, completed by the round key exactly as
        ``medrl ratings ingest`` completes a sheet (rounds.apply_key)."""
        row = dict.fromkeys(COLUMNS, "") | {
            "image_path": image,
            "rating": rating,
            "modality": self.modality.get(image, ""),
            "expert_level": rater.expert_level,
            "rater_id": rater.rater_id,
            "timestamp": now,
            "seed": None,
            **{a: aspects.get(a) for a in ASPECTS},
            "source": f"workbench:{self.round_dir}",
            "source_line": None,
        }
        problems: list = []
        rows = rounds.apply_key([row], self.key, self.round_dir, self.images_root, problems)
        if problems:  # the queue only holds images of the key: a damaged round folder
            raise WorkbenchError(500, "; ".join(p.reason for p in problems))
        return rows[0]

    # ------------------------------------------------------------------ results

    def progress(self) -> list[dict[str, Any]]:
        """Per rater: queue length, answered, changed answers, last activity."""
        out = []
        conn = self._conn()
        for rater_id in self.raters():
            rater = Rater(rater_id, "rater")
            total = conn.execute(
                "SELECT COUNT(*) FROM workbench_queue WHERE round = ? AND rater_id = ?",
                (self.round, rater_id),
            ).fetchone()[0]
            row = conn.execute(
                "SELECT COUNT(*), MAX(a.submitted_at) FROM workbench_answers a "
                "JOIN workbench_queue q ON a.item_id = q.item_id "
                "WHERE q.round = ? AND q.rater_id = ?",
                (self.round, rater_id),
            ).fetchone()
            answered = len(self._answered(rater))
            out.append(
                {
                    "rater": rater_id,
                    "total": int(total) or len(self.images) + self.repeats,
                    "answered": answered,
                    "changes": int(row[0]) - answered,
                    "last": row[1] or "",
                }
            )
        return out

    def self_agreement(self) -> list[dict[str, Any]]:
        """Per rater: the repeated images' first and second latest answers, how many agree
        exactly and the mean absolute difference."""
        return self_agreement(self._conn(), self.round)

    def round_ratings(self):
        """This round's stored ratings (a DataFrame as :func:`read_ratings` gives)."""
        from rewards.ratings import read_ratings

        frame = read_ratings(self.db)
        return frame[frame["round"] == self.round]
