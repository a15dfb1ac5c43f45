"""Procedural colour fundus phantom: the embedded demo dataset, with its ground truth.

Every image comes from a :class:`PhantomRecord`: eye, optic disc and cup, macula, a seed
for the vessel tree, diabetic retinopathy (DR) grade and lesions, image-quality defects
and the text prompt built from them. :func:`render` draws the record at any size (all
geometry is stored as fractions of the image side, so one record gives the same picture
at 64 and at 512 px); :func:`render_layers` gives the ground-truth masks of the same
drawing; :func:`generators.fundus_measure.measure` estimates the same attributes from
the pixels of any fundus-like image, without the record (the simulated expert uses it to
rate generated images).

Coordinates: ``x`` grows to the right, ``y`` downwards, both in [0, 1] of the image side.
A right eye has its optic disc on the viewer's right. docs/phantom.md has the rules.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from generators.images import make_grid, save_png
from runfiles import commit_folder

#: Bump when the drawing changes, so an old dataset directory is not taken as current.
PHANTOM_VERSION = 1

LesionKind = Literal["microaneurysm", "haemorrhage", "exudate", "cotton_wool"]
LESION_KINDS: tuple[str, ...] = ("microaneurysm", "haemorrhage", "exudate", "cotton_wool")
#: Keys of :func:`render_layers`.
LAYER_NAMES: tuple[str, ...] = ("fov", "disc", "cup", "macula", "vessels", *LESION_KINDS)
DR_GRADE_NAMES: tuple[str, ...] = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)
#: Share of each DR grade 0..4 among sampled records.
DR_GRADE_PROBS: tuple[float, ...] = (0.35, 0.20, 0.20, 0.13, 0.12)
QUALITY_NAMES = {1: "poor", 2: "fair", 3: "good"}
#: Radius of the circular field of view around the image centre (fraction of the side).
FOV_RADIUS = 0.46
#: Lesions are drawn with at least this radius in pixels, so they survive at 64 px.
LESION_MIN_RADIUS_PX = 0.75
#: A haemorrhage at least this large (fraction of the side) is a preretinal haemorrhage.
PRERETINAL_MIN_RADIUS = 0.03
#: Vertical cup-to-disc ratios above this read as "glaucoma suspect".
GLAUCOMA_SUSPECT_CDR = 0.6
#: Thresholds (level 1, level 2) of the three image-quality defects.
BLUR_LEVELS = (0.005, 0.012)
ILLUMINATION_LEVELS = (0.35, 0.65)
NOISE_LEVELS = (0.02, 0.045)
CSV_COLUMNS = (
    "path",
    "Text",
    "modality",
    "split",
    "source_dataset",
    "label",
    "laterality",
    "patient_id",
)
_PARAMS_FILE = "phantom.json"

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Lesion:
    """One lesion: centre and radius as fractions of the image side."""

    kind: LesionKind
    x: float
    y: float
    radius: float

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"lesion kind {self.kind!r} is not one of {LESION_KINDS}")
        if not self.radius > 0:
            raise ValueError(f"lesion radius must be > 0, got {self.radius}")

    @property
    def preretinal(self) -> bool:
        """A large haemorrhage drawn boat-shaped in front of the vessels (grade 4)."""
        return self.kind == "haemorrhage" and self.radius >= PRERETINAL_MIN_RADIUS


@dataclass(frozen=True)
class PhantomRecord:
    """Ground truth of one phantom image; ``prompt`` is its text (see :func:`prompt_for`)."""

    id: str
    laterality: Literal["left", "right"]
    disc_x: float
    disc_y: float
    disc_radius: float
    cup_to_disc: float
    macula_x: float
    macula_y: float
    vessel_seed: int
    dr_grade: int
    lesions: tuple[Lesion, ...]
    blur: float
    illumination: float
    noise: float
    quality_grade: int
    prompt: str

    def __post_init__(self) -> None:
        if self.laterality not in ("left", "right"):
            raise ValueError(
                f"{self.id}: laterality must be left or right, not {self.laterality!r}"
            )
        if self.dr_grade not in range(5):
            raise ValueError(f"{self.id}: dr_grade must be 0..4, got {self.dr_grade}")
        if not 0.1 <= self.cup_to_disc <= 0.9:
            raise ValueError(
                f"{self.id}: cup_to_disc must be in [0.1, 0.9], got {self.cup_to_disc}"
            )
        if not isinstance(self.lesions, tuple):
            raise TypeError(f"{self.id}: lesions must be a tuple of Lesion")
        if (self.dr_grade == 0) != (len(self.lesions) == 0):
            raise ValueError(f"{self.id}: lesions must be empty exactly when dr_grade is 0")
        if min(self.blur, self.illumination, self.noise) < 0 or self.illumination > 1:
            raise ValueError(f"{self.id}: blur, noise >= 0 and illumination in [0, 1] required")
        rule = quality_grade_for(self.blur, self.illumination, self.noise)
        if self.quality_grade != rule:
            raise ValueError(
                f"{self.id}: quality_grade {self.quality_grade} disagrees with the rule "
                f"(blur={self.blur}, illumination={self.illumination}, noise={self.noise} "
                f"gives {rule}); use evolve() to change defects"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lesions as a list of dicts)."""
        d = dataclasses.asdict(self)
        d["lesions"] = [dataclasses.asdict(lesion) for lesion in self.lesions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhantomRecord:
        """Inverse of :meth:`to_dict`; a ``path`` key (as in phantom.jsonl) is ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"path"}
        if unknown:
            raise ValueError(f"unknown phantom record keys: {sorted(unknown)}")
        kw = {k: d[k] for k in names}
        kw["lesions"] = tuple(Lesion(**lesion) for lesion in d["lesions"])
        return cls(**kw)

    def evolve(self, **changes: Any) -> PhantomRecord:
        """Copy with ``changes``; quality_grade and prompt are re-derived unless given."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw.update(changes)
        if "quality_grade" not in changes:
            kw["quality_grade"] = quality_grade_for(kw["blur"], kw["illumination"], kw["noise"])
        record = PhantomRecord(**kw)
        if "prompt" not in changes:
            record = dataclasses.replace(record, prompt=prompt_for(record))
        return record

    @property
    def side(self) -> int:
        """+1 for a right eye (disc on the viewer's right), -1 for a left eye."""
        return 1 if self.laterality == "right" else -1


def _defect_level(value: float, thresholds: tuple[float, float]) -> int:
    return int(value >= thresholds[0]) + int(value >= thresholds[1])


def quality_grade_for(blur: float, illumination: float, noise: float) -> int:
    """Quality grade 3 (good), 2 (fair) or 1 (poor) from the three defects.

    Each defect has a level 0/1/2 (thresholds BLUR_LEVELS, ILLUMINATION_LEVELS,
    NOISE_LEVELS); severity = the worst level, plus one when two or more defects are
    present; grade = 3 - min(severity, 2).
    """
    levels = (
        _defect_level(blur, BLUR_LEVELS),
        _defect_level(illumination, ILLUMINATION_LEVELS),
        _defect_level(noise, NOISE_LEVELS),
    )
    severity = max(levels) + int(sum(level > 0 for level in levels) >= 2)
    return 3 - min(severity, 2)


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def prompt_for(record: PhantomRecord) -> str:
    """The text prompt of a record (template in docs/phantom.md)."""
    parts = ["colour fundus photograph", f"{record.laterality} eye"]
    findings: list[str] = []
    kinds = {lesion.kind for lesion in record.lesions if not lesion.preretinal}
    if record.dr_grade == 4:
        findings.append("neovascularization at the disc")
    if any(lesion.preretinal for lesion in record.lesions):
        findings.append("a preretinal haemorrhage")
    for kind, words in (
        ("microaneurysm", "microaneurysms"),
        ("haemorrhage", "haemorrhages"),
        ("exudate", "hard exudates"),
        ("cotton_wool", "cotton wool spots"),
    ):
        if kind in kinds:
            findings.append(words)
    dr = DR_GRADE_NAMES[record.dr_grade]
    parts.append(f"{dr} with {_join(findings)}" if findings else dr)
    parts.append(f"cup-to-disc ratio {record.cup_to_disc:.1f}")
    if record.cup_to_disc > GLAUCOMA_SUSPECT_CDR:
        parts.append("glaucoma suspect")
    parts.append(f"{QUALITY_NAMES[record.quality_grade]} image quality")
    return ", ".join(parts)


# --------------------------------------------------------------------------- sampling


def _in_fov_outside_disc(
    pts: np.ndarray, radii: np.ndarray, disc: tuple[float, float, float]
) -> np.ndarray:
    r_centre = np.hypot(pts[:, 0] - 0.5, pts[:, 1] - 0.5)
    r_disc = np.hypot(pts[:, 0] - disc[0], pts[:, 1] - disc[1])
    return (r_centre < FOV_RADIUS - 0.02 - radii) & (r_disc > 1.2 * disc[2] + radii)


def _place(rng, n, propose, radius_range, disc, kind) -> list[Lesion]:
    """n lesions at positions from ``propose(rng, m) -> (m, 2)``, inside FOV, off the disc."""
    out: list[Lesion] = []
    for _ in range(20):
        if len(out) >= n:
            break
        m = 2 * (n - len(out)) + 4
        pts = propose(rng, m)
        radii = rng.uniform(*radius_range, m)
        ok = _in_fov_outside_disc(pts, radii, disc)
        for (x, y), r in zip(pts[ok][: n - len(out)], radii[ok], strict=False):
            out.append(Lesion(kind, round(float(x), 4), round(float(y), 4), round(float(r), 5)))
    return out


def _uniform_fov(quadrant: int | None = None):
    """Proposals uniform in the FOV (optionally one quadrant around the FOV centre)."""

    def propose(rng, m):
        r = FOV_RADIUS * np.sqrt(rng.uniform(0.02, 1.0, m))
        if quadrant is None:
            a = rng.uniform(0, 2 * np.pi, m)
        else:
            a = rng.uniform(quadrant * np.pi / 2, (quadrant + 1) * np.pi / 2, m)
        return np.stack([0.5 + r * np.cos(a), 0.5 + r * np.sin(a)], axis=1)

    return propose


def _around(centre: tuple[float, float], spread: float, uniform_share: float = 0.0):
    """Gaussian proposals around centre, mixed with a share of uniform-in-FOV ones."""

    def propose(rng, m):
        pts = np.asarray(centre) + rng.normal(0, spread, (m, 2))
        swap = rng.random(m) < uniform_share
        pts[swap] = _uniform_fov()(rng, int(swap.sum()))
        return pts

    return propose


def _exudate_cluster(centre: tuple[float, float], ring: bool, spread: float):
    """Hard exudates: a blob of spread ``spread`` or a circinate ring of that radius."""

    def propose(rng, m):
        if ring:
            a = rng.uniform(0, 2 * np.pi, m)
            r = spread * (1 + rng.normal(0, 0.12, m))
            return np.stack([centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)], axis=1)
        return np.asarray(centre) + rng.normal(0, spread, (m, 2))

    return propose


