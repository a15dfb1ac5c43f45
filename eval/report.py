"""The evaluation report: one self-contained HTML file (inline CSS, PNG data URIs, inline SVG).

:func:`render_report` turns the ``metrics.json`` dictionary written by ``medrl eval``
(:mod:`eval.evaluate`) plus a few pictures (real / generated image grids per prompt, flagged
near-copy pairs) and the run's ``metrics.jsonl`` records into HTML. Nothing is fetched when the
file is opened: images are base64 PNGs, plots are SVG drawn here, and every piece of text from
the data (prompts, paths, notes) is escaped.

``medrl dev report-example OUT`` writes a small phantom run (:mod:`eval.example`) and
evaluates it with the fallback features: that is how ``docs/images/report.png`` was made.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from generators.images import make_grid

#: Side of one thumbnail in the report's grids (px).
TILE = 128

#: One-line definitions shown under each table (the formulas of docs/metrics.md).
DEFINITIONS: dict[str, str] = {
    "fd": "FD = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^½) between Gaussians fitted to the "
    "generated and the real training features (the distance itself, not its root); "
    "FID when the features are InceptionV3 pool3. Lower is better.",
    "kid": "KID = unbiased MMD² with k(x, y) = (xᵀy / D + 1)³, mean ± std over random subsets "
    "of generated and real training features. Lower is better; ≈ 0 for matching sets.",
    "fidelity": "Fidelity_p = 1000 / (1 + FD_p), FD_p between the prompt's generated features "
    "and its reference; overall = 1000 / (1 + mean_p FD_p). Higher is better.",
    "feature_diversity": "Diversity_p = mean over pairs of the prompt's generated images of "
    "‖u_i − u_j‖, u = L2-normalised features (in [0, 2]). Higher = more diverse.",
    "fbd": "FBD = FD(all generated, all real) on the report's features (FBD proper when they "
    "are BiomedCLIP's). Lower is better.",
    "agreement": "Agreement = per paraphrase group, mean cosine similarity between images of "
    "different prompts of the group; overall = mean over groups. Higher is better.",
    "ssim": "SSIM / MS-SSIM = mean over all pairs of images of one prompt (real: of one Text) of "
    "SSIM (Gaussian window 11, σ 1.5, RGB in [0, 1]) and MS-SSIM. Lower = more diverse; "
    "generated well above real for the same text means mode collapse.",
    "fundus": "Per image over the inner field of view, at the generated images' resolution; "
    "ratio = generated mean / real mean (1 = match). medrl's definitions: not comparable with "
    "other papers' tables.",
    "privacy": "DCR = distance from an image to its nearest training image (L2 on features). "
    "Near copy: max SSIM to a training image > τ, or DCR below the 1st percentile of held-out "
    "real images' DCR (about 1 % of novel images pass that rule by construction).",
    "utility": "The same tiny CNN (32 × 32 input, 8 epochs, seeded) trained on real, synthetic, "
    "or real + synthetic images, tested on held-out real images; chance = majority class.",
}

#: One-line definition of each fundus statistic (docs/metrics.md).
FUNDUS_DEFINITIONS: dict[str, str] = {
    "snr": "mean_I S / std_I (Y − S), S = FOV-normalised Gaussian smoothing of luminance Y",
    "contrast": "robust Michelson (p99 − p1) / (p99 + p1) of Y over the inner FOV",
    "sharpness": "variance of the 4-neighbour Laplacian of Y over the inner FOV",
    "vessel_visibility": "mean Frangi vesselness of the green channel (σ 1–4 px, γ 0.05)",
    "illumination_uniformity": "1 − std / mean of Y blurred with σ = side / 16",
    "fov_fraction": "share of the image inside the field-of-view mask",
}

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;
 color:#1d2330;background:#f4f5f8;margin:0}
main{max-width:1240px;margin:0 auto;padding:20px 24px 40px}
header{background:#1d2b45;color:#fff;padding:18px 24px}
header .inner{max-width:1240px;margin:0 auto}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header .meta{color:#c9d3e6;font-size:13px}
header code{color:#fff;background:rgba(255,255,255,.12);padding:1px 5px;border-radius:3px;
 word-break:break-all}
h2{font-size:18px;margin:28px 0 8px;padding-bottom:4px;border-bottom:2px solid #d5d9e2}
h3{font-size:15px;margin:18px 0 6px}
.banner{background:#fff4d6;border:1px solid #e8c66a;border-left:5px solid #d79b00;
 padding:8px 12px;margin:14px 0;border-radius:4px;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #d9dde6;border-radius:6px;padding:8px 12px;min-width:150px;
 flex:1 1 150px}
.card .k{font-size:12px;color:#5b6476}
.card .v{font-size:19px;font-weight:600;white-space:nowrap}
.card .s{font-size:11px;color:#5b6476}
table{border-collapse:collapse;background:#fff;margin:6px 0;min-width:420px}
table.wide{width:100%}
th,td{border:1px solid #d9dde6;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#eef1f6;font-weight:600}
td.t,th.t{text-align:left}
caption{caption-side:top;text-align:left;font-size:12px;color:#5b6476;padding:2px 0}
.def{font-size:12.5px;color:#3f4757;margin:4px 0 2px}
.def b{color:#1d2330}
.note{font-size:12.5px;color:#7a4f00;margin:4px 0}
.nc{color:#b25b00;font-size:11.5px}
.prompt{background:#fff;border:1px solid #d9dde6;border-radius:6px;padding:8px 12px;margin:10px 0}
.prompt .p{font-weight:600;margin-bottom:6px}
.pair{display:flex;gap:14px;flex-wrap:wrap}
.pair figure{margin:0}
.pair figcaption{font-size:12px;color:#5b6476;margin-bottom:3px}
img{display:block;image-rendering:auto}
.charts{display:flex;flex-wrap:wrap;gap:10px}
.chart{background:#fff;border:1px solid #d9dde6;border-radius:6px;padding:4px}
.copies{display:flex;flex-wrap:wrap;gap:12px}
.copy{background:#fff;border:1px solid #d9dde6;border-radius:6px;padding:6px;font-size:12px;
 max-width:290px}
.muted{color:#5b6476}
footer{font-size:12px;color:#5b6476;margin-top:30px}
"""


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


