"""Fundus image statistics (the IIT Kanpur report's Table 1), with written definitions.

The report lists SNR, contrast, sharpness, vessel visibility and illumination uniformity for
real and generated fundus photographs but does not define them; medrl defines them as below
(also in docs/metrics.md). Our numbers are therefore NOT comparable with that table's values;
compare generated against real images measured here, at the same resolution (the ratio
generated / real is the number to read).

Notation, per image resized so its shorter side is ``size`` px (when a size is given):
``Y = 0.299 R + 0.587 G + 0.114 B`` luminance and ``G`` the green channel, both in [0, 1].

- **FOV mask** ``M``: pixels with ``Y > fov_threshold`` (default 0.06, about 15/255), holes
  filled, opened with a disc of radius ``side/100``, largest connected component kept. If it
  covers under 5 % of the image (a dark or non-fundus image), the whole image is used.
  ``fov_fraction`` = |M| / (H W) is reported too.
- **Inner FOV** ``I``: ``M`` eroded by ``max(2, 0.02 side)`` px, so the FOV rim (a step from
  the black surround) does not count as texture. All statistics are means over ``I``. Before
  any filtering, pixels outside ``M`` are set to the FOV mean (no artificial rim edge).
- **SNR**: ``S = N_σ(Y)`` the FOV-normalised Gaussian smoothing (``σ = max(1, side/256)`` px;
  ``N_σ(Y) = G_σ*(Y M) / G_σ*M``), residual ``R = Y - S``; ``SNR = mean_I(S) / std_I(R)``.
  Unitless, higher = less fine-scale fluctuation relative to brightness (fine vessels count as
  fluctuation too).
- **Contrast**: robust Michelson contrast ``(p99 - p1) / (p99 + p1)`` of ``Y`` over ``I``
  (1st and 99th percentiles). Unitless, in [0, 1].
- **Sharpness**: variance over ``I`` of the 4-neighbour Laplacian of ``Y``. Units
  (intensity / px^2)^2 with intensity in [0, 1]; depends on resolution.
- **Vessel visibility**: mean over ``I`` of the Frangi vesselness of ``G``
  (``skimage.filters.frangi``, dark ridges, sigmas 1-4 px, alpha = beta = 0.5 and a FIXED
  ``gamma = 0.05``; skimage's default gamma rescales per image, which would make a blurred,
  vessel-free image score almost like a sharp one). Unitless, in [0, 1].
- **Illumination uniformity**: ``B = N_σ(Y)`` with a heavy blur ``σ = side/16``;
  ``1 - std_I(B) / mean_I(B)`` (one minus the coefficient of variation). 1 = perfectly even
  illumination; lower = vignetting or uneven lighting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import frangi

from eval.image_batch import ImageBatch, as_uint8_list

#: The statistics, in report order.
STAT_NAMES = (
    "snr",
    "contrast",
    "sharpness",
    "vessel_visibility",
    "illumination_uniformity",
    "fov_fraction",
)
VESSEL_SIGMAS = (1.0, 2.0, 3.0, 4.0)
FRANGI_GAMMA = 0.05
_LUMA = np.array([0.299, 0.587, 0.114])


def _disc(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r**2


def fov_mask(image: np.ndarray, threshold: float = 0.06) -> np.ndarray:
    """Boolean field-of-view mask of a uint8 (H, W, 3) fundus image (see module docstring).

    Raises:
        ValueError: not a uint8 (H, W, 3) array, or threshold outside [0, 1).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {getattr(image, 'shape', image)}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold: expected a luminance in [0, 1), got {threshold}")
    y = image.astype(np.float64) / 255.0 @ _LUMA
    mask = ndimage.binary_fill_holes(y > threshold)
    side = min(image.shape[:2])
    mask = ndimage.binary_opening(mask, structure=_disc(side // 100))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    if mask.mean() < 0.05:
        return np.ones(image.shape[:2], dtype=bool)
    return mask


def _normalised_blur(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    m = mask.astype(np.float64)
    num = ndimage.gaussian_filter(x * m, sigma, mode="reflect")
    den = ndimage.gaussian_filter(m, sigma, mode="reflect")
    return num / np.maximum(den, 1e-8)


def image_statistics(
    image: np.ndarray,
    fov_threshold: float = 0.06,
    vessel_sigmas: Sequence[float] = VESSEL_SIGMAS,
) -> dict[str, float]:
    """All fundus statistics of one uint8 (H, W, 3) image (definitions in the module docstring).

    Raises:
        ValueError: not a uint8 (H, W, 3) array, or smaller than 16 px per side.
    """
    mask = fov_mask(image, fov_threshold)
    h, w = image.shape[:2]
    side = min(h, w)
    if side < 16:
        raise ValueError(f"image: expected at least 16 px per side, got {h}x{w}")
    rgb = image.astype(np.float64) / 255.0
    y = rgb @ _LUMA
    g = rgb[..., 1]
    inner = ndimage.binary_erosion(mask, structure=_disc(max(2, round(0.02 * side))))
    if inner.sum() < 16:
        inner = mask
    y_fill = np.where(mask, y, y[mask].mean())
    g_fill = np.where(mask, g, g[mask].mean())

    smooth = _normalised_blur(y, mask, max(1.0, side / 256))
    noise = (y - smooth)[inner].std()
    signal = smooth[inner].mean()
    snr = signal / noise if noise > 0 else math.inf

    p1, p99 = np.percentile(y[inner], [1, 99])
    contrast = (p99 - p1) / (p99 + p1) if p99 + p1 > 0 else 0.0

    sharpness = ndimage.laplace(y_fill, mode="reflect")[inner].var()

    vessel = frangi(g_fill, sigmas=tuple(vessel_sigmas), black_ridges=True, gamma=FRANGI_GAMMA)
    vessel_visibility = vessel[inner].mean()

    illum = _normalised_blur(y, mask, side / 16)[inner]
    uniformity = 1.0 - illum.std() / illum.mean() if illum.mean() > 0 else 0.0

    return {
        "snr": float(snr),
        "contrast": float(contrast),
        "sharpness": float(sharpness),
        "vessel_visibility": float(vessel_visibility),
        "illumination_uniformity": float(uniformity),
        "fov_fraction": float(mask.mean()),
    }


def _resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    f = size / min(h, w)
    new = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(image).resize(new, Image.BICUBIC))


@dataclass
class FundusStats:
    """Per-image fundus statistics of one image set (arrays of length N per statistic)."""

    values: dict[str, np.ndarray]
    size: int | None

    @property
    def n(self) -> int:
        return len(next(iter(self.values.values())))

    def mean(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.values.items()}

    def std(self) -> dict[str, float]:
        return {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in self.values.items()}


def fundus_statistics(
    images: ImageBatch,
    size: int | None = None,
    fov_threshold: float = 0.06,
    vessel_sigmas: Sequence[float] = VESSEL_SIGMAS,
) -> FundusStats:
    """The fundus statistics of every image.

    Args:
        images: uint8 arrays or float tensors in [-1, 1] (sizes may differ).
        size: resize each image so its shorter side is ``size`` px first (bicubic). Sharpness
            and vessel visibility depend on resolution: compare sets at one size.
        fov_threshold: luminance threshold of the FOV mask.
        vessel_sigmas: Frangi scales in px.

    Raises:
        ValueError: bad images, or ``size`` below 16.
    """
    if size is not None and size < 16:
        raise ValueError(f"size: expected >= 16 px, got {size}")
    arrays = as_uint8_list(images, "images")
    rows = []
    for img in arrays:
        img = _resize_short_side(img, size) if size else img
        rows.append(image_statistics(img, fov_threshold, vessel_sigmas))
    values = {k: np.array([r[k] for r in rows]) for k in STAT_NAMES}
    return FundusStats(values=values, size=size)


@dataclass(frozen=True)
class StatRow:
    """One line of the real-vs-generated table."""

    stat: str
    real_mean: float
    real_std: float
    generated_mean: float
    generated_std: float

    @property
    def ratio(self) -> float:
        """generated / real (nan when the real mean is 0)."""
        return self.generated_mean / self.real_mean if self.real_mean != 0 else math.nan


@dataclass
class FundusComparison:
    """Side-by-side fundus statistics, real vs generated, with the ratio generated / real."""

    rows: list[StatRow]
    size: int
    n_real: int
    n_generated: int

    def to_markdown(self) -> str:
        """A markdown table (the report embeds it)."""
        out = [
            f"Fundus statistics at {self.size} px (shorter side); "
            f"{self.n_real} real, {self.n_generated} generated images. "
            "medrl's definitions (docs/metrics.md): not comparable with other papers' values.",
            "",
            "| statistic | real (mean ± std) | generated (mean ± std) | generated / real |",
            "| --- | --- | --- | --- |",
        ]
        for r in self.rows:
            out.append(
                f"| {r.stat} | {r.real_mean:.4g} ± {r.real_std:.2g} "
                f"| {r.generated_mean:.4g} ± {r.generated_std:.2g} | {r.ratio:.3f} |"
            )
        return "\n".join(out)


def compare_fundus_stats(
    real: ImageBatch,
    generated: ImageBatch,
    size: int | None = None,
    fov_threshold: float = 0.06,
) -> FundusComparison:
    """Fundus statistics of real and generated images side by side, at one resolution.

    ``size=None`` uses the generated images' size (the shorter side of the first one) and
    resizes every real image to it.
    """
    gen_list = as_uint8_list(generated, "generated")
    if size is None:
        size = int(min(gen_list[0].shape[:2]))
    r = fundus_statistics(real, size, fov_threshold)
    g = fundus_statistics(gen_list, size, fov_threshold)
    return compare_statistics(r, g)


def compare_statistics(real: FundusStats, generated: FundusStats) -> FundusComparison:
    """The side-by-side table of two sets' statistics (computed at one size)."""
    rm, rs, gm, gs = real.mean(), real.std(), generated.mean(), generated.std()
    rows = [StatRow(k, rm[k], rs[k], gm[k], gs[k]) for k in STAT_NAMES]
    return FundusComparison(rows=rows, size=generated.size, n_real=real.n, n_generated=generated.n)
