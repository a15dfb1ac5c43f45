"""The sections of the evaluation report, one function each, from the ``metrics.json``
dictionary of ``medrl eval``: headline cards, image grids, proxy against gold, curves,
distribution and prompt metrics, fundus statistics, privacy, utility. Every piece of text
from the data is escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.charts import (
    CopyPair,
    PromptGrid,
    curve_series,
    grid_img,
    is_number,
    png_data_uri,
    svg_line_chart,
)
from eval.report_html import (
    FUNDUS_DEFINITIONS,
    definition,
    esc,
    fmt,
    note_line,
    ordinal,
    skipped_note,
    table,
)


def cards(m: Mapping[str, Any]) -> str:
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
            f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div>'
            f'<div class="s">{esc(s)}</div></div>'
            for k, v, s in cards
        )
        + "</div>"
    )


def grids_section(grids: Sequence[PromptGrid], n_prompts: int) -> str:
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
            f"<figure><figcaption>{esc(g.real_caption)}</figcaption>"
            f"{grid_img(g.real, ncols, 'real images')}</figure>"
            if g.real
            else f"<figure><figcaption>{esc(g.real_caption)}</figcaption></figure>"
        )
        gen = (
            f"<figure><figcaption>generated ({len(g.generated)} shown)</figcaption>"
            f"{grid_img(g.generated, ncols, 'generated images')}</figure>"
        )
        out.append(
            f'<div class="prompt"><div class="p">{esc(g.prompt)}</div>'
            f'<div class="pair">{real}{gen}</div></div>'
        )
    return "".join(out)


def proxy_gold_section(
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
        parts.append(f'<p class="{cls}">{esc(verdict["text"])}</p>')
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
            if not all(is_number(r.get(key)) for r in rows):
                continue
            ys = [float(r[key]) for r in rows]
            band = None
            if all(is_number(r.get(f"{key}_se")) for r in rows):
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


def curves_section(records: Sequence[Mapping[str, Any]], source: str | None) -> str:
    head = '<h2 id="curves">Training and RL curves</h2>'
    series = curve_series(records)
    if not series:
        where = f" ({esc(source)})" if source else ""
        return head + f'<p class="muted">no metrics.jsonl records for this run{where}</p>'
    parts = [head, f'<p class="muted">from {esc(source or "metrics.jsonl")}']
    if any(s["stage"] == "rl" for s in series):
        parts.append("; reward curves first (shaded: ± reward_std)")
    parts.append("</p>")
    stage = None
    for s in series:
        if s["stage"] != stage:
            if stage is not None:
                parts.append("</div>")
            stage = s["stage"]
            sid = "rl-curves" if stage == "rl" else f"curves-{esc(stage)}"
            parts.append(f'<h3 id="{sid}">stage: {esc(stage)}</h3><div class="charts">')
        color = "#d0452f" if s["key"].startswith("reward") else "#2f6fdf"
        chart = svg_line_chart(
            s["x"], s["y"], f"{s['key']}", s["x_label"], band=s["band"], color=color
        )
        parts.append(f'<div class="chart">{chart}</div>')
    parts.append("</div>")
    return "".join(parts)


def distribution_section(m: Mapping[str, Any]) -> str:
    dist = m.get("distribution") or {}
    out = ['<h2 id="distribution">Distribution distances</h2>', note_line(m)]
    if note := skipped_note(dist):
        return "".join(out) + note
    c = m.get("counts", {})
    rows = [
        [
            esc(dist.get("label", "FD")),
            fmt(dist.get("fd")),
            esc(f"{c.get('generated')} generated vs {c.get('real_train')} real train images"),
        ],
        [
            "KID",
            f"{fmt(dist.get('kid_mean'))} ± {fmt(dist.get('kid_std'), 2)}",
            esc(f"{dist.get('kid_subsets')} subsets of {dist.get('kid_subset_size')} images"),
        ],
    ]
    out.append(table(["metric", "value", "computed on"], rows, text_cols=(0, 2)))
    out.append(definition("fd", "kid"))
    return "".join(out)


def prompt_section(m: Mapping[str, Any]) -> str:
    pm = m.get("prompts") or {}
    out = ['<h2 id="prompts">Per prompt: Fidelity, Diversity, SSIM</h2>', note_line(m)]
    if note := skipped_note(pm):
        return "".join(out) + note
    rows = []
    for r in pm.get("per_prompt", []):
        rows.append(
            [
                esc(r["prompt"]),
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
        f'<p class="muted">Fidelity reference: {esc(pm.get("reference", ""))}; overall '
        f"Fidelity = 1000/(1+mean FD_p) (mean of per-prompt values "
        f"{fmt(pm.get('fidelity_mean'))}); Diversity distance: "
        f"{esc(pm.get('diversity_distance', ''))}. SSIM / MS-SSIM at "
        f"{esc(div.get('image_size', ''))} px, MS-SSIM {esc(div.get('ms_ssim_mode', ''))}; "
        f"real images {esc(rl.get('grouping', ''))}.</p>"
    )
    out.append(table(head, rows, wide=True))
    for p in pm.get("unscored_prompts", []):
        out.append(f'<p class="note">not scored (fewer than 2 generated images): {esc(p)}</p>')
    out.append(definition("fidelity", "feature_diversity", "fbd", "ssim"))
    out.append('<h3 id="agreement">Agreement (paraphrases)</h3>')
    groups = pm.get("agreement_per_group") or {}
    if groups:
        rows = [[esc(k), fmt(v)] for k, v in groups.items()]
        rows.append(["<b>mean over groups</b>", f"<b>{fmt(pm.get('agreement'))}</b>"])
        out.append(table(["paraphrase group", "Agreement"], rows))
    else:
        out.append(f'<p class="note">{esc(pm.get("agreement_note", "not applicable"))}</p>')
    out.append(definition("agreement"))
    return "".join(out)


def fundus_section(m: Mapping[str, Any]) -> str:
    fs = m.get("fundus") or {}
    out = ['<h2 id="fundus">Fundus image statistics</h2>']
    if note := skipped_note(fs):
        return "".join(out) + note
    rows = []
    for r in fs.get("rows", []):
        rows.append(
            [
                esc(r["stat"]),
                esc(FUNDUS_DEFINITIONS.get(r["stat"], "")),
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
        table(
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
    out.append(definition("fundus"))
    return "".join(out)


def privacy_section(m: Mapping[str, Any], pairs: Sequence[CopyPair]) -> str:
    pr = m.get("privacy") or {}
    out = ['<h2 id="privacy">Privacy: nearest training images</h2>', note_line(m)]
    if note := skipped_note(pr):
        return "".join(out) + note
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
            f"share with DCR below the held-out {ordinal(pr.get('percentile'))} percentile "
            f"({fmt(pr.get('feature_threshold'))})",
            fmt(pr.get("fraction_below_threshold"), 3),
            f"{fmt(pr.get('expected_fraction_if_novel'), 3)} (expected if novel)",
        ],
    ]
    out.append(table(["", "generated", "held-out real"], rows))
    out.append(
        f'<p class="muted">median DCR ratio generated / held-out: '
        f"{fmt(pr.get('dcr_median_ratio'), 3)} (well below 1 = closer to the training data than "
        "unseen real images).</p>"
    )
    for r in pr.get("skipped_rules", []):
        out.append(f'<p class="note">rule skipped: {esc(r)}</p>')
    n_hold = m.get("counts", {}).get("real_holdout") or 0
    if 0 < n_hold < 100 and pr.get("feature_threshold") is not None:
        out.append(
            f'<p class="note">Only {n_hold} held-out images: the DCR threshold is close to their '
            f"minimum, so about 1/(n+1) = {100 / (n_hold + 1):.0f} % of novel images fall below "
            "it by chance. Read DCR-only flags as candidates for review.</p>"
        )
    out.append(definition("privacy"))
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
            f"<div>generated <b>{esc(p.sample_id)}</b> | training "
            f"<b>{esc(Path(p.train_path).name)}</b></div>"
            f"<div>SSIM {fmt(p.ssim, 3)}, feature distance {fmt(p.feature_distance)}</div>"
            f'<div class="muted">{esc("; ".join(p.reasons))}</div></div>'
        )
    out.append("</div>")
    return "".join(out)


def utility_section(m: Mapping[str, Any]) -> str:
    ut = m.get("utility") or {}
    out = ['<h2 id="utility">Utility: train on synthetic, test on real</h2>']
    if note := skipped_note(ut):
        return "".join(out) + note
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
        f"{esc(', '.join(str(c) for c in ut.get('classes', [])))} (manifest column "
        "<code>label</code>; generated images labelled by their prompt's Text).</p>"
    )
    out.append(table(["trained on", "accuracy on held-out real", "training images"], rows))
    out.append(definition("utility"))
    return "".join(out)
