"""Distances between two sets of features: Fréchet distance, KID, and the Inception Score.

Everything here takes FEATURES, never images (as MONAI's ``FIDMetric``): FID is
``frechet_distance`` on InceptionV3 pool features, FBD the same function on BiomedCLIP
features, and so on; the feature extractor lives in ``eval.features``.

All arithmetic is float64 (numpy). Inputs may be numpy arrays or torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_feature_matrix(x: ArrayLike, what: str = "features", min_rows: int = 2) -> np.ndarray:
    """Validate a feature matrix and return it as float64 numpy (N, D).

    Raises:
        ValueError: not 2-D, fewer than ``min_rows`` rows, no columns, or not finite.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    elif not isinstance(x, np.ndarray):
        raise ValueError(f"{what}: expected a 2-D array or tensor (N, D), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D feature matrix (N, D), got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{what}: expected at least {min_rows} rows (samples), got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{what}: expected at least one feature column, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what}: expected numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{what}: expected finite values, got NaN/inf in {bad} row(s)")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]}: expected the same feature dimension, "
            f"got {a.shape[1]} and {b.shape[1]}"
        )


def feature_statistics(x: ArrayLike, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of a feature matrix (N >= 2 rows)."""
    x = as_feature_matrix(x, what)
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    r"""``Tr((Σ1 Σ2)^{1/2})`` for symmetric PSD ``Σ1``, ``Σ2``, computed stably.

    ``Σ1 Σ2`` is similar to the symmetric PSD matrix ``M = Σ1^{1/2} Σ2 Σ1^{1/2}``, so its
    eigenvalues are those of ``M``: the trace of the square root is ``Σ_i sqrt(λ_i(M))``. Both
    eigen-decompositions are symmetric (``eigh``), so no complex parts or ``sqrtm`` failures
    appear for singular covariances (fewer samples than feature dimensions).
    """
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance_from_statistics(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    r"""Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`` — the squared
    2-Wasserstein distance, which is what "FID" reports (NOT its square root).

    Raises:
        ValueError: shapes do not match, or values are not finite.
    """
    arrays = []
    for name, v in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        v = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        v = v.astype(np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"{name}: expected finite values")
        arrays.append(v)
    m1, s1, m2, s2 = arrays
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.ndim != 1 or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            "expected mu (D,) and sigma (D, D) for both sets, got "
            f"mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}"
        )
    mean_term = float(np.sum((m1 - m2) ** 2))
    trace_term = float(np.trace(s1) + np.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2)
    # Rounding can leave a tiny negative value for identical distributions.
    return max(mean_term + trace_term, 0.0)


def frechet_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    FID when the features are InceptionV3 pool features, FBD for BiomedCLIP features.
    Returns the distance itself (squared-Wasserstein units of the features), not its root.
    Means and unbiased covariances (ddof = 1), as torchmetrics and pytorch-fid.

    With fewer samples than dimensions the covariances are low-rank, and the trace term is
    computed exactly from the centred samples instead of (D, D) matrices: with
    ``Σ_a = A^T A / (N_a - 1)`` and ``Σ_b = B^T B / (N_b - 1)``, the non-zero eigenvalues of
    ``Σ_a Σ_b`` are those of ``C C^T / ((N_a - 1)(N_b - 1))`` with ``C = A B^T``, so
    ``Tr((Σ_a Σ_b)^{1/2})`` is the sum of the singular values of ``C`` over
    ``sqrt((N_a - 1)(N_b - 1))`` (fast for 2048-d features of a few hundred images).

    Raises:
        ValueError: not 2-D, fewer than 2 rows, different feature dimensions, or not finite.
    """
    a = as_feature_matrix(a, "features a")
    b = as_feature_matrix(b, "features b")
    _same_dim(a, b, ("features a", "features b"))
    d = a.shape[1]
    if min(a.shape[0], b.shape[0]) > d:
        mu1, s1 = feature_statistics(a)
        mu2, s2 = feature_statistics(b)
        return frechet_distance_from_statistics(mu1, s1, mu2, s2)
    na, nb = a.shape[0], b.shape[0]
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    tr_a = float(np.sum(ca**2)) / (na - 1)
    tr_b = float(np.sum(cb**2)) / (nb - 1)
    nuclear = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    trace_sqrt = nuclear / np.sqrt((na - 1) * (nb - 1))
    return max(mean_term + tr_a + tr_b - 2.0 * trace_sqrt, 0.0)


@dataclass(frozen=True)
class KIDResult:
    """Kernel Inception Distance over random subsets: mean and standard deviation."""

    mean: float
    std: float
    subsets: int
    subset_size: int


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float):
    return (x @ y.T * gamma + coef0) ** degree


