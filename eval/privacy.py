"""Privacy: does the generator reproduce its training images? (nearest-neighbour analysis)

For every generated image we find its nearest training image and compare that distance with
the same distance for held-out real images (distance to closest record, DCR): a generator
that generalises produces images about as far from the training set as unseen real images
are; a memorising one produces some much closer.

Two views:

- **Feature DCR**: L2 (or cosine distance) between feature vectors (any extractor).
- **SSIM**: on small copies (``ssim_size`` px, RGB), the highest SSIM between a generated
  image and a training image. Comparing every pair is quadratic, so SSIM is computed against
  candidates only: the ``candidates`` nearest training images in feature space plus the
  ``candidates`` nearest in pixel space (L2 on the small copies).

**Near-copy rule** (a generated image is flagged when either holds):

1. its highest SSIM to a training image exceeds ``ssim_threshold`` (default 0.95); or
2. its feature DCR is below the ``percentile``-th percentile (default 1st) of the held-out
   images' DCR — i.e. closer to a training image than 99 % of unseen real images are.
   By construction about ``percentile`` % of perfectly novel images also pass this rule
   (flags are candidates for review); the summary therefore also reports the fraction of
   generated images below the threshold next to that expected rate — a fraction well above
   it is the distribution-level sign of memorisation.

Rule 2 needs held-out features and rule 1 needs images; each is skipped (and the result says
so) when its inputs are missing. Flagged pairs carry indices, so a report can show the
generated image next to its training neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from eval.distances import ArrayLike, as_feature_matrix
from eval.image_batch import ImageBatch, num_images, resized_float_batch

Metric = Literal["l2", "cosine"]
#: Side (px) of the small copies SSIM compares.
SSIM_SIZE = 64


def nearest_neighbours(
    query: ArrayLike, reference: ArrayLike, metric: Metric = "l2", k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices (Q, k) of each query row's ``k`` nearest reference rows.

    ``metric``: ``"l2"`` Euclidean, ``"cosine"`` ``1 - cos``. Computed in chunks of 512 rows.

    Raises:
        ValueError: bad matrices, different dimensions, unknown metric, k out of range.
    """
    q = as_feature_matrix(query, "query features", min_rows=1)
    r = as_feature_matrix(reference, "reference features", min_rows=1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"expected the same feature dimension, got query {q.shape[1]}, reference {r.shape[1]}"
        )
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")
    if not 1 <= k <= r.shape[0]:
        raise ValueError(f"k: expected 1 <= k <= {r.shape[0]} (reference rows), got {k}")
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    rt = torch.from_numpy(r)
    r_sq = (rt**2).sum(1)
    dists, idxs = [], []
    for s in range(0, q.shape[0], 512):
        qt = torch.from_numpy(q[s : s + 512])
        if metric == "cosine":
            d = 1.0 - qt @ rt.T
        else:
            d = ((qt**2).sum(1, keepdim=True) + r_sq[None] - 2.0 * qt @ rt.T).clamp_min(0).sqrt()
        v, i = torch.topk(d, k, dim=1, largest=False)
        dists.append(v.numpy())
        idxs.append(i.numpy())
    return np.concatenate(dists), np.concatenate(idxs)


@dataclass(frozen=True)
class NearCopy:
    """A generated image flagged as a possible copy of a training image.

    ``train_index`` is the most SSIM-similar training image when the SSIM rule fired, else the
    nearest in feature space; ``feature_distance`` is the feature DCR; ``ssim`` is nan when no
    images were given.
    """

    generated_index: int
    train_index: int
    feature_distance: float
    ssim: float
    reasons: tuple[str, ...]


