"""Prompt-to-Polyp metrics (Chaichuk et al. 2025, Table 2) on any encoder's features.

The paper computes them on BiomedCLIP image embeddings; here any
:class:`eval.features.FeatureExtractor` output works, and the result names the features.

- **Fidelity** (higher better): per prompt ``1000 / (1 + FD_p)``, where ``FD_p`` is the
  Fréchet distance between the generated features of prompt ``p`` and the real reference
  features (that prompt's real images when given per prompt, else the whole real set).
  The paper's headline number is ``1000 / (1 + mean_p FD_p)`` ("inverse FID of the mean
  FID"): reported as ``fidelity``; the mean of the per-prompt fidelities as ``fidelity_mean``.
- **Agreement** (higher better): for each group of paraphrased prompts, the mean cosine
  similarity between images of *different* prompts of the group (all cross pairs, every
  pair of prompts weighted equally); the overall value is the mean over groups.
- **Diversity** (higher better): per prompt, the mean pairwise distance between the
  generated images of that prompt; default distance is the Euclidean distance between
  L2-normalised features (``sqrt(2 - 2 cos)``, in [0, 2]).
- **FBD** (lower better): the Fréchet distance between ALL generated and ALL real features.

Every prompt is scored; a prompt that cannot be (fewer than 2 images) is an error that
names it, never silently dropped. Ambiguities in the paper are noted in docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from eval.distances import ArrayLike, as_feature_matrix, frechet_distance
from eval.features import NOT_COMPARABLE_NOTE

DiversityDistance = Literal["l2_normalized", "l2", "cosine"]


def group_by_prompt(features: ArrayLike, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Split a feature matrix (N, D) into ``{prompt: (n_p, D)}`` by a list of N prompts.

    Raises:
        ValueError: bad features, or not one prompt per row.
    """
    x = as_feature_matrix(features, "features", min_rows=1)
    if isinstance(prompts, str) or len(prompts) != x.shape[0]:
        got = "a string" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"prompts: expected one prompt per feature row ({x.shape[0]}), got {got}")
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        out.setdefault(str(p), []).append(i)
    return {p: x[idx] for p, idx in out.items()}


def fidelity(generated: ArrayLike, real: ArrayLike) -> float:
    """``1000 / (1 + FD(generated, real))`` for one prompt's features (each >= 2 rows)."""
    return 1000.0 / (1.0 + frechet_distance(generated, real))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_pairwise_distance(x: ArrayLike, distance: DiversityDistance = "l2_normalized") -> float:
    """Mean distance over all unordered pairs of rows of ``x`` (N >= 2).

    ``"l2_normalized"``: Euclidean between unit-norm rows; ``"l2"``: Euclidean on raw rows;
    ``"cosine"``: ``1 - cos``.

    Raises:
        ValueError: bad features or unknown distance.
    """
    x = as_feature_matrix(x, "features")
    if distance == "l2_normalized":
        x = _unit(x)
    elif distance == "cosine":
        sim = _unit(x) @ _unit(x).T
        i, j = np.triu_indices(len(x), k=1)
        return float((1.0 - sim[i, j]).mean())
    elif distance != "l2":
        raise ValueError(f"distance: expected 'l2_normalized', 'l2' or 'cosine', got {distance!r}")
    sq = (x**2).sum(axis=1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)
    i, j = np.triu_indices(len(x), k=1)
    return float(np.sqrt(d2[i, j]).mean())


def agreement(group: Mapping[str, ArrayLike]) -> float:
    """Mean cosine similarity between images of different prompts within one paraphrase group.

    For each unordered pair of prompts (p, q) of the group, the mean cosine over all image
    pairs (a in p, b in q); then the mean over prompt pairs.

    Raises:
        ValueError: fewer than 2 prompts in the group, or bad features.
    """
    if len(group) < 2:
        raise ValueError(f"agreement: expected a group of >= 2 prompts, got {list(group)}")
    unit = {p: _unit(as_feature_matrix(f, f"features of {p!r}", 1)) for p, f in group.items()}
    names = list(unit)
    dims = {v.shape[1] for v in unit.values()}
    if len(dims) > 1:
        raise ValueError(f"agreement: expected one feature dimension, got {sorted(dims)}")
    sims = [
        float((unit[names[i]] @ unit[names[j]].T).mean())
        for i in range(len(names))
        for j in range(i + 1, len(names))
    ]
    return float(np.mean(sims))


