"""The metrics of ``medrl eval`` as objects that accumulate what they need, chunk by chunk.

:func:`eval.evaluate.evaluate` decodes the images of three sides (``generated``, the real
``train`` reference, the real ``holdout`` images) once, in chunks, with their features, and
hands every chunk to every metric (``update``); each keeps only its statistics (features,
small copies, per-image statistics, the few images it needs whole) and turns them into its
section of metrics.json in ``compute``: the torchmetrics shape, so no step holds every image.

This module: the plan every metric is built from, the chunk, and the feature-based metrics
(distribution distances, per-prompt metrics). Image-based ones: :mod:`eval.image_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from eval.distances import frechet_distance, kernel_inception_distance
from eval.features import InceptionFeatures
from eval.prompt_metrics import group_by_prompt, prompt_metrics
from eval.samples import PARAPHRASE_COLUMN

SIDES = ("generated", "train", "holdout")


@dataclass
class EvalPlan:
    """What is known before any image is decoded: the images of each side and their labels."""

    #: Side of every image (pixels) after the centre crop.
    size: int
    gen_paths: list[Path]
    gen_prompts: list[str]
    gen_ids: list[str]
    #: Generated paths as the samples table writes them (for the report).
    gen_shown: list[str]
    paraphrase_groups: dict[str, list[str]] | None
    #: The whole manifest, and its (subsetted) train and held-out rows.
    frame: pd.DataFrame
    train: pd.DataFrame
    hold: pd.DataFrame
    feature_name: str
    comparable: bool
    #: The feature extractor's comparability note, repeated in every feature-based section.
    note: str
    near_copy_ssim: float

    @property
    def train_texts(self) -> list[str]:
        return [str(t) for t in self.train["Text"]]

    def paths(self, side: str) -> list[Path]:
        """The image files of one side, in order."""
        if side == "generated":
            return self.gen_paths
        rows = self.train if side == "train" else self.hold
        return [Path(p) for p in rows["path"]]


@dataclass
class Chunk:
    """Consecutive images of one side (uint8, ``plan.size`` square) and their features."""

    side: str
    #: Index of the first image within its side.
    start: int
    images: list[np.ndarray]
    #: (len(images), D) float64.
    features: np.ndarray

    def picked(self, wanted: set[int] | dict[int, Any]) -> list[tuple[int, np.ndarray]]:
        """``(index within the side, image)`` of the chunk's images whose index is wanted."""
        return [
            (self.start + k, im) for k, im in enumerate(self.images) if self.start + k in wanted
        ]


@dataclass
class Section:
    """One metric's part of metrics.json, and the notes it adds to the report."""

    values: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class EvalMetric(Protocol):
    """A metric of ``medrl eval``: its key in metrics.json, ``update`` per chunk, ``compute``."""

    key: str

    def update(self, chunk: Chunk) -> None: ...

    def compute(self) -> Section: ...


class FeatureStore:
    """The features of the sides a metric uses, in order."""

    def __init__(self, sides: tuple[str, ...]) -> None:
        self._parts: dict[str, list[np.ndarray]] = {s: [] for s in sides}

    def update(self, chunk: Chunk) -> None:
        if chunk.side in self._parts:
            self._parts[chunk.side].append(chunk.features)

    def get(self, side: str) -> np.ndarray | None:
        """(N, D) features of ``side``; None when it had no images."""
        parts = self._parts[side]
        return np.concatenate(parts) if parts else None


class DistributionMetric:
    """Fréchet distance and KID of the generated features against the real train features."""

    key = "distribution"

    def __init__(self, plan: EvalPlan) -> None:
        self.plan = plan
        self.features = FeatureStore(("generated", "train"))

    def update(self, chunk: Chunk) -> None:
        self.features.update(chunk)

    def compute(self) -> Section:
        f_gen, f_train = self.features.get("generated"), self.features.get("train")
        kid = kernel_inception_distance(f_gen, f_train, subsets=100)
        return Section(
            {
                "label": "FID" if self.plan.feature_name == InceptionFeatures.name else "FD",
                "fd": frechet_distance(f_gen, f_train),
                "kid_mean": kid.mean,
                "kid_std": kid.std,
                "kid_subsets": kid.subsets,
                "kid_subset_size": kid.subset_size,
                "reference": "real train split",
                "note": self.plan.note,
            }
        )