def polynomial_mmd(
    a: np.ndarray, b: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> float:
    r"""Unbiased MMD^2 with the kernel ``k(x, y) = (gamma x.y + coef0)^degree`` (gamma = 1/D).

    ``MMD^2 = [Σ_{i≠j} k(a_i,a_j)]/(m(m-1)) + [Σ_{i≠j} k(b_i,b_j)]/(n(n-1))
    - 2 Σ_{i,j} k(a_i,b_j)/(m n)``.
    """
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    m, n = a.shape[0], b.shape[0]
    k_aa = _poly_kernel(a, a, degree, gamma, coef0)
    k_bb = _poly_kernel(b, b, degree, gamma, coef0)
    k_ab = _poly_kernel(a, b, degree, gamma, coef0)
    term_aa = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    term_bb = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(term_aa + term_bb - 2.0 * k_ab.sum() / (m * n))


def kernel_inception_distance(
    a: ArrayLike,
    b: ArrayLike,
    subsets: int = 100,
    subset_size: int | None = None,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> KIDResult:
    """Kernel Inception Distance (Binkowski et al. 2018) between two feature sets.

    For each of ``subsets`` rounds, ``subset_size`` rows are drawn without replacement from
    each set and the unbiased polynomial-kernel MMD^2 is computed; the mean and standard
    deviation over rounds are returned (the standard KID, as in torchmetrics / clean-fid).

    Args:
        a, b: feature matrices (N_a, D) and (N_b, D).
        subsets: number of random subsets.
        subset_size: rows per subset; default ``min(1000, N_a, N_b)``.
        degree, gamma, coef0: kernel ``(gamma x.y + coef0)^degree``; gamma defaults to 1/D.
        seed: seed of the subset sampler (results are deterministic for a seed).

    Raises:
        ValueError: bad feature matrices, ``subset_size`` larger than a set or below 2,
            ``subsets`` or ``degree`` below 1.
    """
    a = as_feature_matrix(a, "features a")
    b = as_feature_matrix(b, "features b")
    _same_dim(a, b, ("features a", "features b"))
    if subsets < 1:
        raise ValueError(f"subsets: expected >= 1, got {subsets}")
    if degree < 1:
        raise ValueError(f"degree: expected >= 1, got {degree}")
    size = min(1000, a.shape[0], b.shape[0]) if subset_size is None else subset_size
    if size < 2 or size > min(a.shape[0], b.shape[0]):
        raise ValueError(
            f"subset_size: expected 2 <= subset_size <= min(N_a, N_b) = "
            f"{min(a.shape[0], b.shape[0])}, got {size}"
        )
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for k in range(subsets):
        ia = rng.choice(a.shape[0], size, replace=False)
        ib = rng.choice(b.shape[0], size, replace=False)
        values[k] = polynomial_mmd(a[ia], b[ib], degree, gamma, coef0)
    std = float(values.std(ddof=1)) if subsets > 1 else 0.0
    return KIDResult(mean=float(values.mean()), std=std, subsets=subsets, subset_size=size)


@dataclass(frozen=True)
class InceptionScoreResult:
    """Inception Score over splits: mean and standard deviation."""

    mean: float
    std: float
    splits: int


def inception_score(
    logits_or_probs: ArrayLike, splits: int = 10, from_logits: bool | None = None
) -> InceptionScoreResult:
    r"""Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from a classifier's outputs.

    The rows are cut, in order, into ``splits`` contiguous chunks; each chunk's score uses its
    own marginal ``p(y)``; mean and sample std over chunks are returned. Shuffle the rows
    first if their order is meaningful. Only meaningful with the classifier the published
    numbers used (Inception on ImageNet); with a medical classifier it is a within-study number.

    Args:
        logits_or_probs: (N, C) logits or class probabilities.
        splits: number of chunks (N >= splits).
        from_logits: ``True`` logits, ``False`` probabilities, ``None`` decide: rows that are
            non-negative and sum to 1 (within 1e-4) are probabilities, anything else logits.

    Raises:
        ValueError: not 2-D, fewer than 2 classes, N < splits, not finite, or probabilities
            that are negative or do not sum to 1.
    """
    x = as_feature_matrix(logits_or_probs, "logits_or_probs", min_rows=1)
    if x.shape[1] < 2:
        raise ValueError(f"logits_or_probs: expected at least 2 classes, got shape {x.shape}")
    if splits < 1 or x.shape[0] < splits:
        raise ValueError(f"splits: expected 1 <= splits <= N = {x.shape[0]}, got {splits}")
    looks_like_probs = bool((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
    if from_logits is None:
        from_logits = not looks_like_probs
    if from_logits:
        x = x - x.max(axis=1, keepdims=True)
        log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    else:
        if not looks_like_probs:
            raise ValueError(
                "logits_or_probs: from_logits=False but rows are not probabilities "
                f"(min {x.min():.3g}, row sums in [{x.sum(1).min():.4g}, {x.sum(1).max():.4g}])"
            )
        log_p = np.log(np.clip(x, 1e-30, None))
    p = np.exp(log_p)
    scores = []
    for idx in np.array_split(np.arange(x.shape[0]), splits):
        log_py = np.log(np.clip(p[idx].mean(axis=0), 1e-30, None))
        kl = (p[idx] * (log_p[idx] - log_py)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    std = float(np.std(scores, ddof=1)) if splits > 1 else 0.0
    return InceptionScoreResult(mean=float(np.mean(scores)), std=std, splits=splits)