def _thumb(image: np.ndarray, tile: int = TILE) -> np.ndarray:
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
    grid = make_grid([_thumb(i, side) for i in images], ncols=ncols, pad=pad)
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
    pts = [(float(a), float(b)) for a, b in zip(x, y, strict=True)]
    keep = [i for i, (a, b) in enumerate(pts) if math.isfinite(a) and math.isfinite(b)]
    pts = [pts[i] for i in keep]
    lows = highs = None
    if band is not None:
        lows = [float(band[0][i]) for i in keep]
        highs = [float(band[1][i]) for i in keep]
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

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    out.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#c5cad6"/>'
    )
    for t in yticks:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
            'stroke="#eceef3"/>'
            f'<text x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#5b6476">{_tick(t)}</text>'
        )
    for t in xticks:
        out.append(
            f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
            'stroke="#8a93a6"/>'
            f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11" '
            f'fill="#5b6476">{_tick(t)}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" font-size="11" '
        f'fill="#3f4757">{html.escape(x_label)}</text>'
    )
    if lows is not None and highs is not None and len(pts) > 1:
        poly = [f"{sx(a):.1f},{sy(h):.1f}" for a, h in zip(xs, highs, strict=True)]
        poly += [f"{sx(a):.1f},{sy(lo):.1f}" for a, lo in zip(xs[::-1], lows[::-1], strict=True)]
        out.append(f'<polygon points="{" ".join(poly)}" fill="{color}" fill-opacity="0.15"/>')
    if len(pts) > 1:
        line = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
        out.append(
            f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.8" '
            'stroke-linejoin="round"/>'
        )
    if len(pts) <= 40:
        out += [
            f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.6" fill="{color}"/>' for a, b in pts
        ]
    out.append("</svg>")
    return "".join(out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: Record keys that count or label rather than measure: never charted.
COUNTER_KEYS = frozenset({"stage_n", "samples", "trained_samples", "updates", "epoch"})


def _charted(key: str) -> bool:
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
                    and _is_number(v)
                    and _charted(k)
                    and k not in keys
                ):
                    keys.append(k)
        per_key: dict[str, dict[float, float]] = {k: {} for k in keys}
        for pos, r in enumerate(recs):
            xv = r.get(x_key, pos) if x_key else pos
            if not _is_number(xv):
                continue
            for k in keys:
                if _is_number(r.get(k)):
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


