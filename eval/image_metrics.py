"""The metrics of ``medrl eval`` that need pixels, each keeping only the pixels it uses.

Pixel diversity keeps the images of the groups it compares (at most ``DIVERSITY_PER_GROUP``
per group); fundus statistics keep per-image statistics; privacy keeps small copies
(``SSIM_SIZE`` px) and features; utility keeps the classifier-sized copies of the labelled
images; the report's grids keep the generated images they show and decode the rest again
from disk when the report is written. The shape and the chunks: :mod:`eval.metrics`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from eval.charts import CopyPair, PromptGrid
from eval.diversity import compare_diversity
from eval.fundus_stats import STAT_NAMES, FundusStats, compare_statistics, fundus_statistics
from eval.image_batch import resized_float_batch
from eval.metrics import Chunk, EvalPlan, FeatureStore, Section
from eval.privacy import SSIM_SIZE, nearest_neighbours, privacy_report
from eval.samples import load_square, seeded_subset
from eval.utility import UTILITY_SIZE, utility_report

log = logging.getLogger(__name__)

#: SSIM diversity: at most this many images per prompt / real Text group, and real groups.
DIVERSITY_PER_GROUP = 16
DIVERSITY_MAX_GROUPS = 64
#: Fundus statistics: at most this many images per side (a seeded subset).
MAX_STATS_IMAGES = 500
#: Flagged near-copy pairs shown in the report (all are in metrics.json).
MAX_PAIRS_SHOWN = 12
#: Prompts shown as image grids, and images per side of each grid.
GRID_PROMPTS = 4
GRID_IMAGES = 4
#: Utility's section when ``--no-utility`` turned it off (the user's choice: no note).
TURNED_OFF = "turned off (--no-utility)"


def _first_per_group(labels: list[str], per_group: int) -> list[int]:
    """Indices of the first ``per_group`` items of each label, grouped in first-seen order."""
    return [
        i
        for p in dict.fromkeys(labels)
        for i in [k for k, q in enumerate(labels) if q == p][:per_group]
    ]


def diversity_real_groups(
    texts: list[str], gen_prompts: list[str]
) -> tuple[list[int], list[str] | None, str]:
    """Which real images the SSIM diversity reference uses, their groups, and how."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    multi = {t: idx for t, idx in groups.items() if len(idx) >= 2}
    if not multi:
        idx = seeded_subset(len(texts), DIVERSITY_PER_GROUP * 4).tolist()
        return idx, None, "pooled (no Text has 2 or more real training images)"
    wanted = [t for t in dict.fromkeys(gen_prompts) if t in multi]
    others = [t for t in multi if t not in wanted]
    rng = np.random.default_rng(0)
    others = [others[i] for i in rng.permutation(len(others))]
    chosen = (wanted + others)[:DIVERSITY_MAX_GROUPS]
    idx = [i for t in chosen for i in multi[t][:DIVERSITY_PER_GROUP]]
    how = f"grouped by Text ({len(chosen)} text(s) with 2 or more training images)"
    return idx, [texts[i] for i in idx], how


