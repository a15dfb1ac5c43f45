"""Drawing a :class:`~generators.phantom.PhantomRecord`: :func:`render` gives the colour
fundus image at any size, :func:`render_layers` the ground-truth masks of the same
drawing (field of view, disc, cup, macula, vessels, each lesion kind).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from generators.phantom import (
    FOV_RADIUS,
    LAYER_NAMES,
    LESION_KINDS,
    LESION_MIN_RADIUS_PX,
    Lesion,
    PhantomRecord,
)
from generators.phantom_vessels import Segments, vessel_geometry, vessel_tree

# --------------------------------------------------------------------------- drawing


def _window(size: int, cx: np.ndarray, cy: np.ndarray, half: int):
    """Pixel windows (2*half+1)^2 around centres (px): x, y centres and flat indices."""
    off = np.arange(-half, half + 1)
    ix = np.floor(cx).astype(np.int64)[:, None] + off  # (N, K)
    iy = np.floor(cy).astype(np.int64)[:, None] + off
    inside = ((ix >= 0) & (ix < size))[:, None, :] & ((iy >= 0) & (iy < size))[:, :, None]
    flat = iy[:, :, None] * size + ix[:, None, :]
    xs = (ix + 0.5).astype(np.float32)[:, None, :]
    ys = (iy + 0.5).astype(np.float32)[:, :, None]
    return xs, ys, flat, inside


def _splat(size: int, flat, inside, *values: np.ndarray) -> list[np.ndarray]:
    """Max-composite per-window values into flat images."""
    keep = inside & (values[0] > 0)
    idx = flat[keep]
    out = []
    for v in values:
        img = np.zeros(size * size, np.float32)
        np.maximum.at(img, idx, v[keep].astype(np.float32))
        out.append(img.reshape(size, size))
    return out


def _draw_segments(size: int, seg: Segments, sel: np.ndarray, reflex: float):
    """(absorption, coverage) of the selected vessel segments, anti-aliased analytically."""
    if not sel.any():
        return np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    a, b = seg.a[sel] * size, seg.b[sel] * size
    neo = seg.neo[sel][:, None, None]
    min_w = np.where(seg.neo[sel], 0.3, 0.0)
    w0 = np.maximum(seg.w0[sel] * size, min_w)
    w1 = np.maximum(seg.w1[sel] * size, min_w)
    mid = (a + b) / 2
    half = int(np.ceil((np.hypot(*(b - a).T) / 2 + np.maximum(w0, w1) / 2).max() + 1.0))
    xs, ys, flat, inside = _window(size, mid[:, 0], mid[:, 1], half)
    ax, ay = (a[:, i, None, None].astype(np.float32) for i in (0, 1))
    ux, uy = ((b - a)[:, i, None, None].astype(np.float32) for i in (0, 1))
    l2 = np.maximum(ux * ux + uy * uy, 1e-9)
    t = np.clip(((xs - ax) * ux + (ys - ay) * uy) / l2, 0, 1)
    d = np.hypot(xs - ax - t * ux, ys - ay - t * uy)
    hw = 0.5 * (w0[:, None, None] + t * (w1 - w0)[:, None, None]).astype(np.float32)
    cov = np.clip(np.minimum(d + 0.5, hw) - np.maximum(d - 0.5, -hw), 0, 1)
    # blood column: thicker in the middle of wide vessels, central light reflex,
    # thin vessels fainter
    core = np.sqrt(np.clip(1 - (d / np.maximum(hw, 1e-3)) ** 2, 0, 1))
    profile = np.clip((2 * hw - 1.5) / 3, 0, 0.4)
    refl = reflex * np.clip((2 * hw - 2.5) / 3, 0, 1) * np.exp(-((d / (0.3 * hw + 1e-3)) ** 2))
    faint = np.clip(0.2 + 0.8 * (2 * hw / size) / 0.008, 0, 1)
    faint = np.where(neo, 0.8, faint)
    value = cov * (1 - profile + profile * core) * (1 - refl) * faint
    return tuple(_splat(size, flat, inside, cov, value)[::-1])


def _draw_blobs(
    size: int,
    lesions: Sequence[Lesion],
    amp: np.ndarray,
    phase: np.ndarray,
    soft: float,
    flat_top: bool = False,
) -> np.ndarray:
    """Coverage of irregular round blobs r(theta) = r (1 + sum a_k cos(k theta + p_k))."""
    if not lesions:
        return np.zeros((size, size), np.float32)
    cx = np.array([les.x for les in lesions]) * size
    cy = np.array([les.y for les in lesions]) * size
    r = np.maximum(np.array([les.radius for les in lesions]) * size, LESION_MIN_RADIUS_PX)
    edge = np.maximum(1.0, soft * r)
    half = int(np.ceil((r * (1 + np.abs(amp).sum(axis=1)) + edge / 2).max() + 1.0))
    xs, ys, flat, inside = _window(size, cx, cy, half)
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    d = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    shape = np.ones_like(d)
    for k in range(amp.shape[1]):
        shape += amp[:, k, None, None] * np.cos((k + 2) * theta + phase[:, k, None, None])
    reff = r[:, None, None] * shape
    cov = np.clip((reff - d) / edge[:, None, None] + 0.5, 0, 1)
    if flat_top:  # preretinal blood settles: a boat shape with a straight upper border
        cov = np.minimum(cov, np.clip(dy + 0.35 * r[:, None, None] + 0.5, 0, 1))
    return _splat(size, flat, inside, cov)[0]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :], c[:, None]


def _fields(record: PhantomRecord, size: int) -> dict[str, np.ndarray]:
    """Coverage (float32 in [0, 1]) of every structure, plus vessel absorption."""
    xx, yy = _grid(size)
    f: dict[str, np.ndarray] = {}
    f["fov"] = np.clip((FOV_RADIUS - np.hypot(xx - 0.5, yy - 0.5)) * size + 0.5, 0, 1)
    rd = record.disc_radius
    rx, ry = rd / 1.05, rd * 1.05  # discs are slightly taller than wide
    dd = np.hypot((xx - record.disc_x) / rx, (yy - record.disc_y) / ry)
    f["disc_dist"] = dd
    f["disc"] = np.clip((1 - dd) * rd * size / max(1.0, 0.18 * rd * size) + 0.5, 0, 1)
    cdr = record.cup_to_disc
    cup_x = record.disc_x - record.side * 0.08 * rd * (1 - cdr)  # a little temporal
    cd = np.hypot((xx - cup_x) / (0.92 * cdr * rx), (yy - record.disc_y) / (cdr * ry))
    cup_r = cdr * rd * size
    f["cup"] = np.clip((1 - cd) * cup_r / max(1.0, 0.3 * cup_r) + 0.5, 0, 1)
    f["macula_dist"] = np.hypot(xx - record.macula_x, yy - record.macula_y)
    seg = vessel_tree(record.vessel_seed, vessel_geometry(record), record.dr_grade == 4)
    f["vein"], vein_cov = _draw_segments(size, seg, ~seg.artery, reflex=0.1)
    f["artery"], art_cov = _draw_segments(size, seg, seg.artery, reflex=0.25)
    f["vessels"] = np.maximum(vein_cov, art_cov)
    shape_rng = np.random.default_rng([record.vessel_seed, 2])
    n = len(record.lesions)
    amp, phase = shape_rng.uniform(-1, 1, (n, 5)), shape_rng.uniform(0, 2 * np.pi, (n, 5))
    style = {  # kind: (amplitude scale per harmonic, soft edge as a share of the radius)
        "microaneurysm": (np.array([0.05, 0.0, 0.0, 0.0, 0.0]), 0.2),
        "haemorrhage": (np.array([0.18, 0.12, 0.08, 0.0, 0.0]), 0.35),
        "exudate": (np.array([0.25, 0.15, 0.1, 0.0, 0.0]), 0.1),
        "cotton_wool": (np.array([0.15, 0.1, 0.08, 0.06, 0.05]), 0.7),
    }
    for kind, (scale, soft) in style.items():
        sel = [i for i, les in enumerate(record.lesions) if les.kind == kind and not les.preretinal]
        lesions = [record.lesions[i] for i in sel]
        f[kind] = _draw_blobs(size, lesions, amp[sel] * scale, phase[sel], soft)
    sel = [i for i, les in enumerate(record.lesions) if les.preretinal]
    pre = [record.lesions[i] for i in sel]
    f["preretinal"] = _draw_blobs(size, pre, amp[sel] * 0.06, phase[sel], 0.05, flat_top=True)
    return f


def render_layers(record: PhantomRecord, size: int) -> dict[str, np.ndarray]:
    """Ground-truth boolean masks (size, size) of the drawing, keys LAYER_NAMES.

    A pixel belongs to a structure when the structure covers at least half of it; masks
    may overlap (a lesion on a vessel is in both). The preretinal haemorrhage is part of
    "haemorrhage"; neovascular fronds are part of "vessels"; "macula" is the disc of one
    disc diameter around the fovea.
    """
    f = _fields(record, size)
    layers = {k: f[k] >= 0.5 for k in ("fov", "disc", "cup", "vessels", *LESION_KINDS)}
    layers["haemorrhage"] |= f["preretinal"] >= 0.5
    layers["macula"] = f["macula_dist"] < record.disc_radius
    return {k: layers[k] for k in LAYER_NAMES}


def _noise_field(rng: np.random.Generator, cells: int, size: int, draw: bool = True) -> np.ndarray:
    """Smooth unit-ish noise with ``cells`` features across the image (resolution independent)."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    if not draw:
        return np.zeros((size, size), np.float32)
    return ndimage.zoom(grid, size / cells, order=3, mode="reflect", grid_mode=True)[:size, :size]