# --------------------------------------------------------------------------- HTML pieces


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits, thousands separated, '—' when missing."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not _is_number(v):
        return _esc(v)
    if not math.isfinite(v):
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.{digits}g}"


def _definition(*keys: str) -> str:
    return "".join(f'<p class="def"><b>Definition.</b> {_esc(DEFINITIONS[k])}</p>' for k in keys)


def _note_line(metrics: Mapping[str, Any]) -> str:
    feats = metrics.get("features", {})
    if feats.get("comparable", True):
        return ""
    return f'<p class="nc">⚠ {_esc(feats.get("note", ""))}</p>'


def _table(
    head: Sequence[str],
    rows: Sequence[Sequence[str]],
    text_cols: Sequence[int] = (0,),
    wide: bool = False,
) -> str:
    """Table from pre-escaped cells; columns in ``text_cols`` are left-aligned."""
    th = "".join(
        f'<th class="t">{h}</th>' if i in text_cols else f"<th>{h}</th>" for i, h in enumerate(head)
    )
    body = []
    for row in rows:
        tds = "".join(
            f'<td class="t">{c}</td>' if i in text_cols else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{tds}</tr>")
    cls = ' class="wide"' if wide else ""
    return f"<table{cls}><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ordinal(v: Any) -> str:
    if not _is_number(v) or float(v) != int(v):
        return f"{fmt(v)}th"
    n = int(v)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _skipped(section: Mapping[str, Any] | None) -> str | None:
    if not section:
        return "not computed"
    return section.get("skipped")


def _cards(m: Mapping[str, Any]) -> str:
    cards: list[tuple[str, str, str]] = []
    dist = m.get("distribution") or {}
    if "fd" in dist:
        cards.append((dist.get("label", "FD"), fmt(dist["fd"]), "vs real train; lower is better"))
        cards.append(
            (
                "KID",
                fmt(dist.get("kid_mean")),
                f"± {fmt(dist.get('kid_std'), 2)} over {dist.get('kid_subsets')} subsets",
            )
        )
    pm = m.get("prompts") or {}
    if "fidelity" in pm:
        cards.append(("Fidelity", fmt(pm["fidelity"]), "1000/(1+mean FD_p); higher better"))
        cards.append(("Feature diversity", fmt(pm["diversity"]), "higher = more diverse"))
    div = m.get("diversity") or {}
    if "generated" in div:
        cards.append(
            (
                "MS-SSIM gen / real",
                f"{fmt(div['generated'].get('ms_ssim'), 3)} / {fmt(div['real'].get('ms_ssim'), 3)}",
                "lower = more diverse",
            )
        )
    priv = m.get("privacy") or {}
    if "n_near_copies" in priv:
        cards.append(
            (
                "Near copies",
                f"{priv['n_near_copies']} / {priv['n_generated']}",
                f"SSIM > {priv.get('ssim_threshold')} or DCR < p1 held-out",
            )
        )
    ut = m.get("utility") or {}
    if "synthetic" in ut:
        cards.append(
            (
                "Utility (synthetic)",
                fmt(ut["synthetic"], 3),
                f"real {fmt(ut['real'], 3)}, chance {fmt(ut['chance'], 3)}",
            )
        )
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{v}</div>'
            f'<div class="s">{_esc(s)}</div></div>'
            for k, v, s in cards
        )
        + "</div>"
    )


def _grids_section(grids: Sequence[PromptGrid], n_prompts: int) -> str:
    out = ['<h2 id="images">Real and generated images</h2>']
    if not grids:
        return out[0] + '<p class="muted">no images to show</p>'
    out.append(
        f'<p class="muted">{len(grids)} of {n_prompts} prompt(s); left: real images, '
        "right: generated images of the prompt.</p>"
    )
    for g in grids:
        ncols = 4
        real = (
            f"<figure><figcaption>{_esc(g.real_caption)}</figcaption>"
            f"{grid_img(g.real, ncols, 'real images')}</figure>"
            if g.real
            else f"<figure><figcaption>{_esc(g.real_caption)}</figcaption></figure>"
        )
        gen = (
            f"<figure><figcaption>generated ({len(g.generated)} shown)</figcaption>"
            f"{grid_img(g.generated, ncols, 'generated images')}</figure>"
        )
        out.append(
            f'<div class="prompt"><div class="p">{_esc(g.prompt)}</div>'
            f'<div class="pair">{real}{gen}</div></div>'
        )
    return "".join(out)