class DiversityMetric:
    """Mean pairwise SSIM / MS-SSIM per prompt, generated and real (pixels: no feature note)."""

    key = "diversity"

    def __init__(self, plan: EvalPlan) -> None:
        self.plan = plan
        self.gen_idx = _first_per_group(plan.gen_prompts, DIVERSITY_PER_GROUP)
        self.real_idx, self.real_groups, self.grouping = diversity_real_groups(
            plan.train_texts, plan.gen_prompts
        )
        self._kept: dict[str, dict[int, np.ndarray]] = {"generated": {}, "train": {}}
        self._wanted = {"generated": set(self.gen_idx), "train": set(self.real_idx)}
        self.result: dict[str, Any] = {}

    def update(self, chunk: Chunk) -> None:
        if chunk.side in self._kept:
            self._kept[chunk.side].update(chunk.picked(self._wanted[chunk.side]))

    def compute(self) -> Section:
        gen, real = self._kept["generated"], self._kept["train"]
        self.result = compare_diversity(
            [gen[i] for i in self.gen_idx],
            [self.plan.gen_prompts[i] for i in self.gen_idx],
            [real[i] for i in self.real_idx],
            self.real_groups,
            size=self.plan.size,
        )
        dg, dr = self.result["generated"], self.result["real"]
        return Section(
            {
                "generated": {"ssim": dg.ssim, "ms_ssim": dg.ms_ssim},
                "real": {"ssim": dr.ssim, "ms_ssim": dr.ms_ssim, "grouping": self.grouping},
                "ms_ssim_scales": dg.ms_ssim_scales,
                "ms_ssim_mode": dg.ms_ssim_mode,
                "image_size": self.plan.size,
                "max_images_per_group": DIVERSITY_PER_GROUP,
            }
        )


class FundusMetric:
    """Fundus image statistics, real train vs generated (seeded subsets), on fundus manifests."""

    key = "fundus"

    def __init__(self, plan: EvalPlan) -> None:
        self.plan = plan
        self.modalities = sorted(set(plan.train["modality"]))
        self.applies = "fundus" in self.modalities
        self._wanted = {
            "train": set(seeded_subset(len(plan.train), MAX_STATS_IMAGES, seed=2).tolist()),
            "generated": set(seeded_subset(len(plan.gen_paths), MAX_STATS_IMAGES, seed=3).tolist()),
        }
        self._stats: dict[str, list[FundusStats]] = {"train": [], "generated": []}

    def update(self, chunk: Chunk) -> None:
        if not self.applies or chunk.side not in self._stats:
            return
        picked = [im for _, im in chunk.picked(self._wanted[chunk.side])]
        if picked:
            self._stats[chunk.side].append(fundus_statistics(picked, self.plan.size))

    def _joined(self, side: str) -> FundusStats:
        parts = self._stats[side]
        values = {k: np.concatenate([p.values[k] for p in parts]) for k in STAT_NAMES}
        return FundusStats(values=values, size=self.plan.size)

    def compute(self) -> Section:
        if not self.applies:
            reason = f"not a fundus manifest (modality {', '.join(self.modalities)})"
            return Section({"skipped": reason}, [f"fundus statistics skipped: {reason}"])
        fc = compare_statistics(self._joined("train"), self._joined("generated"))
        rows = [
            {
                "stat": r.stat,
                "real_mean": r.real_mean,
                "real_std": r.real_std,
                "generated_mean": r.generated_mean,
                "generated_std": r.generated_std,
                "ratio": r.ratio,
            }
            for r in fc.rows
        ]
        values = {"size": fc.size, "n_real": fc.n_real, "n_generated": fc.n_generated}
        return Section({**values, "rows": rows})