@dataclass
class PrivacyResult:
    """Nearest-neighbour distances, the thresholds used and the flagged pairs."""

    metric: str
    feature_name: str
    generated_dcr: np.ndarray
    generated_nn: np.ndarray
    holdout_dcr: np.ndarray | None
    feature_threshold: float | None
    percentile: float
    generated_ssim_max: np.ndarray | None
    generated_ssim_nn: np.ndarray | None
    holdout_ssim_max: np.ndarray | None
    ssim_threshold: float
    near_copies: list[NearCopy] = field(default_factory=list)
    skipped_rules: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Scalar summaries (medians, fraction flagged) for the report."""
        out = {
            "generated_dcr_median": float(np.median(self.generated_dcr)),
            "n_generated": float(len(self.generated_dcr)),
            "n_near_copies": float(len(self.near_copies)),
            "fraction_near_copies": len(self.near_copies) / len(self.generated_dcr),
        }
        if self.holdout_dcr is not None and self.feature_threshold is not None:
            out["holdout_dcr_median"] = float(np.median(self.holdout_dcr))
            # For a generator whose images are as novel as held-out real ones, about
            # percentile % fall below the threshold by construction; far more means copying.
            out["fraction_below_threshold"] = float(
                np.mean(self.generated_dcr < self.feature_threshold)
            )
            out["expected_fraction_if_novel"] = self.percentile / 100.0
            out["dcr_median_ratio"] = out["generated_dcr_median"] / max(
                out["holdout_dcr_median"], 1e-12
            )
        if self.generated_ssim_max is not None:
            out["generated_ssim_max_median"] = float(np.median(self.generated_ssim_max))
        if self.holdout_ssim_max is not None:
            out["holdout_ssim_max_median"] = float(np.median(self.holdout_ssim_max))
        return out

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        s = self.summary()
        out = [
            f"nearest training image ({self.metric} on {self.feature_name}): median distance "
            f"generated {s['generated_dcr_median']:.4g}"
            + (
                f", held-out real {s['holdout_dcr_median']:.4g} (ratio {s['dcr_median_ratio']:.3f})"
                if "holdout_dcr_median" in s
                else ""
            ),
            f"near copies: {len(self.near_copies)} of {int(s['n_generated'])} generated images "
            f"(SSIM > {self.ssim_threshold}"
            + (
                f" or distance < {self.feature_threshold:.4g}, the {self.percentile:g}th "
                "percentile of held-out distances)"
                if self.feature_threshold is not None
                else ")"
            ),
        ]
        if "fraction_below_threshold" in s:
            out.append(
                f"{100 * s['fraction_below_threshold']:.1f} % of generated images are closer to a "
                f"training image than the {self.percentile:g}th percentile of held-out images "
                f"(about {self.percentile:g} % expected if they are as novel as unseen real images)"
            )
        out += [f"rule skipped: {r}" for r in self.skipped_rules]
        return out


def _ssim_candidates(
    gen_small: torch.Tensor,
    train_small: torch.Tensor,
    feature_nn: np.ndarray,
    candidates: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Highest SSIM (and its training index) over feature- and pixel-space candidates."""
    k = min(candidates, train_small.shape[0])
    _, pixel_nn = nearest_neighbours(
        gen_small.flatten(1).double().numpy(), train_small.flatten(1).double().numpy(), "l2", k
    )
    best = np.full(gen_small.shape[0], -np.inf)
    best_idx = np.zeros(gen_small.shape[0], dtype=np.int64)
    for i in range(gen_small.shape[0]):
        cand = np.unique(np.concatenate([feature_nn[i], pixel_nn[i]]))
        a = gen_small[i : i + 1].expand(len(cand), -1, -1, -1)
        v = structural_similarity_index_measure(
            a, train_small[cand], data_range=1.0, reduction="none"
        ).reshape(-1)
        j = int(torch.argmax(v))
        best[i], best_idx[i] = float(v[j]), int(cand[j])
    return best, best_idx


def _check_settings(
    percentile: float, ssim_threshold: float, ssim_size: int, candidates: int
) -> None:
    """Raise a ValueError for a threshold, SSIM size or candidate count out of range."""
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile: expected a value in (0, 100), got {percentile}")
    if not -1.0 <= ssim_threshold <= 1.0:
        raise ValueError(f"ssim_threshold: expected a value in [-1, 1], got {ssim_threshold}")
    if ssim_size < 11:
        raise ValueError(f"ssim_size: expected >= 11 px (the SSIM window), got {ssim_size}")
    if candidates < 1:
        raise ValueError(f"candidates: expected >= 1, got {candidates}")


def _check_one_image_per_row(images: ImageBatch, what: str, rows: int) -> None:
    """Raise a ValueError unless ``images`` holds one image per feature row."""
    if num_images(images, what) != rows:
        raise ValueError(
            f"{what}: expected one image per feature row ({rows}), got {num_images(images, what)}"
        )


def _holdout_threshold(
    holdout_features: ArrayLike | None, train: np.ndarray, metric: Metric, percentile: float
) -> tuple[np.ndarray | None, float | None]:
    """Each held-out image's distance to its nearest training image, and rule 2's threshold
    (their ``percentile``-th percentile); both None without held-out features."""
    if holdout_features is None:
        return None, None
    hold = as_feature_matrix(holdout_features, "holdout features", 1)
    hold_dcr = nearest_neighbours(hold, train, metric)[0][:, 0]
    return hold_dcr, float(np.percentile(hold_dcr, percentile))