def _sample_lesions(rng, grade, disc, macula, side) -> tuple[Lesion, ...]:
    """Lesions of a DR grade (rules in docs/phantom.md)."""
    if grade == 0:
        return ()
    mx, my = macula
    pole = (mx + 0.35 * (disc[0] - mx), my + 0.35 * (disc[1] - my))
    ma_r, haem_r, ex_r, cws_r = (0.0025, 0.0045), (0.006, 0.02), (0.0025, 0.0075), (0.012, 0.022)
    lesions: list[Lesion] = []
    n_ma = {1: (2, 6), 2: (4, 12), 3: (8, 20), 4: (8, 20)}[grade]
    lesions += _place(
        rng,
        rng.integers(n_ma[0], n_ma[1] + 1),
        _around(pole, 0.13, 0.3),
        ma_r,
        disc,
        "microaneurysm",
    )
    if grade == 2:
        n = rng.integers(3, 9)
        lesions += _place(rng, n, _around(pole, 0.14, 0.35), haem_r, disc, "haemorrhage")
    elif grade >= 3:  # 4-2-1 rule: haemorrhages in all four quadrants
        lo = 4 if grade == 3 else 3
        for q in range(4):
            n = rng.integers(lo, 9)
            lesions += _place(rng, n, _uniform_fov(q), haem_r, disc, "haemorrhage")
    if grade == 4 and rng.random() < 0.5:  # preretinal haemorrhage near the disc / arcade
        a = rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)  # angle from the temporal direction
        dist = disc[2] * rng.uniform(2.4, 3.4)
        centre = (disc[0] - side * dist * np.cos(a), disc[1] + dist * np.sin(a))
        lesions += _place(rng, 1, _around(centre, 0.01), (0.035, 0.05), disc, "haemorrhage")
    if grade >= 2:
        n_clusters = {2: (1, 2), 3: (2, 3), 4: (1, 3)}[grade]
        size = {2: (3, 10), 3: (5, 14), 4: (4, 12)}[grade]
        for _ in range(rng.integers(n_clusters[0], n_clusters[1] + 1)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.14)
            centre = (mx + d * np.cos(a), my + d * np.sin(a))
            ring = bool(rng.random() < 0.4)
            spread = rng.uniform(0.025, 0.045) if ring else rng.uniform(0.01, 0.03)
            n = rng.integers(size[0], size[1] + 1)
            lesions += _place(rng, n, _exudate_cluster(centre, ring, spread), ex_r, disc, "exudate")
    if grade >= 3:
        n = rng.integers(2, 6) if grade == 3 else rng.integers(1, 6)

        def near_arcades(rng, m):
            # superior / inferior temporal to the disc, along the arcades
            a = rng.choice([-1, 1], m) * rng.uniform(0.7, 1.9, m)
            d = disc[2] * rng.uniform(2.3, 5.0, m)
            return np.stack([disc[0] - side * d * np.cos(a), disc[1] + d * np.sin(a)], axis=1)

        lesions += _place(rng, n, near_arcades, cws_r, disc, "cotton_wool")
    if not lesions:  # tiny FOV margins could reject everything; keep "lesions iff grade > 0"
        lesions = [Lesion("microaneurysm", round(pole[0], 4), round(pole[1] - 0.1, 4), 0.003)]
    return tuple(lesions)


