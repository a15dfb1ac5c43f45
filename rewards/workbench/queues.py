"""Each rater's queue of a round: the order of the images, with repeats, and the
self-agreement the repeats measure."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np


def queue_order(
    round_name: str, rater_id: str, seed: int, images: Sequence[str], repeats: int
) -> list[tuple[str, int | None]]:
    """(image, pos of the original or None) in this rater's order: the ``images`` in an
    order seeded by ``seed`` and the rater's name, and ``repeats`` images of the first
    half shown again in the second half."""
    digest = hashlib.sha256(f"{round_name}\0{rater_id}".encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    order: list[tuple[str, int | None]] = [(images[i], None) for i in rng.permutation(len(images))]
    if repeats:
        n = len(order)
        firsts = sorted(rng.choice(max(1, n // 2), size=repeats, replace=False))
        for original in firsts:
            at = int(rng.integers(max(original + 2, n // 2), len(order) + 1))
            order.insert(at, (order[original][0], int(original)))
    return order


def self_agreement(conn: sqlite3.Connection, round_name: str | None = None) -> list[dict[str, Any]]:
    """Self-agreement of every rater with repeated items (of one round, or all rounds)."""
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'workbench_answers'"
    ).fetchone()
    if not has:
        return []
    latest = """SELECT q.round, q.rater_id, q.pos, q.repeat_of, a.rating FROM workbench_queue q
        JOIN workbench_answers a ON a.id = (SELECT MAX(id) FROM workbench_answers
                                            WHERE item_id = q.item_id)"""
    rows = conn.execute(latest).fetchall()
    by_pos = {(r[0], r[1], r[2]): r[4] for r in rows}
    pairs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for rnd, rater_id, _pos, repeat_of, rating in rows:
        if repeat_of is None or (round_name is not None and rnd != round_name):
            continue
        first = by_pos.get((rnd, rater_id, repeat_of))
        if first is not None:
            pairs.setdefault((rnd, rater_id), []).append((int(first), int(rating)))
    out = []
    for (rnd, rater_id), got in sorted(pairs.items()):
        a = np.array(got)
        out.append(
            {
                "round": rnd,
                "rater": rater_id,
                "pairs": len(got),
                "exact": float((a[:, 0] == a[:, 1]).mean()),
                "mean_abs_diff": float(np.abs(a[:, 0] - a[:, 1]).mean()),
            }
        )
    return out
