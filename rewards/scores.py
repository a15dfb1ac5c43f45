"""What a reward returns and what it accepts: the :class:`Reward` interface, its results
(:class:`RewardScore`, :class:`ScoreResult`, keyed by sample id) and the per-sample input
checks every reward runs once, at its boundary (:func:`validate_batch`).

Input checks are per sample: an image that is not (3, H, W) with H, W >= 8, holds NaN or
inf, or is far outside [-1, 1], an empty prompt or a duplicated id gets an error naming
the id, and the other samples are still scored (and score exactly as they would alone:
the models score images independently). Values slightly outside [-1, 1] are clamped.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)


#: smallest image side accepted (the ViT resizes anything to its own size)
MIN_SIDE = 8
#: pixel values within this distance of [-1, 1] are clamped; further out is an error
#: (an image in [0, 255] or [0, 1] scale given as [-1, 1] would otherwise score silently)
RANGE_TOLERANCE = 0.5

# --------------------------------------------------------------------------- interface


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class RewardScore:
    """One sample's reward."""

    reward: float  # combined reward used by the learner
    quality: float  # selector score in [0, 1] (simple rewards: same as reward)
    alignment: float  # alignment score in [0, 1] (simple rewards: float('nan'))
    passed: bool  # quality >= threshold (stage-2 gate); simple rewards: True unless a threshold is given

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (NaN, which JSON lacks, becomes null)."""
        return {
            "reward": _json_float(self.reward),
            "quality": _json_float(self.quality),
            "alignment": _json_float(self.alignment),
            "passed": bool(self.passed),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RewardScore:
        def num(key: str) -> float:
            value = data.get(key)
            return float("nan") if value is None else float(value)

        return cls(num("reward"), num("quality"), num("alignment"), bool(data["passed"]))


@dataclass
class ScoreResult:
    """Scores and errors of one ``score`` call, both keyed by sample id."""

    scores: dict[str, RewardScore]  # sample id -> score
    errors: dict[str, str]  # sample id -> message naming the id and the problem

    @staticmethod
    def merge(results: Sequence[ScoreResult]) -> ScoreResult:
        """One result from several (of disjoint id sets)."""
        merged = ScoreResult({}, {})
        for result in results:
            merged.scores.update(result.scores)
            merged.errors.update(result.errors)
        return merged

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": {sid: s.to_json() for sid, s in self.scores.items()},
            "errors": dict(self.errors),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreResult:
        return cls(
            {sid: RewardScore.from_json(s) for sid, s in data.get("scores", {}).items()},
            dict(data.get("errors", {})),
        )


@runtime_checkable
class Reward(Protocol):
    """What the learner sees: a name and ``score(images, prompts, ids) -> ScoreResult``.

    ``images``: a float tensor / ndarray (N, 3, H, W) in [-1, 1], or a sequence of N
    (3, H, W) arrays / tensors; ``prompts`` and ``ids`` (unique, non-empty strings): N each.
    """

    name: str

    def score(self, images: Any, prompts: Sequence[str], ids: Sequence[str]) -> ScoreResult: ...


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class InvalidImage:
    """Stands in for an image that could not even be read (e.g. a bad PNG over HTTP)."""

    reason: str


@dataclass
class ValidBatch:
    """The samples that passed validation, in input order, as (3, H, W) float32 CPU tensors."""

    ids: list[str]
    prompts: list[str]
    images: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)


def as_list(values: Any, what: str) -> list[Any]:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{what} must be a sequence with one entry per sample, not one string")
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return list(values.tolist())
    try:
        return list(values)
    except TypeError:
        raise ValueError(
            f"{what} must be a sequence with one entry per sample, not {type(values).__name__}"
        ) from None


def check_ids(ids: Sequence[str]) -> list[str]:
    """ids as a list; every id must be a non-empty string (duplicates are per-sample errors)."""
    out = as_list(ids, "ids")
    for i, sid in enumerate(out):
        if not isinstance(sid, str) or not sid.strip():
            raise ValueError(
                f"sample ids must be non-empty strings; the id at position {i} is {sid!r}"
            )
    return out


def split_images(images: Any, n: int) -> list[Any]:
    """The N per-sample images of a batch tensor / ndarray (N, 3, H, W) or a sequence."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"images must be (N, 3, H, W) or a sequence of N (3, H, W) images; got a "
                f"tensor of shape {tuple(images.shape)}"
            )
        items: list[Any] = list(images.unbind(0))
    elif isinstance(images, np.ndarray) and images.dtype != object:
        if images.ndim != 4:
            raise ValueError(
                f"images must be (N, 3, H, W) or a sequence of N (3, H, W) images; got an "
                f"array of shape {images.shape}"
            )
        items = list(images)
    elif isinstance(images, (str, bytes)) or not isinstance(images, (Sequence, np.ndarray)):
        raise ValueError(
            "images must be a tensor / array (N, 3, H, W) or a sequence of N (3, H, W) "
            f"images, not {type(images).__name__}"
        )
    else:
        items = list(images)
    if len(items) != n:
        raise ValueError(f"{len(items)} images but {n} ids")
    return items