def _proxy_gold_section(
    records: Sequence[Mapping[str, Any]], version_grids: Sequence[tuple[int, np.ndarray]]
) -> str:
    """Proxy against gold per adapter version, the verdict in words, a grid per version."""
    from eval.overoptimisation import GOLD_RANGES, proxy_gold_verdict, version_table

    rows = version_table([r for r in records if r.get("stage") == "rl"])
    if not rows and not version_grids:
        return ""
    parts = ['<h2 id="proxy-gold">RL: proxy reward against gold, per adapter version</h2>']
    if rows:
        verdict = proxy_gold_verdict(rows)
        cls = "banner" if verdict["verdict"] == "hacking" else "note"
        parts.append(f'<p class="{cls}">{_esc(verdict["text"])}</p>')
        parts.append(
            '<p class="muted">The same held-out prompts and seeds for every version. Bands: '
            "± 2 standard errors over the evaluation images (differences inside them are "
            "noise). Gold is drawn on its whole scale.</p>"
        )
        xs = [float(r["iteration"]) for r in rows]
        charts = []
        for key, title, color in (
            ("eval_reward", "proxy: eval_reward (reward models)", "#d0452f"),
            ("gold_combined", "gold: quality + faithfulness (2-6)", "#1f8a4c"),
            ("gold_quality", "gold quality (1-3)", "#1f8a4c"),
            ("gold_faithfulness", "gold faithfulness (1-3)", "#1f8a4c"),
            ("gold_eye_match", "gold: share with the prompt's eye", "#1f8a4c"),
            ("fd_real", "Fréchet distance to real (fallback features)", "#2f6fdf"),
        ):
            if not all(_is_number(r.get(key)) for r in rows):
                continue
            ys = [float(r[key]) for r in rows]
            band = None
            if all(_is_number(r.get(f"{key}_se")) for r in rows):
                se = [2 * float(r[f"{key}_se"]) for r in rows]
                band = ([y - e for y, e in zip(ys, se, strict=True)],
                        [y + e for y, e in zip(ys, se, strict=True)])  # fmt: skip
            chart = svg_line_chart(
                xs, ys, title, "adapter version", band, color, y_range=GOLD_RANGES.get(key)
            )
            charts.append(f'<div class="chart">{chart}</div>')
        parts.append(f'<div class="charts">{"".join(charts)}</div>')
    for version, grid in version_grids:
        parts.append(
            f'<h3>adapter version {version}: the evaluation images</h3><div class="grid">'
            f'<img src="{png_data_uri(grid)}" alt="evaluation images of adapter version '
            f'{version}" style="max-width:100%"></div>'
        )
    return "".join(parts)


def _curves_section(records: Sequence[Mapping[str, Any]], source: str | None) -> str:
    head = '<h2 id="curves">Training and RL curves</h2>'
    series = curve_series(records)
    if not series:
        where = f" ({_esc(source)})" if source else ""
        return head + f'<p class="muted">no metrics.jsonl records for this run{where}</p>'
    parts = [head, f'<p class="muted">from {_esc(source or "metrics.jsonl")}']
    if any(s["stage"] == "rl" for s in series):
        parts.append("; reward curves first (shaded: ± reward_std)")
    parts.append("</p>")
    stage = None
    for s in series:
        if s["stage"] != stage:
            if stage is not None:
                parts.append("</div>")
            stage = s["stage"]
            sid = "rl-curves" if stage == "rl" else f"curves-{_esc(stage)}"
            parts.append(f'<h3 id="{sid}">stage: {_esc(stage)}</h3><div class="charts">')
        color = "#d0452f" if s["key"].startswith("reward") else "#2f6fdf"
        chart = svg_line_chart(
            s["x"], s["y"], f"{s['key']}", s["x_label"], band=s["band"], color=color
        )
        parts.append(f'<div class="chart">{chart}</div>')
    parts.append("</div>")
    return "".join(parts)