class PrivacyMetric:
    """Nearest training image of every generated image: feature distance and SSIM (copies)."""

    key = "privacy"

    def __init__(self, plan: EvalPlan) -> None:
        self.plan = plan
        self.features = FeatureStore(("generated", "train", "holdout"))
        self._small: dict[str, list[torch.Tensor]] = {
            s: [] for s in ("generated", "train", "holdout")
        }
        self._near: list[Any] = []

    def update(self, chunk: Chunk) -> None:
        self.features.update(chunk)
        self._small[chunk.side].append(resized_float_batch(chunk.images, SSIM_SIZE, chunk.side))

    def _small_copies(self, side: str) -> torch.Tensor | None:
        return torch.cat(self._small[side]) if self._small[side] else None

    def compute(self) -> Section:
        plan = self.plan
        pr = privacy_report(
            self.features.get("generated"),
            self.features.get("train"),
            self.features.get("holdout"),
            generated_images=self._small_copies("generated"),
            train_images=self._small_copies("train"),
            holdout_images=self._small_copies("holdout"),
            ssim_threshold=plan.near_copy_ssim,
            feature_name=plan.feature_name,
        )
        self._near = pr.near_copies
        train_rel = [str(p) for p in plan.train["relpath"]]
        copies = [
            {
                "sample_id": plan.gen_ids[c.generated_index],
                "generated_path": plan.gen_shown[c.generated_index],
                "prompt": plan.gen_prompts[c.generated_index],
                "train_path": train_rel[c.train_index],
                "feature_distance": c.feature_distance,
                "ssim": c.ssim,
                "reasons": list(c.reasons),
            }
            for c in pr.near_copies
        ]
        values = {
            **pr.summary(),
            "n_generated": len(plan.gen_paths),
            "n_near_copies": len(pr.near_copies),
            "metric": pr.metric,
            "feature_threshold": pr.feature_threshold,
            "percentile": pr.percentile,
            "ssim_threshold": pr.ssim_threshold,
            "skipped_rules": pr.skipped_rules,
            "near_copies": copies,
            "note": plan.note,
        }
        return Section(values)

    def pairs(self) -> list[CopyPair]:
        """The first flagged pairs at full size for the report, decoded again from disk."""
        plan, train_paths = self.plan, self.plan.paths("train")
        return [
            CopyPair(
                generated=load_square(plan.gen_paths[c.generated_index], plan.size),
                train=load_square(train_paths[c.train_index], plan.size),
                sample_id=plan.gen_ids[c.generated_index],
                generated_path=plan.gen_shown[c.generated_index],
                train_path=str(plan.train["relpath"].iloc[c.train_index]),
                ssim=None if math.isnan(c.ssim) else c.ssim,
                feature_distance=c.feature_distance,
                reasons=list(c.reasons),
            )
            for c in self._near[:MAX_PAIRS_SHOWN]
        ]


def _label_key(label: str) -> tuple:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


class UtilityMetric:
    """Train-on-synthetic utility, labels from the manifest (generated: by prompt = Text).

    Which images take part is decided from the manifest before any image is decoded; only
    their classifier-sized copies (``UTILITY_SIZE`` px) are kept.
    """

    key = "utility"

    def __init__(self, plan: EvalPlan, enabled: bool = True) -> None:
        self.plan = plan
        self.skipped = TURNED_OFF if not enabled else self._plan_labels()
        self._small: dict[str, dict[int, torch.Tensor]] = {
            s: {} for s in ("generated", "train", "holdout")
        }

    def _plan_labels(self) -> str | None:
        """Choose the labelled images of each side and the classes; or say why utility skips."""
        plan = self.plan
        frame = plan.frame
        labelled = frame[frame["label"].astype(str).str.strip() != ""]
        if labelled.empty:
            return "the manifest has no labels (column 'label' is empty)"
        by_text: dict[str, set[str]] = {}
        for t, lab in zip(labelled["Text"], labelled["label"], strict=True):
            by_text.setdefault(str(t), set()).add(str(lab).strip())
        syn = [i for i, p in enumerate(plan.gen_prompts) if len(by_text.get(p, ())) == 1]
        if not syn:
            return (
                "no generated prompt equals the Text of a labelled manifest row "
                "(or its Text has several labels)"
            )
        tr = [i for i, lab in enumerate(plan.train["label"]) if str(lab).strip()]
        te = [i for i, lab in enumerate(plan.hold["label"]) if str(lab).strip()]
        if len(tr) < 2:
            return "fewer than 2 labelled real training images"
        if not te:
            return "no labelled held-out (val/test) real images to test on"
        self.labels = {
            "generated": {i: next(iter(by_text[plan.gen_prompts[i]])) for i in syn},
            "train": {i: str(plan.train["label"].iloc[i]).strip() for i in tr},
            "holdout": {i: str(plan.hold["label"].iloc[i]).strip() for i in te},
        }
        found = {c for side in self.labels.values() for c in side.values()}
        self.classes = sorted(found, key=_label_key)
        if len(self.classes) < 2:
            return f"only one class ({self.classes[0]!r}) among the labels"
        return None

    def update(self, chunk: Chunk) -> None:
        if self.skipped is not None:
            return
        picked = chunk.picked(self.labels[chunk.side])
        if picked:
            small = resized_float_batch([im for _, im in picked], UTILITY_SIZE, chunk.side)
            self._small[chunk.side].update(zip((i for i, _ in picked), small, strict=True))

    def _side(self, side: str) -> tuple[torch.Tensor, list[int]]:
        """The side's labelled copies (index order) and their class numbers."""
        index = {c: k for k, c in enumerate(self.classes)}
        order = sorted(self.labels[side])
        copies = torch.stack([self._small[side][i] for i in order])
        return copies, [index[self.labels[side][i]] for i in order]

    def compute(self) -> Section:
        if self.skipped is not None:
            notes = [] if self.skipped == TURNED_OFF else [f"utility skipped: {self.skipped}"]
            return Section({"skipped": self.skipped}, notes)
        (xr, yr), (xs, ys), (xt, yt) = (self._side(s) for s in ("train", "generated", "holdout"))
        log.info(
            "training utility classifiers on real (%d), synthetic (%d) and both; testing on %d "
            "held-out real images",
            len(yr),
            len(ys),
            len(yt),
        )
        res = utility_report(xr, yr, xs, ys, xt, yt)
        out: dict[str, Any] = {
            "real": res.real,
            "synthetic": res.synthetic,
            "real_plus_synthetic": res.real_plus_synthetic,
            "chance": res.chance,
            "n_real_train": res.n_real_train,
            "n_synthetic": res.n_synthetic,
            "n_test": res.n_test,
            "classes": self.classes,
        }
        if len(ys) < len(self.plan.gen_prompts):
            out["n_generated_unlabelled"] = len(self.plan.gen_prompts) - len(ys)
        return Section(out)


