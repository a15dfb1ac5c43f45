"""The phantom's retinal vessel tree: arcades from the optic disc, branches, fronds and
(for proliferative DR) neovascular tufts, as polyline segments with widths, grown from the
record's vessel seed (:mod:`generators.phantom`). Geometry is in fractions of the image
side, so one tree draws the same at any size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from generators.phantom import FOV_RADIUS, PhantomRecord

# --------------------------------------------------------------------------- vessel tree

_STEP = 0.008  # polyline step of the vessel tree (fraction of the side)
_FAZ_RADIUS = 0.035  # foveal avascular zone: vessels stop at its edge
_MIN_VESSEL_WIDTH = 0.0012


@dataclass(frozen=True)
class Segments:
    """The vessel tree as straight pieces with linearly varying width (fractions)."""

    a: np.ndarray  # (S, 2) start (x, y)
    b: np.ndarray  # (S, 2) end
    w0: np.ndarray  # (S,) width at a
    w1: np.ndarray  # (S,) width at b
    artery: np.ndarray  # (S,) bool
    neo: np.ndarray  # (S,) bool: neovascular frond


@dataclass
class _Branches:
    pts: np.ndarray  # (B, N, 2) polyline points, padded
    w: np.ndarray  # (B, N) widths
    n: np.ndarray  # (B,) number of valid points
    artery: np.ndarray  # (B,) bool


@dataclass(frozen=True)
class _Geometry:
    disc: tuple[float, float, float]  # x, y, radius
    macula: tuple[float, float]
    side: int


def _pad(polylines: list[tuple[np.ndarray, np.ndarray, bool]]) -> _Branches:
    n = np.array([len(p) for p, _, _ in polylines])
    big = int(n.max())
    pts = np.zeros((len(polylines), big, 2))
    w = np.zeros((len(polylines), big))
    for i, (p, wi, _) in enumerate(polylines):
        pts[i, : len(p)], w[i, : len(p)] = p, wi
        pts[i, len(p) :] = p[-1]
    return _Branches(pts, w, n, np.array([a for _, _, a in polylines], dtype=bool))


def _walk(rng, start, heading, width, nsteps, tortuosity, bend, taper, step=_STEP):
    """Vectorised random walks with smooth curvature: (B, N, 2) points, (B, N) widths."""
    big = int(nsteps.max()) + 1
    curv = ndimage.gaussian_filter1d(rng.normal(0, tortuosity, (len(start), big - 1)), 1.5, axis=1)
    curv = 2.0 * curv + rng.uniform(-bend, bend, (len(start), 1))
    theta = heading[:, None] + np.cumsum(curv, axis=1)
    d = step * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    pts = np.concatenate([start[:, None], start[:, None] + np.cumsum(d, axis=1)], axis=1)
    frac = np.clip(np.arange(big)[None] / np.maximum(nsteps, 1)[:, None], 0, 1)
    return pts, width[:, None] * (1 - taper * frac)


def _truncate(br: _Branches, geo: _Geometry, stop_in_disc: bool) -> None:
    """Cut each branch at the FOV edge, the foveal avascular zone (and the disc)."""
    x, y = br.pts[..., 0], br.pts[..., 1]
    ok = np.hypot(x - 0.5, y - 0.5) < FOV_RADIUS - 0.003
    ok &= np.hypot(x - geo.macula[0], y - geo.macula[1]) > _FAZ_RADIUS
    if stop_in_disc:
        ok[:, 1:] &= np.hypot(x - geo.disc[0], y - geo.disc[1])[:, 1:] > geo.disc[2]
    bad = ~ok | (np.arange(ok.shape[1])[None] >= br.n[:, None])
    first_bad = np.where(bad.any(axis=1), bad.argmax(axis=1), ok.shape[1])
    br.n = np.minimum(br.n, first_bad)


def _arcade(rng, geo: _Geometry, vert: int, width: float) -> tuple[np.ndarray, np.ndarray]:
    """A temporal arcade: leaves the disc vertically, curves around the macula."""
    (dx, dy, _), (mx, my) = geo.disc, geo.macula
    dist, a0 = math.hypot(dx - mx, dy - my), math.atan2(dy - my, dx - mx)
    turn = vert * (1 if math.cos(a0) > 0 else -1)
    squeeze, phi_m = rng.uniform(0.25, 0.42), rng.uniform(1.1, 1.7)
    spread, phi_end = rng.uniform(0.3, 0.5), 2.9
    n = int(dist * (1 - squeeze / 2) * phi_end / _STEP)
    phi = np.linspace(0, phi_end, n)
    h = 0.5 * (1 - np.cos(np.pi * np.minimum(phi, phi_m) / phi_m))
    r = dist * (1 - squeeze * h + spread * 0.3 * np.logaddexp(0, (phi - phi_m) / 0.3))
    psi = rng.uniform(0, 2 * np.pi, 2)
    r *= 1 + 0.025 * np.sin(3 * phi + psi[0]) + 0.012 * np.sin(8 * phi + psi[1])
    ang = a0 + turn * phi
    pts = np.stack([mx + r * np.cos(ang), my + r * np.sin(ang)], axis=1)
    return pts, width * (1 - 0.45 * phi / phi_end)


def _in_cup(rng, geo: _Geometry, n: int) -> np.ndarray:
    """n points scattered over the middle of the disc, where the vessels emerge."""
    a = rng.uniform(0, 2 * np.pi, n)
    r = geo.disc[2] * 0.3 * np.sqrt(rng.uniform(0, 1, n))
    return np.stack([geo.disc[0] + r * np.cos(a), geo.disc[1] + r * np.sin(a)], axis=1)


def _trunks(rng, geo: _Geometry) -> _Branches:
    """Main vessels leaving the disc: temporal arcades, nasal trunks, small vessels."""
    polylines: list[tuple[np.ndarray, np.ndarray, bool]] = []
    vein_w = rng.uniform(0.0105, 0.0125)
    art_ratio = rng.uniform(0.7, 0.8)
    for vert in (-1, 1):
        for artery in (False, True):
            w = vein_w * (art_ratio if artery else 1.0) * rng.uniform(0.92, 1.05)
            pts, w = _arcade(rng, geo, vert, w)
            pts = (
                pts + (_in_cup(rng, geo, 1)[0] - pts[0]) * np.linspace(1, 0, len(pts))[:, None] ** 4
            )
            polylines.append((pts, w, artery))
    nasal = 0.0 if geo.side > 0 else np.pi
    specs = []  # (heading, width, artery, steps, tortuosity)
    for vert in (-1, 1):
        for artery in (False, True):
            beta = rng.uniform(0.55, 1.15) * vert * geo.side
            w = 0.75 * vein_w * (art_ratio if artery else 1.0)
            specs.append((nasal + beta, w, artery, 70, 0.03))
    for artery in rng.random(rng.integers(1, 3)) < 0.5:  # small nasal vessels
        specs.append((nasal + rng.normal(0, 0.2), rng.uniform(0.003, 0.0045), artery, 50, 0.05))
    temporal = np.pi - nasal
    for artery in rng.random(rng.integers(2, 4)) < 0.5:  # papillomacular vessels
        heading = temporal + geo.side * rng.uniform(-0.45, 0.45)
        specs.append((heading, rng.uniform(0.0022, 0.0032), artery, 40, 0.08))
    heads, widths, arts, steps, tort = (np.array(v) for v in zip(*specs, strict=True))
    starts = _in_cup(rng, geo, len(specs))
    pts, w = _walk(rng, starts, heads, widths, steps, tort[:, None], 0.01, 0.4)
    for i in range(len(specs)):
        polylines.append((pts[i, : steps[i] + 1], w[i, : steps[i] + 1], bool(arts[i])))
    br = _pad(polylines)
    _truncate(br, geo, stop_in_disc=False)
    return br


def _children(rng, parent: _Branches, geo: _Geometry) -> _Branches | None:
    """Side branches every few steps along the parents; parents thin by Murray's law."""
    nb, big = parent.w.shape
    gmin, gmax = 7, 16
    m = big // gmin + 1
    idx = np.cumsum(rng.integers(gmin, gmax + 1, (nb, m)), axis=1) - rng.integers(0, gmin, (nb, 1))
    idx = np.clip(idx, 0, big - 1)
    ok = idx < parent.n[:, None] - 3
    rows = np.repeat(np.arange(nb)[:, None], m, axis=1)
    p = parent.pts[rows, idx]
    ok &= np.hypot(p[..., 0] - geo.disc[0], p[..., 1] - geo.disc[1]) > 1.25 * geo.disc[2]
    ratio = rng.uniform(0.45, 0.8, (nb, m))
    side = rng.choice([-1.0, 1.0], (nb, m))
    angle = rng.uniform(0.6, 1.3, (nb, m))
    length = rng.uniform(30, 60, (nb, m))
    bb, mm = np.nonzero(ok)
    if len(bb) == 0:
        return None
    factors = np.ones_like(parent.w)
    factors[bb, idx[bb, mm]] = (1 - ratio[bb, mm] ** 3) ** (1 / 3)
    cum = np.cumprod(factors, axis=1)
    w_before = parent.w * cum / factors
    parent.w = parent.w * cum
    k = idx[bb, mm]
    child_w = ratio[bb, mm] * w_before[bb, k]
    keep = child_w >= _MIN_VESSEL_WIDTH
    bb, mm, k, child_w = bb[keep], mm[keep], k[keep], child_w[keep]
    if len(bb) == 0:
        return None
    d = parent.pts[bb, k + 1] - parent.pts[bb, k]
    heading = np.arctan2(d[:, 1], d[:, 0]) + side[bb, mm] * angle[bb, mm]
    steps = np.clip(child_w * length[bb, mm] / _STEP, 3, 70).astype(int)
    pts, w = _walk(rng, parent.pts[bb, k], heading, child_w, steps, 0.035, 0.015, 0.35)
    br = _Branches(pts, w, steps + 1, parent.artery[bb])
    _truncate(br, geo, stop_in_disc=True)
    return br