def _distribution_section(m: Mapping[str, Any]) -> str:
    dist = m.get("distribution") or {}
    out = ['<h2 id="distribution">Distribution distances</h2>', _note_line(m)]
    if _skipped(dist):
        return "".join(out) + f'<p class="note">skipped: {_esc(_skipped(dist))}</p>'
    c = m.get("counts", {})
    rows = [
        [
            _esc(dist.get("label", "FD")),
            fmt(dist.get("fd")),
            _esc(f"{c.get('generated')} generated vs {c.get('real_train')} real train images"),
        ],
        [
            "KID",
            f"{fmt(dist.get('kid_mean'))} ± {fmt(dist.get('kid_std'), 2)}",
            _esc(f"{dist.get('kid_subsets')} subsets of {dist.get('kid_subset_size')} images"),
        ],
    ]
    out.append(_table(["metric", "value", "computed on"], rows, text_cols=(0, 2)))
    out.append(_definition("fd", "kid"))
    return "".join(out)


def _prompt_section(m: Mapping[str, Any]) -> str:
    pm = m.get("prompts") or {}
    out = ['<h2 id="prompts">Per prompt: Fidelity, Diversity, SSIM</h2>', _note_line(m)]
    if _skipped(pm):
        return "".join(out) + f'<p class="note">skipped: {_esc(_skipped(pm))}</p>'
    rows = []
    for r in pm.get("per_prompt", []):
        rows.append(
            [
                _esc(r["prompt"]),
                fmt(r.get("n_generated")),
                fmt(r.get("n_real_same_text")),
                fmt(r.get("fd")),
                fmt(r.get("fidelity")),
                fmt(r.get("diversity")),
                fmt(r.get("ssim_generated"), 3),
                fmt(r.get("ssim_real"), 3),
                fmt(r.get("ms_ssim_generated"), 3),
                fmt(r.get("ms_ssim_real"), 3),
            ]
        )
    div = m.get("diversity") or {}
    g, rl = div.get("generated", {}), div.get("real", {})
    rows.append(
        [
            "<b>all prompts</b>",
            fmt(m.get("counts", {}).get("generated")),
            "",
            f"FBD {fmt(pm.get('fbd'))}",
            f"<b>{fmt(pm.get('fidelity'))}</b>",
            f"<b>{fmt(pm.get('diversity'))}</b>",
            f"<b>{fmt(g.get('ssim'), 3)}</b>",
            f"<b>{fmt(rl.get('ssim'), 3)}</b>",
            f"<b>{fmt(g.get('ms_ssim'), 3)}</b>",
            f"<b>{fmt(rl.get('ms_ssim'), 3)}</b>",
        ]
    )
    head = [
        "prompt",
        "generated",
        "real (same text)",
        "FD_p",
        "Fidelity",
        "Diversity",
        "SSIM gen",
        "SSIM real",
        "MS-SSIM gen",
        "MS-SSIM real",
    ]
    out.append(
        f'<p class="muted">Fidelity reference: {_esc(pm.get("reference", ""))}; overall '
        f"Fidelity = 1000/(1+mean FD_p) (mean of per-prompt values "
        f"{fmt(pm.get('fidelity_mean'))}); Diversity distance: "
        f"{_esc(pm.get('diversity_distance', ''))}. SSIM / MS-SSIM at "
        f"{_esc(div.get('image_size', ''))} px, MS-SSIM {_esc(div.get('ms_ssim_mode', ''))}; "
        f"real images {_esc(rl.get('grouping', ''))}.</p>"
    )
    out.append(_table(head, rows, wide=True))
    for p in pm.get("unscored_prompts", []):
        out.append(f'<p class="note">not scored (fewer than 2 generated images): {_esc(p)}</p>')
    out.append(_definition("fidelity", "feature_diversity", "fbd", "ssim"))
    out.append('<h3 id="agreement">Agreement (paraphrases)</h3>')
    groups = pm.get("agreement_per_group") or {}
    if groups:
        rows = [[_esc(k), fmt(v)] for k, v in groups.items()]
        rows.append(["<b>mean over groups</b>", f"<b>{fmt(pm.get('agreement'))}</b>"])
        out.append(_table(["paraphrase group", "Agreement"], rows))
    else:
        out.append(f'<p class="note">{_esc(pm.get("agreement_note", "not applicable"))}</p>')
    out.append(_definition("agreement"))
    return "".join(out)