class ReportGrids:
    """Real and generated images of the first few prompts, for the report (not a metric)."""

    def __init__(self, plan: EvalPlan) -> None:
        self.plan = plan
        self.prompts = list(dict.fromkeys(plan.gen_prompts))[:GRID_PROMPTS]
        first = _first_per_group(plan.gen_prompts, GRID_IMAGES)
        self._wanted = {i for i in first if plan.gen_prompts[i] in self.prompts}
        self._gen: dict[int, np.ndarray] = {}
        self.features = FeatureStore(("generated", "train"))

    def update(self, chunk: Chunk) -> None:
        self.features.update(chunk)
        if chunk.side == "generated":
            self._gen.update(chunk.picked(self._wanted))

    def compute(self) -> list[PromptGrid]:
        plan, grids = self.plan, []
        f_gen, f_train = self.features.get("generated"), self.features.get("train")
        train_paths = plan.paths("train")
        for prompt in self.prompts:
            idx = [i for i, p in enumerate(plan.gen_prompts) if p == prompt]
            same = plan.frame[plan.frame["Text"] == prompt]
            same = pd.concat([same[same["split"] == "train"], same[same["split"] != "train"]])
            if len(same):
                rows = same.head(GRID_IMAGES)
                real = [load_square(p, plan.size) for p in rows["path"]]
                counts = rows["split"].value_counts()
                caption = (
                    "real images with this text ("
                    + ", ".join(f"{n} {s}" for s, n in counts.items())
                    + ")"
                )
            else:
                centre = f_gen[idx].mean(axis=0, keepdims=True)
                k = min(GRID_IMAGES, f_train.shape[0])
                nn = nearest_neighbours(centre, f_train, k=k)[1][0]
                real = [load_square(train_paths[j], plan.size) for j in nn]
                caption = "no real image has this text: nearest real training images (features)"
            gen = [self._gen[i] for i in idx[:GRID_IMAGES]]
            grids.append(PromptGrid(prompt, gen, real, caption))
        return grids