def _sample_quality(rng) -> tuple[float, float, float]:
    """(blur, illumination, noise): most images good, some with one or two defects."""
    blur = 0.0
    illumination = float(rng.uniform(0.0, 0.25))
    noise = float(rng.uniform(0.002, 0.012))
    n_defects = rng.choice(3, p=[0.65, 0.27, 0.08])
    for defect in rng.permutation(3)[:n_defects]:
        severe = rng.random() < (0.4 if n_defects == 1 else 0.3)
        if defect == 0:
            blur = float(rng.uniform(0.014, 0.022) if severe else rng.uniform(0.006, 0.010))
        elif defect == 1:
            illumination = float(rng.uniform(0.7, 0.95) if severe else rng.uniform(0.4, 0.6))
        else:
            noise = float(rng.uniform(0.05, 0.08) if severe else rng.uniform(0.022, 0.04))
    return round(blur, 4), round(illumination, 3), round(noise, 4)


def sample_record(
    rng: np.random.Generator,
    id: str,  # noqa: A002 - the record field is called id
    *,
    laterality: Literal["left", "right"] | None = None,
    dr_grade: int | None = None,
) -> PhantomRecord:
    """Draw one record; ``laterality`` / ``dr_grade`` fix those instead of sampling them."""
    if dr_grade is not None and dr_grade not in range(5):
        raise ValueError(f"dr_grade must be 0..4, got {dr_grade}")
    if laterality not in (None, "left", "right"):
        raise ValueError(f"laterality must be left or right, got {laterality!r}")
    if laterality is None:
        laterality = "right" if rng.random() < 0.5 else "left"
    side = 1 if laterality == "right" else -1
    disc_radius = float(rng.uniform(0.055, 0.07))
    dist = 5.0 * disc_radius * rng.uniform(0.92, 1.08)  # fovea ~2.5 disc diameters temporal
    macula_x = 0.5 - side * rng.uniform(0.02, 0.10)
    macula_y = 0.5 + rng.uniform(-0.035, 0.035)
    beta = math.radians(rng.uniform(3.0, 9.0))  # the disc sits a little above the fovea
    disc_x = macula_x + side * dist * math.cos(beta)
    disc_y = macula_y - dist * math.sin(beta)
    if rng.random() < 0.15:
        cdr = float(rng.choice([0.7, 0.8, 0.9], p=[0.5, 0.35, 0.15]))
    else:
        cdr = float(
            rng.choice([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], p=[0.05, 0.2, 0.3, 0.25, 0.12, 0.08])
        )
    vessel_seed = int(rng.integers(0, 2**31 - 1))
    if dr_grade is None:
        dr_grade = int(rng.choice(5, p=DR_GRADE_PROBS))
    disc = (disc_x, disc_y, disc_radius)
    lesions = _sample_lesions(rng, dr_grade, disc, (macula_x, macula_y), side)
    blur, illumination, noise = _sample_quality(rng)
    record = PhantomRecord(
        id=id,
        laterality=laterality,
        disc_x=round(disc_x, 4),
        disc_y=round(disc_y, 4),
        disc_radius=round(disc_radius, 4),
        cup_to_disc=cdr,
        macula_x=round(float(macula_x), 4),
        macula_y=round(float(macula_y), 4),
        vessel_seed=vessel_seed,
        dr_grade=int(dr_grade),
        lesions=lesions,
        blur=blur,
        illumination=illumination,
        noise=noise,
        quality_grade=quality_grade_for(blur, illumination, noise),
        prompt="",
    )
    return dataclasses.replace(record, prompt=prompt_for(record))