def _ssim_view(
    generated_images: ImageBatch | None,
    train_images: ImageBatch | None,
    holdout_images: ImageBatch | None,
    holdout_features: ArrayLike | None,
    gen: np.ndarray,
    train: np.ndarray,
    gen_nn: np.ndarray,
    hold_dcr: np.ndarray | None,
    metric: Metric,
    ssim_size: int,
    candidates: int,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Each generated image's highest SSIM to a training image and that image's index, and
    each held-out image's highest SSIM; None for what the images given do not allow."""
    if (generated_images is None) != (train_images is None):
        raise ValueError("generated_images and train_images: give both or neither")
    if generated_images is None or train_images is None:
        return None, None, None
    _check_one_image_per_row(generated_images, "generated_images", gen.shape[0])
    _check_one_image_per_row(train_images, "train_images", train.shape[0])
    gen_small = resized_float_batch(generated_images, ssim_size, "generated_images")
    train_small = resized_float_batch(train_images, ssim_size, "train_images")
    gen_small, train_small = gen_small.add(1).div(2), train_small.add(1).div(2)
    ssim_max, ssim_nn = _ssim_candidates(gen_small, train_small, gen_nn, candidates)
    if holdout_images is None or holdout_features is None or hold_dcr is None:
        return ssim_max, ssim_nn, None
    _check_one_image_per_row(holdout_images, "holdout_images", hold_dcr.shape[0])
    hold_small = resized_float_batch(holdout_images, ssim_size, "holdout_images")
    hold_nn = nearest_neighbours(
        holdout_features, train, metric, k=min(candidates, train.shape[0])
    )[1]
    hold_ssim = _ssim_candidates(hold_small.add(1).div(2), train_small, hold_nn, candidates)[0]
    return ssim_max, ssim_nn, hold_ssim


def _near_copies(
    gen_dcr: np.ndarray,
    gen_nn: np.ndarray,
    ssim_max: np.ndarray | None,
    ssim_nn: np.ndarray | None,
    ssim_threshold: float,
    threshold: float | None,
) -> list[NearCopy]:
    """The generated images that either near-copy rule flags, with the reasons."""
    near: list[NearCopy] = []
    for i in range(gen_dcr.shape[0]):
        reasons = []
        s = math.nan if ssim_max is None else float(ssim_max[i])
        by_ssim = ssim_max is not None and s > ssim_threshold
        if by_ssim:
            reasons.append(f"SSIM {s:.3f} > {ssim_threshold}")
        if threshold is not None and gen_dcr[i, 0] < threshold:
            reasons.append(f"feature distance {gen_dcr[i, 0]:.4g} < {threshold:.4g}")
        if reasons:
            j = int(ssim_nn[i]) if by_ssim and ssim_nn is not None else int(gen_nn[i, 0])
            near.append(NearCopy(i, j, float(gen_dcr[i, 0]), s, tuple(reasons)))
    return near


def privacy_report(
    generated_features: ArrayLike,
    train_features: ArrayLike,
    holdout_features: ArrayLike | None = None,
    generated_images: ImageBatch | None = None,
    train_images: ImageBatch | None = None,
    holdout_images: ImageBatch | None = None,
    metric: Metric = "l2",
    percentile: float = 1.0,
    ssim_threshold: float = 0.95,
    ssim_size: int = SSIM_SIZE,
    candidates: int = 5,
    feature_name: str = "unnamed features",
) -> PrivacyResult:
    """Nearest-training-image analysis of generated images, against held-out real images.

    Args:
        generated_features, train_features, holdout_features: (N, D) features of the
            generated, training and held-out real images (same extractor).
        generated_images, train_images, holdout_images: the images, in the same order as
            their features, for the SSIM view (optional).
        metric: feature distance, ``"l2"`` or ``"cosine"``.
        percentile: rule 2 threshold, percentile of held-out DCR (in (0, 100)).
        ssim_threshold: rule 1 threshold.
        ssim_size: side of the small copies SSIM compares (>= 11).
        candidates: training candidates per generated image for SSIM, from each space.
        feature_name: the extractor's name, for the report.

    Raises:
        ValueError: mismatched counts or dimensions, images given for only one side,
            thresholds out of range.
    """
    gen = as_feature_matrix(generated_features, "generated features", 1)
    train = as_feature_matrix(train_features, "train features", 1)
    _check_settings(percentile, ssim_threshold, ssim_size, candidates)

    gen_dcr, gen_nn = nearest_neighbours(gen, train, metric, k=min(candidates, train.shape[0]))
    hold_dcr, threshold = _holdout_threshold(holdout_features, train, metric, percentile)
    skipped: list[str] = []
    if threshold is None:
        skipped.append("feature distance (no held-out features to set the threshold)")
    ssim_max, ssim_nn, hold_ssim = _ssim_view(
        generated_images, train_images, holdout_images, holdout_features, gen, train, gen_nn,
        hold_dcr, metric, ssim_size, candidates,
    )  # fmt: skip
    if ssim_max is None:
        skipped.append("SSIM (no images given)")

    return PrivacyResult(
        metric=metric,
        feature_name=feature_name,
        generated_dcr=gen_dcr[:, 0],
        generated_nn=gen_nn[:, 0],
        holdout_dcr=hold_dcr,
        feature_threshold=threshold,
        percentile=percentile,
        generated_ssim_max=ssim_max,
        generated_ssim_nn=ssim_nn,
        holdout_ssim_max=hold_ssim,
        ssim_threshold=ssim_threshold,
        near_copies=_near_copies(gen_dcr, gen_nn, ssim_max, ssim_nn, ssim_threshold, threshold),
        skipped_rules=skipped,
    )
