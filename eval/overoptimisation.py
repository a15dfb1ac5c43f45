"""Proxy against gold over adapter versions: the reward-overoptimisation check.

RL climbs a proxy (the reward models); the gold judge (rl/gold.py: the SIMULATED expert
from pixels in the demo; a held-out expert round on real data) says what the expert
would. A proxy that rises while gold falls is reward hacking. These functions read the
RL records of ``metrics.jsonl`` (one per adapter version, ``iteration`` = version) and
are shared by the RL loop, the demo, ``medrl eval``'s report and the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Record keys of the gold judge, in display order.
GOLD_KEYS: tuple[str, ...] = (
    "gold_combined",
    "gold_combined_se",
    "gold_quality",
    "gold_fair_share",
    "gold_faithfulness",
    "gold_eye_match",
    "fd_real",
)
#: Meaningful fixed ranges of the gold scales (the report's charts use them).
GOLD_RANGES: dict[str, tuple[float, float]] = {
    "gold_combined": (2.0, 6.0),
    "gold_quality": (1.0, 3.0),
    "gold_faithfulness": (1.0, 3.0),
    "gold_fair_share": (0.0, 1.0),
    "gold_eye_match": (0.0, 1.0),
}


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean (sample sd / sqrt(n)); 0 for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def proxy_gold_verdict(
    records: Sequence[Mapping[str, Any]], z: float = 2.0, max_fd_increase: float = 0.25
) -> dict[str, Any]:
    """Did the proxy rise while gold fell? The reward-overoptimisation check, in words.

    Compares every adapter version with version 0 on the held-out images: a change counts
    when it exceeds ``z`` standard errors of the difference (``eval_reward_se``,
    ``gold_combined_se``). ``hacked`` lists versions whose proxy rose while gold fell, or
    while their images drew away from the real ones (``fd_real`` more than
    ``max_fd_increase`` above version 0's: a pixel-rated gold can miss images that are no
    longer photographs at all, the distance to real images does not).
    Returns ``{"verdict", "text", "hacked", "proxy_gain", "gold_gain"}``; ``verdict`` is one
    of ``no-gold``, ``too-short``, ``hacking``, ``confirmed`` (proxy and gold both up),
    ``gold-only``, ``unconfirmed`` (proxy up, gold flat), ``flat``, ``worse``.
    """
    by_version = {int(r["iteration"]): r for r in version_table(records)}
    versions = sorted(by_version)
    if not versions or not all("gold_combined" in by_version[v] for v in versions):
        return {"verdict": "no-gold", "text": "no gold judge in this run", "hacked": []}
    if len(versions) < 2:
        return {"verdict": "too-short", "text": "one adapter version only", "hacked": []}

    def delta(v: int, key: str) -> tuple[float, float]:
        a, b = by_version[versions[0]], by_version[v]
        se = math.hypot(float(a.get(f"{key}_se", 0.0)), float(b.get(f"{key}_se", 0.0)))
        return float(b[key]) - float(a[key]), se

    def drifted(v: int) -> bool:
        a, b = by_version[versions[0]].get("fd_real"), by_version[v].get("fd_real")
        ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b))
        return ok and a > 0 and b > a * (1.0 + max_fd_increase)

    hacked, away = [], [v for v in versions[1:] if drifted(v)]
    for v in versions[1:]:
        dp, sp = delta(v, "eval_reward")
        dg, sg = delta(v, "gold_combined")
        if dp > z * sp and (dg < -z * sg or v in away):
            hacked.append(v)
    last = versions[-1]
    dp, sp = delta(last, "eval_reward")
    dg, sg = delta(last, "gold_combined")
    up_p, up_g, down_g = dp > z * sp, dg > z * sg, dg < -z * sg
    if hacked:
        verdict = "hacking"
        text = (
            f"REWARD HACKING: the proxy rose while gold fell or the images left the real "
            f"ones at adapter version(s) {', '.join(map(str, hacked))} (last version: proxy "
            f"{dp:+.4f}, gold {dg:+.3f} against version {versions[0]}). Do not use these "
            "adapters; the run's `best` adapter was chosen on gold."
        )
    elif up_p and up_g:
        verdict, text = "confirmed", f"proxy {dp:+.4f} and gold {dg:+.3f}: gold confirms the gain"
    elif up_g:
        verdict, text = "gold-only", f"gold rose {dg:+.3f} while the proxy moved {dp:+.4f}"
    elif up_p:
        verdict = "unconfirmed"
        text = f"proxy rose {dp:+.4f} but gold moved only {dg:+.3f} (within noise): unconfirmed"
    elif down_g:
        verdict, text = "worse", f"gold fell {dg:+.3f} (proxy {dp:+.4f})"
    else:
        verdict = "flat"
        text = f"neither moved beyond noise (proxy {dp:+.4f}, gold {dg:+.3f})"
    if away:
        base = by_version[versions[0]]["fd_real"]
        worst = max(away, key=lambda v: by_version[v]["fd_real"])
        text += (
            f". The images drew away from the real ones at version(s) "
            f"{', '.join(map(str, away))} (fd_real up to "
            f"{by_version[worst]['fd_real'] / base - 1:+.0%} against version {versions[0]})"
        )
    return {
        "verdict": verdict,
        "text": text,
        "hacked": hacked,
        "off_manifold": away,
        "proxy_gain": dp,
        "gold_gain": dg,
    }


def version_table(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per adapter version (the RL records' ``iteration``), the latest record of a
    version winning (a resumed run repeats some), in version order."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("stage", "rl") == "rl" and isinstance(r.get("iteration"), int):
            if "eval_reward" in r:
                rows[int(r["iteration"])] = dict(r)
    return [rows[v] for v in sorted(rows)]


def format_version_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Text lines: proxy and gold of each adapter version (what the demo prints)."""
    rows = version_table(records)
    if not rows:
        return []
    columns = [("proxy", "eval_reward", ".4f"), ("± se", "eval_reward_se", ".4f")]
    if all("gold_combined" in r for r in rows):
        columns += [
            ("gold 2-6", "gold_combined", ".3f"),
            ("± se", "gold_combined_se", ".3f"),
            ("quality 1-3", "gold_quality", ".3f"),
            ("fair+", "gold_fair_share", ".2f"),
            ("faithful 1-3", "gold_faithfulness", ".3f"),
            ("eye match", "gold_eye_match", ".2f"),
            ("FD real", "fd_real", ".4f"),
        ]

    def cell(r: Mapping[str, Any], key: str, fmt: str, width: int) -> str:
        v = r.get(key)
        return (format(v, fmt) if isinstance(v, (int, float)) else "-").rjust(width)

    widths = [max(len(name), 7) for name, _, _ in columns]
    lines = [
        "  version " + " ".join(n.rjust(w) for (n, _, _), w in zip(columns, widths, strict=True))
    ]
    for r in rows:
        cells = [cell(r, k, f, w) for (_, k, f), w in zip(columns, widths, strict=True)]
        lines.append(f"  {r['iteration']:>7d} " + " ".join(cells))
    return lines
