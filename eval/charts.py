"""The report's pictures: thumbnail grids as PNG data URIs, and line charts drawn as inline
SVG from a run's metrics.jsonl records (nothing is fetched when the report is opened).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from generators.images import make_grid
from runfiles import is_number

#: Side of one thumbnail in the report's grids (px).
TILE = 128

# --------------------------------------------------------------------------- pictures


@dataclass
class PromptGrid:
    """Real and generated images for one prompt, shown side by side."""

    prompt: str
    generated: list[np.ndarray]
    real: list[np.ndarray]
    #: What the real images are (e.g. "real, same text (train)" or "nearest real (features)").
    real_caption: str


@dataclass
class CopyPair:
    """A flagged generated image next to its nearest training image."""

    generated: np.ndarray
    train: np.ndarray
    sample_id: str
    generated_path: str
    train_path: str
    ssim: float | None
    feature_distance: float
    reasons: list[str]


def thumb(image: np.ndarray, tile: int = TILE) -> np.ndarray:
    if image.shape[:2] == (tile, tile):
        return image
    pil = Image.fromarray(image)
    method = Image.LANCZOS if min(image.shape[:2]) > tile else Image.BICUBIC
    return np.asarray(pil.resize((tile, tile), method))


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) array as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def grid_img(images: Sequence[np.ndarray], ncols: int, alt: str, tile: int = TILE) -> str:
    """An ``<img>`` of the images tiled into one PNG data URI, displayed at ``tile`` px each.

    Images up to ``tile`` px are embedded at their own size and scaled by the browser (a
    smaller file); larger ones are downscaled to ``tile`` first.
    """
    side = min(tile, min(min(i.shape[:2]) for i in images))
    pad = 3
    grid = make_grid([thumb(i, side) for i in images], ncols=ncols, pad=pad)
    scale = tile / side
    w, h = round(grid.shape[1] * scale), round(grid.shape[0] * scale)
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(grid)}" width="{w}" height="{h}">'


# --------------------------------------------------------------------------- SVG plots


def _nice_step(span: float, target: int = 5, integer: bool = False) -> float:
    raw = span / max(target, 1)
    if integer and raw <= 1:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for s in (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10):
        if s * mag >= raw:
            return s * mag
    return 10 * mag


def _axis(
    lo: float, hi: float, target: int = 5, tight: bool = False, integer: bool = False
) -> tuple[float, float, list[float]]:
    """A range and round tick values: widened to whole ticks, or (``tight``) [lo, hi] itself.

    ``integer``: ticks only at whole numbers (steps, iterations).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target, integer)
    a, b = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = int(round((b - a) / step))
    ticks = [a + k * step for k in range(n + 1)]
    if tight:
        eps = 1e-9 * step
        return lo, hi, [t for t in ticks if lo - eps <= t <= hi + eps]
    return a, b, ticks


def _tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