def _fundus_section(m: Mapping[str, Any]) -> str:
    fs = m.get("fundus") or {}
    out = ['<h2 id="fundus">Fundus image statistics</h2>']
    if _skipped(fs):
        return "".join(out) + f'<p class="note">skipped: {_esc(_skipped(fs))}</p>'
    rows = []
    for r in fs.get("rows", []):
        rows.append(
            [
                _esc(r["stat"]),
                _esc(FUNDUS_DEFINITIONS.get(r["stat"], "")),
                f"{fmt(r['real_mean'])} ± {fmt(r['real_std'], 2)}",
                f"{fmt(r['generated_mean'])} ± {fmt(r['generated_std'], 2)}",
                fmt(r.get("ratio"), 3),
            ]
        )
    out.append(
        f'<p class="muted">{fs.get("n_real")} real, {fs.get("n_generated")} generated images at '
        f"{fs.get('size')} px.</p>"
    )
    out.append(
        _table(
            [
                "statistic",
                "definition",
                "real (mean ± std)",
                "generated (mean ± std)",
                "gen / real",
            ],
            rows,
            text_cols=(0, 1),
            wide=True,
        )
    )
    out.append(_definition("fundus"))
    return "".join(out)


def _privacy_section(m: Mapping[str, Any], pairs: Sequence[CopyPair]) -> str:
    pr = m.get("privacy") or {}
    out = ['<h2 id="privacy">Privacy: nearest training images</h2>', _note_line(m)]
    if _skipped(pr):
        return "".join(out) + f'<p class="note">skipped: {_esc(_skipped(pr))}</p>'
    rows = [
        [
            "median DCR (feature L2)",
            fmt(pr.get("generated_dcr_median")),
            fmt(pr.get("holdout_dcr_median")),
        ],
        [
            "median max SSIM to a training image",
            fmt(pr.get("generated_ssim_max_median"), 3),
            fmt(pr.get("holdout_ssim_max_median"), 3),
        ],
        [
            f"share with DCR below the held-out {_ordinal(pr.get('percentile'))} percentile "
            f"({fmt(pr.get('feature_threshold'))})",
            fmt(pr.get("fraction_below_threshold"), 3),
            f"{fmt(pr.get('expected_fraction_if_novel'), 3)} (expected if novel)",
        ],
    ]
    out.append(_table(["", "generated", "held-out real"], rows))
    out.append(
        f'<p class="muted">median DCR ratio generated / held-out: '
        f"{fmt(pr.get('dcr_median_ratio'), 3)} (well below 1 = closer to the training data than "
        "unseen real images).</p>"
    )
    for r in pr.get("skipped_rules", []):
        out.append(f'<p class="note">rule skipped: {_esc(r)}</p>')
    n_hold = m.get("counts", {}).get("real_holdout") or 0
    if 0 < n_hold < 100 and pr.get("feature_threshold") is not None:
        out.append(
            f'<p class="note">Only {n_hold} held-out images: the DCR threshold is close to their '
            f"minimum, so about 1/(n+1) = {100 / (n_hold + 1):.0f} % of novel images fall below "
            "it by chance. Read DCR-only flags as candidates for review.</p>"
        )
    out.append(_definition("privacy"))
    n = pr.get("n_near_copies", 0)
    out.append(
        f'<h3 id="near-copies">Flagged near copies ({n} of {pr.get("n_generated")}, '
        f"SSIM threshold {fmt(pr.get('ssim_threshold'))})</h3>"
    )
    if not pairs:
        out.append('<p class="muted">none flagged</p>')
        return "".join(out)
    if n > len(pairs):
        out.append(f'<p class="muted">showing {len(pairs)} of {n}; all are in metrics.json</p>')
    out.append('<div class="copies">')
    for p in pairs:
        img = grid_img([p.generated, p.train], 2, "generated | nearest training image")
        out.append(
            f'<div class="copy">{img}'
            f"<div>generated <b>{_esc(p.sample_id)}</b> | training "
            f"<b>{_esc(Path(p.train_path).name)}</b></div>"
            f"<div>SSIM {fmt(p.ssim, 3)}, feature distance {fmt(p.feature_distance)}</div>"
            f'<div class="muted">{_esc("; ".join(p.reasons))}</div></div>'
        )
    out.append("</div>")
    return "".join(out)