# --------------------------------------------------------------------------- vessel tree

_STEP = 0.008  # polyline step of the vessel tree (fraction of the side)
_FAZ_RADIUS = 0.035  # foveal avascular zone: vessels stop at its edge
_MIN_VESSEL_WIDTH = 0.0012


@dataclass(frozen=True)
class _Segments:
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
def _vessel_tree(seed: int, geo: _Geometry, neovascular: bool) -> _Segments:
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
    return _Segments(**arrays)


def _geometry(record: PhantomRecord) -> _Geometry:
    return _Geometry(
        (record.disc_x, record.disc_y, record.disc_radius),
        (record.macula_x, record.macula_y),
        record.side,
    )


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


def _draw_segments(size: int, seg: _Segments, sel: np.ndarray, reflex: float):
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
    seg = _vessel_tree(record.vessel_seed, _geometry(record), record.dr_grade == 4)
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


# --------------------------------------------------------------------------- dataset


def _dataset_records(count: int, seed: int) -> list[tuple[PhantomRecord, str]]:
    """(record, patient id): images 2k and 2k+1 are the right and left eye of one patient.

    The second eye has the first eye's DR grade with probability 0.6, else a fresh draw
    (both are draws from DR_GRADE_PROBS, so the grade shares stay as listed).
    """
    rng = np.random.default_rng(seed)
    out: list[tuple[PhantomRecord, str]] = []
    for i in range(count):
        laterality = "right" if i % 2 == 0 else "left"
        if i % 2 == 1 and rng.random() < 0.6:
            grade = out[-1][0].dr_grade
        else:
            grade = int(rng.choice(5, p=DR_GRADE_PROBS))
        record = sample_record(rng, f"phantom-{i:05d}", laterality=laterality, dr_grade=grade)
        out.append((record, f"phantom-p{i // 2:05d}"))
    return out


