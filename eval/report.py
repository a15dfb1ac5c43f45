"""The evaluation report: one self-contained HTML file (inline CSS, PNG data URIs, inline SVG).

:func:`render_report` turns the ``metrics.json`` dictionary written by ``medrl eval``
(:mod:`eval.evaluate`) plus a few pictures (real / generated image grids per prompt, flagged
near-copy pairs) and the run's ``metrics.jsonl`` records into HTML, section by section
(:mod:`eval.report_sections`; pictures and charts: :mod:`eval.charts`; HTML pieces:
:mod:`eval.report_html`). Nothing is fetched when the file is opened.

``medrl dev report-example OUT`` writes a small phantom run (:mod:`eval.example`) and
evaluates it with the fallback features: that is how ``docs/images/report.png`` was made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval import report_sections as sections
from eval.charts import CopyPair, PromptGrid
from eval.report_html import esc, fmt

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
        f'<div class="banner">⚠ {esc(feats.get("note", ""))}. Compare only with runs '
        "evaluated with the same features inside medrl.</div>"
        if not feats.get("comparable", True)
        else ""
    )
    notes = "".join(
        f'<p class="note">{esc(n)}</p>'
        for n in metrics.get("notes", [])
        if n != feats.get("note")  # already in the banner
    )
    meta = (
        f"{esc(str(metrics.get('created', '')).replace('T', ' '))} · features <b>{esc(feats.get('name', '?'))}</b> "
        f"({fmt(feats.get('dim'))}-d, {'comparable' if feats.get('comparable') else 'NOT comparable'}"
        f") · {fmt(counts.get('generated'))} generated images, {fmt(counts.get('prompts'))} "
        f"prompts · {fmt(counts.get('real_train'))} real train, "
        f"{fmt(counts.get('real_holdout'))} held-out real images"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>medrl eval — {esc(run)}</title><style>{_CSS}</style></head><body>",
        f'<header><div class="inner"><h1>medrl evaluation — {esc(run)}</h1>',
        f'<div class="meta">{meta}</div>',
        f'<div class="meta">command: <code>{esc(metrics.get("command", ""))}</code></div>',
        "</div></header><main>",
        banner,
        sections.cards(metrics),
        notes,
        sections.grids_section(grids, int(counts.get("prompts") or 0)),
        sections.proxy_gold_section(curves, version_grids),
        sections.curves_section(curves, curves_source),
        sections.distribution_section(metrics),
        sections.prompt_section(metrics),
        sections.fundus_section(metrics),
        sections.privacy_section(metrics, copy_pairs),
        sections.utility_section(metrics),
        f"<footer>Written by <code>medrl eval</code>; every number is in "
        f"<code>metrics.json</code> beside this file. Definitions and caveats: "
        f"docs/metrics.md. Samples: {esc(metrics.get('inputs', {}).get('samples', ''))}; "
        f"real: {esc(metrics.get('inputs', {}).get('manifest', ''))}.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)