def _utility_section(m: Mapping[str, Any]) -> str:
    ut = m.get("utility") or {}
    out = ['<h2 id="utility">Utility: train on synthetic, test on real</h2>']
    if _skipped(ut):
        return "".join(out) + f'<p class="note">skipped: {_esc(_skipped(ut))}</p>'
    rows = [
        ["real", fmt(ut.get("real"), 3), fmt(ut.get("n_real_train"))],
        ["synthetic", fmt(ut.get("synthetic"), 3), fmt(ut.get("n_synthetic"))],
        [
            "real + synthetic",
            fmt(ut.get("real_plus_synthetic"), 3),
            fmt((ut.get("n_real_train") or 0) + (ut.get("n_synthetic") or 0)),
        ],
        ["chance (majority class)", fmt(ut.get("chance"), 3), ""],
    ]
    out.append(
        f'<p class="muted">{fmt(ut.get("n_test"))} held-out real test images; classes: '
        f"{_esc(', '.join(str(c) for c in ut.get('classes', [])))} (manifest column "
        "<code>label</code>; generated images labelled by their prompt's Text).</p>"
    )
    out.append(_table(["trained on", "accuracy on held-out real", "training images"], rows))
    out.append(_definition("utility"))
    return "".join(out)


def render_report(
    metrics: Mapping[str, Any],
    grids: Sequence[PromptGrid] = (),
    copy_pairs: Sequence[CopyPair] = (),
    curves: Sequence[Mapping[str, Any]] = (),
    curves_source: str | None = None,
    version_grids: Sequence[tuple[int, np.ndarray]] = (),
) -> str:
    """The self-contained HTML report of one evaluation.

    Args:
        metrics: the dictionary written to ``metrics.json`` (see docs/metrics.md).
        grids: real and generated images per prompt (a few prompts).
        copy_pairs: flagged near copies with their nearest training image.
        curves: the run's ``metrics.jsonl`` records (any stages; ``rl`` plotted first).
        curves_source: where the records came from (shown under the heading).
        version_grids: (adapter version, grid image) of the RL evaluation images.
    """
    feats = metrics.get("features", {})
    counts = metrics.get("counts", {})
    run = metrics.get("run", "run")
    banner = (
        f'<div class="banner">⚠ {_esc(feats.get("note", ""))}. Compare only with runs '
        "evaluated with the same features inside medrl.</div>"
        if not feats.get("comparable", True)
        else ""
    )
    notes = "".join(
        f'<p class="note">{_esc(n)}</p>'
        for n in metrics.get("notes", [])
        if n != feats.get("note")  # already in the banner
    )
    meta = (
        f"{_esc(str(metrics.get('created', '')).replace('T', ' '))} · features <b>{_esc(feats.get('name', '?'))}</b> "
        f"({fmt(feats.get('dim'))}-d, {'comparable' if feats.get('comparable') else 'NOT comparable'}"
        f") · {fmt(counts.get('generated'))} generated images, {fmt(counts.get('prompts'))} "
        f"prompts · {fmt(counts.get('real_train'))} real train, "
        f"{fmt(counts.get('real_holdout'))} held-out real images"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>medrl eval — {_esc(run)}</title><style>{_CSS}</style></head><body>",
        f'<header><div class="inner"><h1>medrl evaluation — {_esc(run)}</h1>',
        f'<div class="meta">{meta}</div>',
        f'<div class="meta">command: <code>{_esc(metrics.get("command", ""))}</code></div>',
        "</div></header><main>",
        banner,
        _cards(metrics),
        notes,
        _grids_section(grids, int(counts.get("prompts") or 0)),
        _proxy_gold_section(curves, version_grids),
        _curves_section(curves, curves_source),
        _distribution_section(metrics),
        _prompt_section(metrics),
        _fundus_section(metrics),
        _privacy_section(metrics, copy_pairs),
        _utility_section(metrics),
        f"<footer>Written by <code>medrl eval</code>; every number is in "
        f"<code>metrics.json</code> beside this file. Definitions and caveats: "
        f"docs/metrics.md. Samples: {_esc(metrics.get('inputs', {}).get('samples', ''))}; "
        f"real: {_esc(metrics.get('inputs', {}).get('manifest', ''))}.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)
