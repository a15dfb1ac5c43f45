"""Procedural colour fundus phantom: the embedded demo dataset, with its ground truth.

Every image comes from a :class:`PhantomRecord`: eye, optic disc and cup, macula, a seed
for the vessel tree, diabetic retinopathy (DR) grade and lesions, image-quality defects
and the text prompt built from them. :func:`generators.phantom_render.render` draws the
record at any size (all geometry is stored as fractions of the image side, so one record
gives the same picture at 64 and at 512 px; the vessel tree is
:mod:`generators.phantom_vessels`), :func:`~generators.phantom_render.render_layers` the
ground-truth masks of the same drawing, :mod:`generators.phantom_dataset` writes the
demo dataset; :func:`generators.fundus_measure.measure` estimates the same attributes
from the pixels of any fundus-like image, without the record (the simulated expert uses
it to rate generated images).

Coordinates: ``x`` grows to the right, ``y`` downwards, both in [0, 1] of the image
side. A right eye has its optic disc on the viewer's right. docs/phantom.md has the
rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

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