def as_image(image: Any) -> torch.Tensor:
    """One sample -> float32 CPU tensor (3, H, W) in [-1, 1]; ValueError says what is wrong."""
    if isinstance(image, InvalidImage):
        raise ValueError(image.reason)
    if image is None:
        raise ValueError("no image")
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "fiub":
            raise ValueError(f"image has dtype {image.dtype}, not a number type")
        x = torch.from_numpy(np.array(image, dtype=np.float32, copy=True))
    elif isinstance(image, torch.Tensor):
        if image.is_complex():
            raise ValueError(f"image has dtype {image.dtype}, not a real number type")
        x = image.detach().to(device="cpu", dtype=torch.float32)
    else:
        raise ValueError(f"image is a {type(image).__name__}, not an array or tensor")
    shape = tuple(x.shape)
    if x.dim() != 3 or shape[0] != 3 or shape[1] < MIN_SIDE or shape[2] < MIN_SIDE:
        raise ValueError(
            f"image has shape {shape}; expected (3, H, W) with H, W >= {MIN_SIDE} "
            "(channels first, RGB)"
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"image has {bad} non-finite pixel value{'s' if bad > 1 else ''} (NaN or inf)"
        )
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"pixel values span [{lo:.4g}, {hi:.4g}]; expected [-1, 1] (values within "
            f"{RANGE_TOLERANCE} of it are clamped; an image in [0, 255] must be rescaled "
            "first)"
        )
    return x.clamp(-1.0, 1.0)


def split_call(
    images: Any, prompts: Sequence[str], ids: Sequence[str]
) -> tuple[list[str], list[Any], list[Any], Counter[str]]:
    """A call's ids, prompts and per-sample images as lists, and how often each id occurs.

    Raises ValueError only for what cannot be attributed to a sample: lengths that differ,
    an id that is not a non-empty string, images that are neither a batch nor a sequence.
    """
    ids = check_ids(ids)
    prompts = as_list(prompts, "prompts")
    if len(prompts) != len(ids):
        raise ValueError(f"{len(prompts)} prompts but {len(ids)} ids")
    return ids, prompts, split_images(images, len(ids)), Counter(ids)


def duplicate_id(sid: str, count: int) -> str:
    """The problem of an id given more than once in one call."""
    return (
        f"id given {count} times in one call (ids must be unique; no sample with this id is scored)"
    )


def validate_batch(
    images: Any, prompts: Sequence[str], ids: Sequence[str]
) -> tuple[ValidBatch, dict[str, str]]:
    """Split a call into the valid samples and per-id error messages (the call's own
    problems raise ValueError: :func:`split_call`)."""
    ids, prompts, items, counts = split_call(images, prompts, ids)
    valid = ValidBatch([], [], [])
    errors: dict[str, str] = {}
    for sid, prompt, image in zip(ids, prompts, items, strict=True):
        problems = [duplicate_id(sid, counts[sid])] if counts[sid] > 1 else []
        if not isinstance(prompt, str):
            problems.append(f"prompt is a {type(prompt).__name__}, not a string")
        elif not prompt.strip():
            problems.append("empty prompt")
        try:
            x = as_image(image)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            errors.setdefault(sid, f"sample {sid!r}: " + "; ".join(problems))
            continue
        valid.ids.append(sid)
        valid.prompts.append(prompt)
        valid.images.append(x)
    return valid, errors