@dataclass
class PromptMetricsResult:
    """Per-prompt and overall Fidelity / Agreement / Diversity / FBD."""

    feature_name: str
    comparable: bool
    fd: dict[str, float]
    fidelity_per_prompt: dict[str, float]
    diversity_per_prompt: dict[str, float]
    agreement_per_group: dict[str, float]
    fidelity: float
    fidelity_mean: float
    diversity: float
    agreement: float
    fbd: float
    diversity_distance: str
    reference: str

    def lines(self) -> list[str]:
        """Summary lines; every line names the features and their comparability."""
        note = "" if self.comparable else f" [{NOT_COMPARABLE_NOTE}]"
        f = self.feature_name
        agree = (
            "n/a (no paraphrase groups)" if math.isnan(self.agreement) else f"{self.agreement:.4f}"
        )
        return [
            f"Fidelity 1000/(1+mean FD) {self.fidelity:.4f} "
            f"(mean per prompt {self.fidelity_mean:.4f}; {len(self.fd)} prompts, "
            f"reference: {self.reference}; {f}){note}",
            f"Agreement {agree} over {len(self.agreement_per_group)} paraphrase group(s) "
            f"({f}){note}",
            f"Diversity {self.diversity:.4f} (mean pairwise {self.diversity_distance} distance; "
            f"{f}){note}",
            f"FBD-style Fréchet distance {self.fbd:.4f} (all prompts; {f}){note}",
        ]


def prompt_metrics(
    generated: Mapping[str, ArrayLike],
    real: ArrayLike | Mapping[str, ArrayLike],
    paraphrase_groups: Mapping[str, Sequence[str]] | None = None,
    diversity_distance: DiversityDistance = "l2_normalized",
    feature_name: str = "unnamed features",
    comparable: bool = False,
) -> PromptMetricsResult:
    """Fidelity, Agreement, Diversity and FBD for every prompt.

    Args:
        generated: ``{prompt: (n_p, D)}`` generated-image features (n_p >= 2 for every prompt).
        real: real-image features, either one matrix (N, D) used as every prompt's reference,
            or ``{prompt: (m_p, D)}`` per prompt (must cover every generated prompt, m_p >= 2).
        paraphrase_groups: ``{group: [prompt, paraphrase, ...]}``; every listed prompt must be
            in ``generated``. ``None``: no Agreement (reported as nan).
        diversity_distance: see :func:`mean_pairwise_distance`.
        feature_name, comparable: the extractor's ``name`` / ``comparable`` (for the report).

    Raises:
        ValueError: a prompt with fewer than 2 generated (or real) rows, a prompt without a
            real reference, an unknown prompt in a paraphrase group, or mismatched dimensions.
    """
    if not generated:
        raise ValueError("generated: expected features for at least one prompt, got none")
    gen = {
        str(p): as_feature_matrix(f, f"generated features of {p!r}", 1)
        for p, f in generated.items()
    }
    few = [p for p, f in gen.items() if f.shape[0] < 2]
    if few:
        raise ValueError(
            f"generated: every prompt needs >= 2 images to be scored; too few for {few[:5]}"
            + (f" and {len(few) - 5} more" if len(few) > 5 else "")
        )
    if isinstance(real, Mapping):
        refs = {str(p): as_feature_matrix(f, f"real features of {p!r}", 1) for p, f in real.items()}
        missing = [p for p in gen if p not in refs]
        if missing:
            raise ValueError(f"real: no reference features for prompt(s) {missing[:5]}")
        thin = [p for p in gen if refs[p].shape[0] < 2]
        if thin:
            raise ValueError(f"real: prompt(s) {thin[:5]} have fewer than 2 real images")
        all_real = np.concatenate(list(refs.values()))
        reference = "real images of the same prompt"
    else:
        all_real = as_feature_matrix(real, "real features")
        refs = {}
        reference = f"all {all_real.shape[0]} real images"
    dims = {f.shape[1] for f in gen.values()} | {all_real.shape[1]}
    if len(dims) > 1:
        raise ValueError(f"expected one feature dimension for all features, got {sorted(dims)}")

    fd = {p: frechet_distance(f, refs.get(p, all_real)) for p, f in gen.items()}
    fid_p = {p: 1000.0 / (1.0 + d) for p, d in fd.items()}
    div_p = {p: mean_pairwise_distance(f, diversity_distance) for p, f in gen.items()}

    agree: dict[str, float] = {}
    for name, members in (paraphrase_groups or {}).items():
        members = [str(m) for m in members]
        unknown = [m for m in members if m not in gen]
        if unknown:
            raise ValueError(f"paraphrase group {name!r}: prompt(s) {unknown[:5]} not generated")
        agree[str(name)] = agreement({m: gen[m] for m in members})

    return PromptMetricsResult(
        feature_name=feature_name,
        comparable=comparable,
        fd=fd,
        fidelity_per_prompt=fid_p,
        diversity_per_prompt=div_p,
        agreement_per_group=agree,
        fidelity=1000.0 / (1.0 + float(np.mean(list(fd.values())))),
        fidelity_mean=float(np.mean(list(fid_p.values()))),
        diversity=float(np.mean(list(div_p.values()))),
        agreement=float(np.mean(list(agree.values()))) if agree else math.nan,
        fbd=frechet_distance(np.concatenate(list(gen.values())), all_real),
        diversity_distance=diversity_distance,
        reference=reference,
    )
