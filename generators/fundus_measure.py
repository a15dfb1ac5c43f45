"""Measuring a fundus photograph from its pixels: what the SIMULATED expert grades.

:func:`measure` finds the camera's field of view and the optic disc, and measures
sharpness, illumination uniformity, noise, vessel and lesion signals of any RGB fundus
image (the procedural phantom's or a generator's sample), at bounded analysis sizes so
that large photographs cost what small ones do. It does not know how an image was made:
``generators.phantom`` draws images, this module only looks at them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image
from scipy import ndimage

_ANALYSIS_SIDE = 256  # lesion analysis runs at most at this resolution
_DISC_SIDE = 96  # optic disc search runs at most at this resolution
_SHARPNESS_SIDE = 1024  # sharpness and noise run at native resolution up to this


def _resized(f: np.ndarray, side: int) -> np.ndarray:
    """Area-average an (H, W, 3) float image so that its longer side is at most ``side``."""
    h, w = f.shape[:2]
    if max(h, w) <= side:
        return f
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    channels = [Image.fromarray(f[..., c]).resize(size, Image.Resampling.BOX) for c in range(3)]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def _fov_mask(f: np.ndarray) -> np.ndarray:
    """The camera's circular field of view: the largest bright region, holes filled."""
    lum = f.max(axis=-1)
    mask = lum > max(0.04, 0.15 * float(np.percentile(lum, 99)))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (zero outside); wide ones run on a block-averaged copy (fast)."""
    step = int(sigma // 2)
    if step < 2:
        return ndimage.gaussian_filter(x, sigma, mode="constant")
    h, w = x.shape
    small = Image.fromarray(x.astype(np.float32)).resize(
        (max(1, w // step), max(1, h // step)), Image.Resampling.BOX
    )
    small_x = np.asarray(small, np.float32)
    sy, sx = h / small_x.shape[0], w / small_x.shape[1]
    small_x = ndimage.gaussian_filter(small_x, (sigma / sy, sigma / sx), mode="constant")
    big = Image.fromarray(small_x).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(big, np.float32)


def _masked_blur(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian mean of x over mask only (normalised convolution)."""
    m = mask.astype(np.float32)
    return _blur(x * m, sigma) / np.maximum(_blur(m, sigma), 1e-6)


@functools.lru_cache(maxsize=16)
def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return np.hypot(r[:, None], r[None, :]) <= radius + 0.3


@functools.lru_cache(maxsize=16)
def _line_footprints(length: int, n_angles: int) -> tuple[np.ndarray, ...]:
    out = []
    c = length // 2
    for a in np.arange(n_angles) * np.pi / n_angles:
        fp = np.zeros((length, length), dtype=bool)
        t = np.linspace(-c, c, 4 * length)
        fp[np.round(c + t * np.sin(a)).astype(int), np.round(c + t * np.cos(a)).astype(int)] = True
        out.append(fp)
    return tuple(out)


def _noise_sigma(g: np.ndarray, region: np.ndarray) -> float:
    """Immerkaer's noise estimate, made robust to edges with the median."""
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = ndimage.convolve(g, k, mode="nearest")[region]
    return float(np.median(np.abs(r)) / 0.6745 / 6.0) if r.size else 0.0


def _inner(mask: np.ndarray, margin: float) -> np.ndarray:
    """Mask shrunk by ``margin`` pixels (falls back to the mask when that empties it)."""
    inner = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] > max(margin, 1.0)
    return inner if inner.sum() >= 16 else mask