def _val_patients(n_patients: int, val_fraction: float, seed: int) -> set[int]:
    """Patients (both eyes) in the val split: a seeded shuffle, round(fraction * n)."""
    n_val = round(val_fraction * n_patients)
    if val_fraction > 0 and n_patients > 1:
        n_val = max(n_val, 1)
    order = np.random.default_rng([seed, 1]).permutation(n_patients)
    return {int(p) for p in order[:n_val]}


def _dataset_params(count: int, size: int, seed: int, val_fraction: float) -> dict[str, Any]:
    return {
        "generator": "medrl phantom",
        "version": PHANTOM_VERSION,
        "count": count,
        "size": size,
        "seed": seed,
        "val_fraction": val_fraction,
    }


def write_demo_dataset(
    out: str | os.PathLike,
    count: int = 384,
    size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> Path:
    """Write the phantom dataset to ``out`` and return the path of its data.csv.

    ``out`` gets images/phantom-NNNNN.png, data.csv (the generator CSV columns), phantom.jsonl
    (one record per line, with its image "path") and phantom.json (the parameters). All of
    it is written to a temporary sibling directory that is renamed into place at the end,
    so an interrupted run leaves nothing. An existing non-empty ``out`` is an error unless
    it is a complete phantom dataset with the same parameters (then it is kept as is).
    """
    if count < 1 or size < 16 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"bad phantom parameters: count={count} size={size} val={val_fraction}")
    out = Path(out)
    params = _dataset_params(count, size, seed, val_fraction)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            try:
                same = json.loads((out / _PARAMS_FILE).read_text()) == params
            except (OSError, ValueError):
                same = False
            if same and (out / "data.csv").is_file() and (out / "phantom.jsonl").is_file():
                print(f"phantom dataset already in {out} (same parameters): keeping it")
                return out / "data.csv"
            raise FileExistsError(
                f"{out}: directory is not empty and is not a phantom dataset with "
                f"count={count}, size={size}, seed={seed}, val_fraction={val_fraction}; "
                "choose another directory or remove it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling made with mkdir (not mkdtemp: the dataset keeps the umask's mode)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        records = _dataset_records(count, seed)
        val = _val_patients((count + 1) // 2, val_fraction, seed)
        rows, lines = [], []
        for i, (record, patient) in enumerate(
            tqdm(records, desc=f"phantom {size}px", unit="img", mininterval=1.0)
        ):
            rel = f"images/{record.id}.png"
            save_png(render(record, size), tmp / rel)
            split = "val" if i // 2 in val else "train"
            rows.append((rel, record.prompt, "fundus", split, "phantom", record.dr_grade,
                         record.laterality, patient))  # fmt: skip
            lines.append(json.dumps({"path": rel, **record.to_dict()}))
        with open(tmp / "data.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
        (tmp / "phantom.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / _PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        commit_folder(tmp, out)  # fsynced; out was empty (removed above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "data.csv"


def load_records(out: str | os.PathLike) -> list[PhantomRecord]:
    """The records of a phantom dataset directory (from its phantom.jsonl), in file order."""
    path = Path(out) / "phantom.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [PhantomRecord.from_dict(json.loads(line)) for line in fh if line.strip()]


# --------------------------------------------------------------------------- figures


def grid_figure(size: int, count: int, seed: int, ncols: int | None = None) -> np.ndarray:
    """A labelled grid of phantoms covering DR grades 0..4 in turn (the docs figures)."""
    rng = np.random.default_rng(seed)
    records = [sample_record(rng, f"grid-{i}", dr_grade=i % 5) for i in range(count)]
    images = [render(record, size) for record in records]
    if size < 128:  # make_grid fits about size / 6 characters under each image
        labels = [f"DR{r.dr_grade} {r.laterality[0].upper()} Q{r.quality_grade}" for r in records]
    else:
        labels = [
            f"DR{r.dr_grade}, {r.laterality} eye, CDR {r.cup_to_disc:.1f}, quality {r.quality_grade}"
            for r in records
        ]
    if ncols is None:
        rows = math.ceil(count / (8 if size <= 128 else 3))
        ncols = math.ceil(count / rows)
    return make_grid(images, ncols=ncols, labels=labels)