class PromptMetric:
    """Per-prompt Fidelity, Diversity, FBD and Agreement (features), with each prompt's SSIM.

    ``diversity`` is the pixel-diversity metric of the same run (computed first): its
    per-prompt SSIM / MS-SSIM join each prompt's row.
    """

    key = "prompts"

    def __init__(self, plan: EvalPlan, diversity: Any) -> None:
        self.plan = plan
        self.diversity = diversity
        self.features = FeatureStore(("generated", "train"))

    def update(self, chunk: Chunk) -> None:
        self.features.update(chunk)

    def compute(self) -> Section:
        plan = self.plan
        gen_groups = group_by_prompt(self.features.get("generated"), plan.gen_prompts)
        scorable = {p: f for p, f in gen_groups.items() if f.shape[0] >= 2}
        unscored = [p for p, f in gen_groups.items() if f.shape[0] < 2]
        notes = []
        if unscored:
            notes.append(
                f"{len(unscored)} prompt(s) with a single generated image are not scored per prompt"
            )
        if not scorable:
            reason = "no prompt has 2 or more generated images"
            notes.append(f"per-prompt metrics skipped: {reason}")
            return Section({"skipped": reason, "note": plan.note}, notes)
        f_train = self.features.get("train")
        train_by_text = group_by_prompt(f_train, plan.train_texts)
        n_same = {
            p: int(train_by_text[p].shape[0]) if p in train_by_text else 0 for p in gen_groups
        }
        per_prompt_ref = all(n_same[p] >= 2 for p in scorable)
        reference = {p: train_by_text[p] for p in scorable} if per_prompt_ref else f_train
        groups, agreement_note = self._paraphrase_groups(scorable)
        pm = prompt_metrics(
            scorable,
            reference,
            paraphrase_groups=groups or None,
            feature_name=plan.feature_name,
            comparable=plan.comparable,
        )
        values = {
            "reference": pm.reference,
            "fidelity": pm.fidelity,
            "fidelity_mean": pm.fidelity_mean,
            "diversity": pm.diversity,
            "diversity_distance": pm.diversity_distance,
            "fbd": pm.fbd,
            "agreement": pm.agreement,
            "agreement_per_group": pm.agreement_per_group,
            "agreement_note": agreement_note,
            "per_prompt": [self._row(p, g, n_same[p], pm) for p, g in gen_groups.items()],
            "unscored_prompts": unscored,
            "note": plan.note,
        }
        if agreement_note:
            notes.append(f"Agreement {agreement_note}")
        return Section(values, notes)

    def _paraphrase_groups(self, scorable: dict[str, np.ndarray]) -> tuple[dict, str]:
        """The paraphrase groups with 2 or more scored prompts, or why Agreement does not apply."""
        if self.plan.paraphrase_groups is None:
            return {}, (
                f"not applicable: no paraphrase groups (the samples table has no "
                f"{PARAPHRASE_COLUMN!r} column)"
            )
        groups = {
            g: [p for p in members if p in scorable]
            for g, members in self.plan.paraphrase_groups.items()
        }
        groups = {g: m for g, m in groups.items() if len(m) >= 2}
        if not groups:
            return {}, "not applicable: no paraphrase group has 2 or more scored prompts"
        return groups, ""

    def _row(self, prompt: str, feats: np.ndarray, n_same: int, pm: Any) -> dict[str, Any]:
        """One prompt's line: counts, feature metrics and the SSIM diversity of both sides."""
        div = self.diversity.result
        gd = div["generated"].per_prompt.get(prompt)
        rd = div["real"].per_prompt.get(prompt) if self.diversity.real_groups is not None else None
        return {
            "prompt": prompt,
            "n_generated": int(feats.shape[0]),
            "n_real_same_text": n_same,
            "fd": pm.fd.get(prompt),
            "fidelity": pm.fidelity_per_prompt.get(prompt),
            "diversity": pm.diversity_per_prompt.get(prompt),
            "ssim_generated": gd.ssim if gd else None,
            "ms_ssim_generated": gd.ms_ssim if gd else None,
            "ssim_real": rd.ssim if rd else None,
            "ms_ssim_real": rd.ms_ssim if rd else None,
        }