def _median_background(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Local median of x over mask (window ~1/9 of the side), computed at <= 64 px."""
    h, w = x.shape
    filled = np.where(mask, x, _masked_blur(x, mask, 0.05 * math.sqrt(h * w))).astype(np.float32)
    step = max(1, round(max(h, w) / 64))
    small = Image.fromarray(filled).resize(
        (max(1, w // step), max(1, h // step)), Image.Resampling.BOX
    )
    med = ndimage.gaussian_filter(ndimage.median_filter(np.asarray(small), size=7), 1.0)
    big = Image.fromarray(med.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    return np.maximum(np.asarray(big, np.float32), 0.02)


def _find_disc(f: np.ndarray) -> tuple[float, float]:
    """Optic disc centre (fractions of width, height): the brightest disc-sized blob."""
    f = _resized(f, _DISC_SIDE)
    h, w = f.shape[:2]
    n = math.sqrt(h * w)
    fov = _fov_mask(f)
    fov_in = _inner(fov, 0.03 * n)
    # brightness relative to the local background, in green and blue (the disc is
    # yellow-white); a closing removes the vessels on it, an opening small bright lesions
    ratio = [
        c / np.maximum(_masked_blur(c, fov_in, 0.12 * n), 0.02) for c in (f[..., 1], f[..., 2])
    ]
    # (exudates are low in blue; capping lets area, not the brightest specks, decide)
    bright = np.where(fov, np.minimum(0.35 * ratio[0] + 0.65 * ratio[1], 1.8), 0)
    bright = ndimage.grey_closing(bright, footprint=_disk(max(1, round(0.02 * n))))
    score = _masked_blur(bright, fov_in, 0.04 * n)  # summed over a disc-sized area
    score[~fov_in] = -np.inf
    dy, dx = np.unravel_index(int(np.argmax(score)), score.shape)
    return (dx + 0.5) / w, (dy + 0.5) / h


def measure(image: np.ndarray) -> dict[str, float | str]:
    """Estimate fundus attributes from the pixels of an RGB image (no record needed).

    Works on any fundus-like uint8 (H, W, 3) image (floats are taken as [0, 1]).
    Returns laterality ("left"/"right": which side of the field of view the optic disc,
    the brightest disc-sized blob, is on), disc_x / disc_y (fractions of width/height),
    red_lesion_fraction / exudate_fraction / cotton_wool_fraction (shares of the field of
    view outside the disc), sharpness (variance of the Laplacian of the
    brightness-normalised green channel, noise part removed; compare images of the same
    size), illumination_uniformity (darkest / brightest sector of the field of view,
    1 = even), noise (std estimate in [0, 1] units) and fov_fraction.
    docs/phantom.md describes each step.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise ValueError(f"measure: expected an RGB image (H, W, 3), got shape {img.shape}")
    full = img[..., :3].astype(np.float32)
    if img.dtype == np.uint8:
        full /= 255.0
    f = _resized(full, _ANALYSIS_SIDE)
    h, w = f.shape[:2]
    n = math.sqrt(h * w)
    fov = _fov_mask(f)
    if fov.sum() < 16:
        raise ValueError("measure: no field of view found (the image is black)")
    fov_in = _inner(fov, 0.03 * n)
    grid_y, grid_x = np.mgrid[0:h, 0:w]
    cy, cx = grid_y[fov].mean(), grid_x[fov].mean()
    radius = math.sqrt(fov.sum() / np.pi)
    disc_x, disc_y = _find_disc(f)
    disc_zone = np.hypot(grid_x + 0.5 - disc_x * w, grid_y + 0.5 - disc_y * h) < 0.11 * n
    region = fov_in & ~disc_zone
    area = max(int(region.sum()), 1)
    g, b = f[..., 1], f[..., 2]
    # local background without the lesions: a median over ~1/9 of the image side
    bg = _median_background(g, fov_in)
    noise_rel = _noise_sigma(g, fov_in) / max(float(g[fov_in].mean()), 1e-3)
    red = _red_lesions(g, bg, noise_rel, n) & region
    exudate, cotton = _bright_lesions(g, b, bg, noise_rel, region)
    dx, dy = grid_x - cx, grid_y - cy
    uniformity = _illumination_uniformity(f, fov & ~disc_zone, n, dx, dy, radius)
    sharpness, noise = _sharpness_and_noise(full)
    return {
        "laterality": "right" if disc_x * w > cx + 0.5 else "left",
        "disc_x": float(disc_x),
        "disc_y": float(disc_y),
        "red_lesion_fraction": float(red.sum() / area),
        "exudate_fraction": float(exudate.sum() / area),
        "cotton_wool_fraction": float(cotton.sum() / area),
        "sharpness": float(sharpness),
        "illumination_uniformity": float(uniformity),
        "noise": float(noise),
        "fov_fraction": float(fov.mean()),
    }


def _red_lesions(g: np.ndarray, bg: np.ndarray, noise_rel: float, n: float) -> np.ndarray:
    """Red lesions: dark blobs in the green channel that no line (vessel) of the opening
    fits in; the threshold rises with the noise."""
    dark = np.clip(1 - ndimage.gaussian_filter(g, 0.5) / bg, 0, 1)
    length = max(5, int(round(0.05 * n)) | 1)
    opened = np.zeros_like(dark)
    for fp in _line_footprints(length, 12 if n > 96 else 8):
        np.maximum(opened, ndimage.grey_opening(dark, footprint=fp), out=opened)
    residual = dark - opened  # a blob keeps nearly all its darkness, a vessel little
    return (residual > 0.25 + 2.0 * noise_rel) & (residual > 0.7 * dark)


def _bright_lesions(
    g: np.ndarray, b: np.ndarray, bg: np.ndarray, noise_rel: float, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(hard exudates, cotton wool spots) in ``region``: much brighter than the local
    background, yellow (blue/green below 0.62) or whiter."""
    g_s, b_s = ndimage.gaussian_filter(g, 0.5), ndimage.gaussian_filter(b, 0.5)
    bright = (g_s / bg > 1.3 + 2.0 * noise_rel) & region
    yellow = b_s / np.maximum(g_s, 1e-3) < 0.62
    return bright & yellow, bright & ~yellow


def _illumination_uniformity(
    f: np.ndarray, area: np.ndarray, n: float, dx: np.ndarray, dy: np.ndarray, radius: float
) -> float:
    """Darkest / brightest median brightness of 8 sectors of the ring 0.3..0.85 radius
    within ``area`` (``dx``, ``dy``: offsets from the field of view's centre)."""
    lum = _blur(f.mean(axis=-1), 0.03 * n)
    rr = np.hypot(dx, dy) / radius
    sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 8).astype(int) % 8
    ring = (rr > 0.3) & (rr < 0.85) & area
    medians = [float(np.median(lum[ring & (sector == k)])) for k in range(8)]
    medians = [m for m in medians if np.isfinite(m)]
    return min(medians) / max(max(medians), 1e-6) if medians else 1.0


def _sharpness_and_noise(full: np.ndarray) -> tuple[float, float]:
    """(sharpness, noise) of the green channel at native resolution (capped at
    ``_SHARPNESS_SIDE``): Laplacian variance of the brightness-normalised channel with the
    noise part removed, and Immerkaer's noise estimate."""
    native = _resized(full, _SHARPNESS_SIDE)
    g_native = native[..., 1]
    fov_native = _fov_mask(native)
    region_native = _inner(fov_native, 0.05 * math.sqrt(fov_native.size))
    noise = _noise_sigma(g_native, region_native)
    mean_g = max(float(g_native[region_native].mean()), 1e-3)
    lap = ndimage.laplace(g_native / mean_g)[region_native]
    return max(float(lap.var()) - 20.0 * (noise / mean_g) ** 2, 0.0), noise