@dataclass(frozen=True)
class _Frame:
    """A chart's plot area (px) and the data ranges it maps onto."""

    left: int
    top: int
    pw: int
    ph: int
    x0: float
    x1: float
    y0: float
    y1: float

    def sx(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * self.pw

    def sy(self, v: float) -> float:
        return self.top + self.ph - (v - self.y0) / (self.y1 - self.y0) * self.ph


def _finite_points(
    x: Sequence[float],
    y: Sequence[float],
    band: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[list[tuple[float, float]], list[float] | None, list[float] | None]:
    """The points whose x and y are finite, and the band's lows and highs at those points."""
    pts = [(float(a), float(b)) for a, b in zip(x, y, strict=True)]
    keep = [i for i, (a, b) in enumerate(pts) if math.isfinite(a) and math.isfinite(b)]
    pts = [pts[i] for i in keep]
    lows = highs = None
    if band is not None:
        lows = [float(band[0][i]) for i in keep]
        highs = [float(band[1][i]) for i in keep]
    return pts, lows, highs


def _svg_grid(
    f: _Frame, xticks: list[float], yticks: list[float], x_label: str, height: int
) -> list[str]:
    """The plot area's box, gridlines, tick labels and x-axis label."""
    left, top, pw, ph = f.left, f.top, f.pw, f.ph
    out = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#c5cad6"/>']
    for t in yticks:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{f.sy(t):.1f}" y2="{f.sy(t):.1f}" '
            'stroke="#eceef3"/>'
            f'<text x="{left - 5}" y="{f.sy(t) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#5b6476">{_tick(t)}</text>'
        )
    for t in xticks:
        out.append(
            f'<line x1="{f.sx(t):.1f}" x2="{f.sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
            'stroke="#8a93a6"/>'
            f'<text x="{f.sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11" '
            f'fill="#5b6476">{_tick(t)}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" font-size="11" '
        f'fill="#3f4757">{html.escape(x_label)}</text>'
    )
    return out


def _svg_curve(
    f: _Frame,
    pts: list[tuple[float, float]],
    lows: list[float] | None,
    highs: list[float] | None,
    color: str,
) -> list[str]:
    """The shaded band, the line and (up to 40 points) a dot per point."""
    out = []
    xs = [p[0] for p in pts]
    if lows is not None and highs is not None and len(pts) > 1:
        poly = [f"{f.sx(a):.1f},{f.sy(h):.1f}" for a, h in zip(xs, highs, strict=True)]
        poly += [
            f"{f.sx(a):.1f},{f.sy(lo):.1f}" for a, lo in zip(xs[::-1], lows[::-1], strict=True)
        ]
        out.append(f'<polygon points="{" ".join(poly)}" fill="{color}" fill-opacity="0.15"/>')
    if len(pts) > 1:
        line = " ".join(f"{f.sx(a):.1f},{f.sy(b):.1f}" for a, b in pts)
        out.append(
            f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.8" '
            'stroke-linejoin="round"/>'
        )
    if len(pts) <= 40:
        out += [
            f'<circle cx="{f.sx(a):.1f}" cy="{f.sy(b):.1f}" r="2.6" fill="{color}"/>'
            for a, b in pts
        ]
    return out


def svg_line_chart(
    x: Sequence[float],
    y: Sequence[float],
    title: str,
    x_label: str,
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    color: str = "#2f6fdf",
    width: int = 372,
    height: int = 220,
    y_range: tuple[float, float] | None = None,
) -> str:
    """A small line chart as an inline ``<svg>`` (optional shaded band, e.g. mean ± std).

    Non-finite points are dropped; a single point is drawn as a dot. ``y_range``: the y
    axis spans at least this range (a scale's meaningful range, so that a wobble inside
    the noise does not fill the chart).
    """
    pts, lows, highs = _finite_points(x, y, band)
    left, right, top, bottom = 56, 14, 26, 38
    pw, ph = width - left - right, height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="#1d2330">'
        f"{html.escape(title)}</text>",
    ]
    if not pts:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" '
            'fill="#5b6476">no finite values</text></svg>'
        )
        return "".join(out)
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    all_y = ys + (lows or []) + (highs or []) + list(y_range or ())
    y0, y1, yticks = _axis(min(all_y), max(all_y))
    x0, x1, xticks = _axis(
        min(xs), max(xs), 6, tight=True, integer=all(float(v).is_integer() for v in xs)
    )
    frame = _Frame(left, top, pw, ph, x0, x1, y0, y1)
    out += _svg_grid(frame, xticks, yticks, x_label, height)
    out += _svg_curve(frame, pts, lows, highs, color)
    out.append("</svg>")
    return "".join(out)


#: Record keys that count or label rather than measure: never charted.
COUNTER_KEYS = frozenset(
    {"stage_n", "samples", "trained_samples", "updates", "epoch", "samples_per_rank",
     "optimizer_steps_iteration"}
)  # fmt: skip


def charted(key: str) -> bool:
    """Metric keys get charts; counters and standard errors (drawn as bands) do not."""
    return key not in COUNTER_KEYS and not key.endswith("_se")


def curve_series(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group ``metrics.jsonl`` records into plottable series, reward curves first.

    Records are grouped by ``stage``; the x axis is ``iteration`` when the stage's records
    have it, else ``step``, else the record's position. Every other numeric key is a series
    (the last value wins when an x repeats, as after a resume). Stage ``rl`` comes first and,
    within it, ``reward_mean`` (shaded ± ``reward_std`` when present), then other reward keys.

    Returns:
        ``[{"stage", "key", "x_label", "x", "y", "band"}]`` in display order.
    """
    stages: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if isinstance(r, Mapping):
            stages.setdefault(str(r.get("stage", "training")), []).append(r)
    order = sorted(stages, key=lambda s: (s != "rl", list(stages).index(s)))
    out: list[dict[str, Any]] = []
    for stage in order:
        recs = stages[stage]
        x_key = next((k for k in ("iteration", "step") if any(k in r for r in recs)), None)
        keys: list[str] = []
        for r in recs:
            for k, v in r.items():
                if (
                    k not in ("stage", "iteration", "step")
                    and is_number(v)
                    and charted(k)
                    and k not in keys
                ):
                    keys.append(k)
        per_key: dict[str, dict[float, float]] = {k: {} for k in keys}
        for pos, r in enumerate(recs):
            xv = r.get(x_key, pos) if x_key else pos
            if not is_number(xv):
                continue
            for k in keys:
                if is_number(r.get(k)):
                    per_key[k][float(xv)] = float(r[k])
        banded = "reward_mean" in keys and "reward_std" in keys
        first_seen = {k: i for i, k in enumerate(keys)}
        keys.sort(key=lambda k: (k != "reward_mean", not k.startswith("reward"), first_seen[k]))
        for k in keys:
            if banded and k == "reward_std":
                continue
            xs = sorted(per_key[k])
            if not xs:
                continue
            ys = [per_key[k][v] for v in xs]
            band = None
            if banded and k == "reward_mean":
                std = [per_key["reward_std"].get(v, math.nan) for v in xs]
                band = ([m - s for m, s in zip(ys, std, strict=True)],
                        [m + s for m, s in zip(ys, std, strict=True)])  # fmt: skip
            out.append(
                {
                    "stage": stage,
                    "key": k,
                    "x_label": x_key or "record",
                    "x": xs,
                    "y": ys,
                    "band": band,
                }  # fmt: skip
            )
    return out
