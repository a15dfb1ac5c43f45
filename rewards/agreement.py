"""Agreement between raters: Krippendorff's alpha (ordinal) and weighted kappa over the
latest rating of each rater per image, per round and overall, and its text table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any, Literal

import numpy as np
import pandas as pd

from rewards.ratings import read_ratings
from rewards.sheet import (
    ASPECTS,
    RATING_VALUES,
)

log = logging.getLogger(__name__)


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