_VEIN_ABSORB = np.array([0.24, 0.64, 0.52], np.float32)
_ARTERY_ABSORB = np.array([0.12, 0.50, 0.38], np.float32)
_LESION_COLOURS = {  # kind: (RGB, opacity)
    "microaneurysm": ((0.58, 0.07, 0.05), 0.92),
    "haemorrhage": ((0.60, 0.09, 0.06), 0.9),
    "exudate": ((1.0, 0.89, 0.40), 1.0),
    "cotton_wool": ((0.95, 0.90, 0.78), 0.85),
    "preretinal": ((0.50, 0.05, 0.04), 0.97),
}


def _illumination(record: PhantomRecord, xx: np.ndarray, yy: np.ndarray) -> np.ndarray | float:
    """Multiplicative field of the uneven-illumination defect (1 = none)."""
    if record.illumination <= 0:
        return 1.0
    rng = np.random.default_rng([record.vessel_seed, 4])
    corner, angle = rng.random() < 0.4, rng.uniform(0, 2 * np.pi)
    ux, uy = math.cos(angle), math.sin(angle)
    if corner:  # a dark corner centred just outside the field of view
        d = np.hypot(xx - 0.5 - 0.5 * ux, yy - 0.5 - 0.5 * uy)
        dark = np.exp(-((d / 0.38) ** 2))
    else:  # one-sided gradient
        t = ((xx - 0.5) * ux + (yy - 0.5) * uy) / FOV_RADIUS
        dark = np.clip((t + 1) / 2, 0, 1) ** 1.5
    return 1 - 0.85 * record.illumination * dark


