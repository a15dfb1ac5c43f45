"""The report's HTML pieces: escaping, number formatting, tables, and the one-line
definition of every metric shown under its table (the formulas of docs/metrics.md).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from runfiles import is_number

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

# --------------------------------------------------------------------------- HTML pieces


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits, thousands separated, '—' when missing."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not is_number(v):
        return esc(v)
    if not math.isfinite(v):
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.{digits}g}"


def definition(*keys: str) -> str:
    return "".join(f'<p class="def"><b>Definition.</b> {esc(DEFINITIONS[k])}</p>' for k in keys)


def note_line(metrics: Mapping[str, Any]) -> str:
    feats = metrics.get("features", {})
    if feats.get("comparable", True):
        return ""
    return f'<p class="nc">⚠ {esc(feats.get("note", ""))}</p>'


def table(
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


def ordinal(v: Any) -> str:
    if not is_number(v) or float(v) != int(v):
        return f"{fmt(v)}th"
    n = int(v)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def skipped_note(section: Mapping[str, Any] | None) -> str:
    """The note of a metrics section that was not computed or was skipped (with its
    reason), or "" for a section that holds results."""
    reason = "not computed" if not section else section.get("skipped")
    return f'<p class="note">skipped: {esc(reason)}</p>' if reason else ""