def _fronds(rng, geo: _Geometry) -> _Branches:
    """Neovascularization at the disc: fine, tortuous loops on and around the disc."""
    n = int(rng.integers(8, 15))
    a = rng.uniform(0, 2 * np.pi, n)
    r = geo.disc[2] * rng.uniform(0.3, 1.1, n)
    start = np.stack([geo.disc[0] + r * np.cos(a), geo.disc[1] + r * np.sin(a)], axis=1)
    steps = rng.integers(12, 30, n)
    heading = a + rng.normal(0, 1.0, n)
    pts, w = _walk(rng, start, heading, np.full(n, 0.0028), steps, 0.45, 0.1, 0.3, step=0.004)
    br = _Branches(pts, w, steps + 1, np.ones(n, dtype=bool))
    _truncate(br, geo, stop_in_disc=False)
    return br


@functools.lru_cache(maxsize=256)
def vessel_tree(seed: int, geo: _Geometry, neovascular: bool) -> Segments:
    """The vessel tree of a record (cached: render and render_layers share it)."""
    rng = np.random.default_rng([seed, 0])
    levels = [_trunks(rng, geo)]
    for _ in range(3):
        child = _children(rng, levels[-1], geo)
        if child is None:
            break
        levels.append(child)
    neo_flags = [False] * len(levels)
    if neovascular:
        levels.append(_fronds(np.random.default_rng([seed, 3]), geo))
        neo_flags.append(True)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("a", "b", "w0", "w1", "artery", "neo")}
    for br, neo in zip(levels, neo_flags, strict=True):
        valid = np.arange(br.pts.shape[1] - 1)[None] < (br.n[:, None] - 1)
        parts["a"].append(br.pts[:, :-1][valid])
        parts["b"].append(br.pts[:, 1:][valid])
        parts["w0"].append(br.w[:, :-1][valid])
        parts["w1"].append(br.w[:, 1:][valid])
        parts["artery"].append(np.broadcast_to(br.artery[:, None], valid.shape)[valid])
        parts["neo"].append(np.full(int(valid.sum()), neo))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    for v in arrays.values():
        v.flags.writeable = False  # shared through the cache
    return Segments(**arrays)


def vessel_geometry(record: PhantomRecord) -> _Geometry:
    return _Geometry(
        (record.disc_x, record.disc_y, record.disc_radius),
        (record.macula_x, record.macula_y),
        record.side,
    )