def render(record: PhantomRecord, size: int) -> np.ndarray:
    """Draw the record as an RGB uint8 (size, size, 3) fundus photograph (deterministic)."""
    f = _fields(record, size)
    xx, yy = _grid(size)
    rng = np.random.default_rng([record.vessel_seed, 1])
    pigment = rng.uniform()
    base = (1 - pigment) * np.array([1.04, 0.44, 0.30]) + pigment * np.array([0.90, 0.31, 0.18])
    base = (base * (1 + rng.normal(0, 0.03, 3))).astype(np.float32)
    low = _noise_field(rng, 5, size)
    mid = _noise_field(rng, 20, size)
    fine = _noise_field(rng, 80, size, draw=size >= 160)
    r = np.hypot(xx - 0.5, yy - 0.5) / FOV_RADIUS
    light = np.clip(1 - 0.25 * r**2.5 - 0.35 * np.clip((r - 0.82) / 0.18, 0, 1) ** 2, 0.05, 1)
    light = light * (1 + 0.06 * low)
    tex = 0.012 * mid + 0.025 * fine
    img = base * light[..., None] * (1 + tex[..., None] * np.array([0.7, 1.3, 1.2], np.float32))
    rd = record.disc_radius
    glow = np.exp(-((f["disc_dist"] / 1.5) ** 2))[..., None]
    img = img + glow * np.array([0.06, 0.09, 0.05], np.float32) * light[..., None]
    dm = f["macula_dist"][..., None] / rd
    img = img * (
        1
        - np.exp(-((dm / 1.3) ** 2)) * np.array([0.18, 0.30, 0.26], np.float32)
        - np.exp(-((dm / 0.45) ** 2)) * np.array([0.05, 0.09, 0.07], np.float32)
    )
    img = img + np.exp(-((dm / 0.05) ** 2)) * 0.06  # foveal reflex (seen at high resolution)
    disc, cup = f["disc"][..., None], f["cup"][..., None]
    shade = (0.88 + 0.14 * np.clip(1 - f["disc_dist"], 0, 1)) * np.sqrt(light)
    shade = shade[..., None]  # the disc reflects strongly: vignetting dims it less
    rim_colour = np.array([1.15, 0.76, 0.52], np.float32) * shade * (1 + 0.5 * tex[..., None])
    img = img * (1 - 0.97 * disc) + rim_colour * 0.97 * disc
    img = img * (1 - 0.9 * cup) + np.array([1.22, 1.10, 0.90], np.float32) * shade * 0.9 * cup
    dive = (0.3 + 0.7 * np.clip(f["disc_dist"] / 0.35, 0, 1) ** 2)[..., None]  # into the cup
    img = img * (1 - dive * f["vein"][..., None] * _VEIN_ABSORB)
    img = img * (1 - dive * f["artery"][..., None] * _ARTERY_ABSORB)
    for kind, (colour, opacity) in _LESION_COLOURS.items():
        a = opacity * f[kind][..., None]
        img = img * (1 - a) + np.array(colour, np.float32) * (0.35 + 0.65 * light[..., None]) * a
    img = img * _illumination(record, xx, yy)[..., None] if record.illumination > 0 else img
    sigma = record.blur * size
    if sigma >= 0.05:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
    fov = f["fov"][..., None]
    if record.noise > 0:
        noise_rng = np.random.default_rng([record.vessel_seed, 5, size])
        img = img + noise_rng.normal(0, record.noise, img.shape).astype(np.float32) * fov
    img = img * fov
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
