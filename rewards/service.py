"""The reward service: score generated images by sample id, in batches, on Ray.

A *reward* is anything with :class:`Reward`'s interface::

    reward.score(images, prompts, ids) -> ScoreResult   # scores and errors keyed by sample id

so the RL learner never knows which models produced a reward. Provided here:

- :class:`RewardModelScorer`: the trained selector and alignment policy (the output
  directory of ``medrl rewards train``); ``reward`` = (w_q quality + w_a alignment) /
  (w_q + w_a) and ``passed`` = quality >= threshold, weights and threshold from the
  config (``rewards.quality_weight``, ``rewards.alignment_weight``, ``rewards.threshold``);
- :class:`BrightnessReward` and :class:`SpatialReward`: pixel rewards a tiny generator can
  learn to raise, for RL tests.

:func:`build_reward` makes one from a spec string (``brightness``, ``spatial``, a
reward-models directory or ``models:DIR``). :class:`RewardService` wraps any reward for
Ray: :func:`start_reward_services` starts replicas as actors (a fractional GPU each where
the cluster has GPUs), :func:`score_with_services` splits a batch over them and merges the
results by id. :func:`serve_rewards` deploys the same class behind Ray Serve's HTTP proxy
on 127.0.0.1 for callers outside Ray.

Input checks are per sample: an image that is not (3, H, W) with H, W >= 8, holds NaN or
inf, or is far outside [-1, 1], an empty prompt or a duplicated id gets an error naming
the id, and the other samples are still scored (and score exactly as they would alone:
the models score images independently). Values slightly outside [-1, 1] are clamped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import ray
import torch
from PIL import Image

from generators.images import to_tensor, to_uint8
from generators.model import resolve_device
from rewards.config import RewardsConfig
from rewards.models import META_FILE, RewardModels, load_alignment, load_selector
from rewards.ood import WEIGHTS_FILE as OOD_WEIGHTS_FILE
from rewards.ood import OODGuard, selector_features

log = logging.getLogger(__name__)

#: smallest image side accepted (the ViT resizes anything to its own size)
MIN_SIDE = 8
#: pixel values within this distance of [-1, 1] are clamped; further out is an error
#: (an image in [0, 255] or [0, 1] scale given as [-1, 1] would otherwise score silently)
RANGE_TOLERANCE = 0.5
#: largest side of a PNG accepted by the HTTP endpoint
MAX_HTTP_SIDE = 4096
#: hosts the Serve endpoint binds without ``allow_public``
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SIMPLE_REWARDS = ("brightness", "spatial")


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


def _as_list(values: Any, what: str) -> list[Any]:
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
    out = _as_list(ids, "ids")
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


def validate_batch(
    images: Any, prompts: Sequence[str], ids: Sequence[str]
) -> tuple[ValidBatch, dict[str, str]]:
    """Split a call into the valid samples and per-id error messages.

    Raises ValueError only for what cannot be attributed to a sample: lengths that differ,
    an id that is not a non-empty string, images that are neither a batch nor a sequence.
    """
    ids = check_ids(ids)
    prompts = _as_list(prompts, "prompts")
    if len(prompts) != len(ids):
        raise ValueError(f"{len(prompts)} prompts but {len(ids)} ids")
    items = split_images(images, len(ids))
    counts = Counter(ids)
    valid = ValidBatch([], [], [])
    errors: dict[str, str] = {}
    for sid, prompt, image in zip(ids, prompts, items, strict=True):
        problems = []
        if counts[sid] > 1:
            problems.append(
                f"id given {counts[sid]} times in one call (ids must be unique; no sample "
                "with this id is scored)"
            )
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


# --------------------------------------------------------------------------- rewards


class BatchedReward:
    """Validation, id bookkeeping and mini-batching shared by the rewards of this module.

    Subclasses set ``name`` and implement :meth:`score_images` on valid samples. If a
    mini-batch fails in the model (e.g. out of memory), its samples are scored one by one
    and those that still fail get an error naming their id; if every one fails, the
    first exception is raised (the reward itself is broken, not the input).
    """

    name: str = "reward"
    batch_size: int = 64

    def score(self, images: Any, prompts: Sequence[str], ids: Sequence[str]) -> ScoreResult:
        valid, errors = validate_batch(images, prompts, ids)
        scores: dict[str, RewardScore] = {}
        for start in range(0, len(valid), self.batch_size):
            part = slice(start, start + self.batch_size)
            scores.update(
                self._score_part(valid.ids[part], valid.images[part], valid.prompts[part], errors)
            )
        return ScoreResult(scores, errors)

    def _score_part(
        self,
        ids: list[str],
        images: list[torch.Tensor],
        prompts: list[str],
        errors: dict[str, str],
    ) -> dict[str, RewardScore]:
        try:
            return dict(zip(ids, self.score_images(images, prompts), strict=True))
        except Exception as exc:
            if len(ids) == 1:
                raise
            log.warning(
                "%s: scoring %d samples failed (%s: %s); scoring them one by one",
                self.name, len(ids), type(exc).__name__, exc,
            )  # fmt: skip
            first = exc
        out: dict[str, RewardScore] = {}
        for sid, image, prompt in zip(ids, images, prompts, strict=True):
            try:
                out[sid] = self.score_images([image], [prompt])[0]
            except Exception as exc:
                errors[sid] = f"sample {sid!r}: scoring failed: {type(exc).__name__}: {exc}"
        if not out:
            raise first
        return out

    def score_images(self, images: list[torch.Tensor], prompts: list[str]) -> list[RewardScore]:
        """Scores of valid (3, H, W) images in [-1, 1] with non-empty prompts, in order."""
        raise NotImplementedError


def _passed(value: float, threshold: float | None) -> bool:
    return True if threshold is None else value >= threshold


class BrightnessReward(BatchedReward):
    """Mean brightness of the image, (x + 1) / 2 averaged over pixels and channels: [0, 1].

    ``quality`` = ``reward``, ``alignment`` = NaN (no prompt is read); ``passed`` =
    reward >= ``threshold``, always True without one.
    """

    def __init__(self, threshold: float | None = None, batch_size: int = 64):
        self.threshold = None if threshold is None else float(threshold)
        self.batch_size = int(batch_size)
        self.name = "brightness" if threshold is None else f"brightness:{self.threshold:g}"

    def score_images(self, images: list[torch.Tensor], prompts: list[str]) -> list[RewardScore]:
        out = []
        for x in images:
            value = float(x.mean().add(1.0).div(2.0))
            out.append(RewardScore(value, value, float("nan"), _passed(value, self.threshold)))
        return out


class SpatialReward(BatchedReward):
    """Left half brighter than right half: 0.5 + (B_left - B_right) / 2, in [0, 1].

    B is the mean brightness (x + 1) / 2 of the left W // 2 columns and of the right
    W // 2 columns (the middle column of an odd width counts for neither). 1: left half
    white, right half black; 0.5: balanced; 0: the reverse. (The raw difference
    B_left - B_right in [-1, 1] is rescaled to [0, 1] so that ``quality`` and a threshold
    read like the selector's.) ``alignment`` = NaN; ``passed`` as for
    :class:`BrightnessReward`.
    """

    def __init__(self, threshold: float | None = None, batch_size: int = 64):
        self.threshold = None if threshold is None else float(threshold)
        self.batch_size = int(batch_size)
        self.name = "spatial" if threshold is None else f"spatial:{self.threshold:g}"

    def score_images(self, images: list[torch.Tensor], prompts: list[str]) -> list[RewardScore]:
        out = []
        for x in images:
            half = x.shape[-1] // 2
            left = float(x[..., :half].mean().add(1.0).div(2.0))
            right = float(x[..., x.shape[-1] - half :].mean().add(1.0).div(2.0))
            value = 0.5 + (left - right) / 2.0
            out.append(RewardScore(value, value, float("nan"), _passed(value, self.threshold)))
        return out


class RewardModelScorer(BatchedReward):
    """The trained selector and alignment policy as a :class:`Reward`.

    Loads ``models_dir/selector`` and ``models_dir/alignment`` (the output directory of
    ``medrl rewards train``) and scores in mini-batches of ``batch_size`` without
    gradients: ``quality`` (selector), ``alignment`` (policy), ``reward`` = (w_q quality
    + w_a alignment) / (w_q + w_a), ``passed`` = quality >= ``threshold``. The weights
    and the threshold are the caller's (the config's), not the ones stored at training.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike,
        quality_weight: float = 0.5,
        alignment_weight: float = 0.5,
        threshold: float = 0.25,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        ood_weight: float = 0.0,
    ):
        models_dir = Path(models_dir)
        for part in ("selector", "alignment"):
            if not (models_dir / part / META_FILE).is_file():
                raise FileNotFoundError(
                    f"{models_dir}: no reward model in {part}/ (expected the output directory "
                    "of `medrl rewards train`, holding selector/ and alignment/)"
                )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.models = RewardModels(
            load_selector(models_dir / "selector", self.device),
            load_alignment(models_dir / "alignment", self.device),
            threshold=threshold,
            quality_weight=quality_weight,
            alignment_weight=alignment_weight,
        )
        self.models_dir = models_dir
        self.quality_weight, self.alignment_weight = float(quality_weight), float(alignment_weight)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self.name = f"models:{models_dir}"
        self.ood_weight = float(ood_weight)
        self.guard = OODGuard.load(models_dir) if self.ood_weight > 0 else None
        if self.ood_weight > 0 and self.guard is None:
            log.warning(
                "%s: no OOD guard (%s) beside the reward models: rewards.ood_weight is "
                "ignored (`medrl rewards train` fits one)", models_dir, OOD_WEIGHTS_FILE
            )  # fmt: skip
        stored = _read_meta(models_dir / "selector")
        if stored and (
            stored.get("threshold") not in (None, self.threshold)
            or stored.get("reward_weights", {}).get("quality") not in (None, quality_weight)
            or stored.get("reward_weights", {}).get("alignment") not in (None, alignment_weight)
        ):
            log.info(
                "%s: scoring with threshold %g and weights %g / %g (config); the models were "
                "trained with threshold %s and weights %s",
                models_dir, self.threshold, quality_weight, alignment_weight,
                stored.get("threshold"), stored.get("reward_weights"),
            )  # fmt: skip

    @classmethod
    def from_config(
        cls,
        models_dir: str | os.PathLike,
        cfg: RewardsConfig,
        device: str | torch.device = "cpu",
    ) -> RewardModelScorer:
        """Weights, threshold and batch size from ``cfg`` (``rewards.*``)."""
        return cls(
            models_dir,
            quality_weight=cfg.quality_weight,
            alignment_weight=cfg.alignment_weight,
            threshold=cfg.threshold,
            batch_size=cfg.service_batch_size,
            device=device,
            ood_weight=cfg.ood_weight,
        )

    def score_images(self, images: list[torch.Tensor], prompts: list[str]) -> list[RewardScore]:
        out: dict[int, RewardScore] = {}
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, x in enumerate(images):
            by_shape[tuple(x.shape)].append(i)
        for idx in by_shape.values():  # each image is scored independently of the others
            batch = torch.stack([images[i] for i in idx])
            s = self.models.score(batch, [prompts[i] for i in idx])
            if self.guard is not None:  # images unlike the rated pool lose reward
                s["reward"] = s["reward"] - self.guard.penalty(
                    self.selector_features(batch), self.ood_weight
                ).to(s["reward"])
            q, a, r, p = (s[k].cpu().tolist() for k in ("quality", "alignment", "reward", "passed"))
            for k, i in enumerate(idx):
                out[i] = RewardScore(float(r[k]), float(q[k]), float(a[k]), bool(p[k]))
        return [out[i] for i in range(len(images))]

    def selector_features(self, images: torch.Tensor) -> torch.Tensor:
        """The selector's image features (what the OOD guard measures)."""
        return selector_features(self.models.selector, images, self.batch_size)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- specs, config


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: ``kind`` brightness / spatial (with an optional threshold) or
    models (with the directory)."""

    kind: str
    threshold: float | None = None
    path: str | None = None


def parse_spec(spec: str) -> RewardSpec:
    """``brightness[:T]``, ``spatial[:T]``, ``models:DIR`` or an existing directory.

    ValueError names the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec {spec!r}: empty")
    text = spec.strip()
    name, sep, arg = text.partition(":")
    if name.lower() in SIMPLE_REWARDS:
        if not sep:
            return RewardSpec(name.lower())
        try:
            threshold = float(arg)
        except ValueError:
            threshold = float("nan")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(
                f"reward spec {spec!r}: the threshold after {name}: must be a number in [0, 1]"
            )
        return RewardSpec(name.lower(), threshold=threshold)
    if name.lower() == "models" and sep:
        path = arg.strip()
        if not path:
            raise ValueError(f"reward spec {spec!r}: no directory after models:")
        if not Path(path).is_dir():
            raise ValueError(f"reward spec {spec!r}: {path} is not a directory")
        return RewardSpec("models", path=path)
    if Path(text).is_dir():
        return RewardSpec("models", path=text)
    raise ValueError(
        f"reward spec {spec!r} is not one of: brightness[:THRESHOLD], spatial[:THRESHOLD], "
        "models:DIR, or an existing reward-models directory (the output of `medrl rewards "
        "train`, holding selector/ and alignment/)"
    )


def rewards_config(cfg: RewardsConfig | Mapping[str, Any] | None) -> RewardsConfig:
    """A RewardsConfig from itself, None (the defaults) or a nested dict (unknown keys named)."""
    if cfg is None:
        return RewardsConfig()
    if isinstance(cfg, RewardsConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return _from_dict(RewardsConfig, cfg, "rewards")
    raise TypeError(f"cfg must be a RewardsConfig or a dict, not {type(cfg).__name__}")


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown key {prefix}.{unknown[0]}; allowed keys under {prefix}: "
            + ", ".join(sorted(known))
        )
    kwargs = {}
    for key, value in data.items():
        factory = known[key].default_factory
        if factory is not MISSING and is_dataclass(factory) and isinstance(value, Mapping):
            value = _from_dict(factory, value, f"{prefix}.{key}")  # type: ignore[arg-type]
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def build_reward(
    spec: str,
    cfg: RewardsConfig | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Reward:
    """The reward a spec names.

    - ``brightness`` / ``spatial``: :class:`BrightnessReward` / :class:`SpatialReward`;
      every sample passes, unless a threshold follows (``brightness:0.4``). The config's
      ``threshold`` is the selector's and is not applied to them.
    - ``models:DIR`` or a directory: :class:`RewardModelScorer` with the weights,
      threshold and batch size of ``cfg`` (``rewards.*``).
    """
    cfg = rewards_config(cfg)
    parsed = parse_spec(spec)
    if parsed.kind == "brightness":
        return BrightnessReward(threshold=parsed.threshold, batch_size=cfg.service_batch_size)
    if parsed.kind == "spatial":
        return SpatialReward(threshold=parsed.threshold, batch_size=cfg.service_batch_size)
    return RewardModelScorer.from_config(str(parsed.path), cfg, device=device)


# --------------------------------------------------------------------------- the service


class RewardService:
    """Any :class:`Reward`, as a Ray actor / Serve replica: ``score``, ``score_json``, ``info``.

    ``spec`` is a reward spec (:func:`build_reward`) or a reward object; ``cfg`` a
    RewardsConfig or its dict; ``device`` ``cpu``, ``cuda[:N]`` or ``auto``.
    """

    def __init__(
        self,
        spec: str | Reward,
        cfg: RewardsConfig | Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.cfg = rewards_config(cfg)
        self.device = resolve_device(device)
        if isinstance(spec, str):
            self.spec = spec
            self.reward: Reward = build_reward(spec, self.cfg, self.device)
        elif callable(getattr(spec, "score", None)):
            self.reward = spec
            self.spec = getattr(spec, "name", type(spec).__name__)
        else:
            raise TypeError(f"spec must be a reward spec string or a Reward, not {spec!r}")
        self.name: str = getattr(self.reward, "name", type(self.reward).__name__)
        self._calls = self._scored = self._errors = 0
        self._seconds = 0.0
        log.info("reward service ready: %s on %s (pid %d)", self.name, self.device, os.getpid())

    def score(self, images: Any, prompts: Sequence[str], ids: Sequence[str]) -> ScoreResult:
        started = time.perf_counter()
        with torch.no_grad():
            result = self.reward.score(images, prompts, ids)
        self._seconds += time.perf_counter() - started
        self._calls += 1
        self._scored += len(result.scores)
        self._errors += len(result.errors)
        return result

    def score_json(self, payload: Any) -> dict[str, Any]:
        """``{"ids", "prompts", "images": [base64 PNG]}`` -> ``{"scores", "errors"}``.

        A PNG that does not decode is an error for its id; a body of the wrong form is a
        ValueError naming the key.
        """
        if not isinstance(payload, Mapping):
            raise ValueError(
                'the body must be a JSON object {"ids": [...], "prompts": [...], "images": [...]}'
            )
        missing = [k for k in ("ids", "prompts", "images") if k not in payload]
        if missing:
            raise ValueError(f"the body lacks key {missing[0]!r} (needs ids, prompts, images)")
        unknown = sorted(set(payload) - {"ids", "prompts", "images"})
        if unknown:
            raise ValueError(
                f"unknown key {unknown[0]!r} in the body (allowed: ids, prompts, images)"
            )
        for key in ("ids", "prompts", "images"):
            if not isinstance(payload[key], list):
                raise ValueError(f"{key!r} must be a JSON list, not {type(payload[key]).__name__}")
        images = [decode_image(item) for item in payload["images"]]
        return self.score(images, payload["prompts"], payload["ids"]).to_json()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "device": str(self.device),
            "batch_size": getattr(self.reward, "batch_size", None),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "calls": self._calls,
            "scored": self._scored,
            "errors": self._errors,
            "seconds_scoring": round(self._seconds, 3),
        }

    def ready(self) -> bool:
        """Returns once the replica is constructed (models loaded)."""
        return True


#: the service as a Ray actor class: ``RewardServiceActor.options(num_gpus=0.25).remote(spec, cfg)``
RewardServiceActor = ray.remote(RewardService)


def _share_gpus(num_gpus: float, device: str | None) -> tuple[float, str]:
    """(GPU share per replica, its device): a share only where the Ray cluster has GPUs.

    ``device`` None or ``auto``: CUDA with a share, else CPU; ``cpu``: no share.
    """
    auto = device is None or str(device) == "auto"
    if not auto and torch.device(device).type == "cpu":
        return 0.0, "cpu"
    if num_gpus > 0 and float(ray.cluster_resources().get("GPU", 0.0)) > 0:
        return float(num_gpus), "cuda" if auto else str(device)
    return 0.0, "cpu" if auto else str(device)


def start_reward_services(
    spec: str | Reward,
    cfg: RewardsConfig | Mapping[str, Any] | None = None,
    replicas: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    device: str | None = None,
) -> list[Any]:
    """Start ``replicas`` reward service actors (default ``rewards.service_replicas``).

    Each gets ``num_gpus`` (default ``rewards.service_num_gpus``, fractional: replicas
    share a GPU) where the Ray cluster has GPUs and scores on CUDA; without GPUs it runs
    on CPU with ``num_cpus``. Ray must be running (``ray.init``). Returns once every
    replica has loaded its models; a bad spec is a ValueError before anything starts.
    Actors restart (twice) if their process dies, and a call in flight is retried
    (scoring has no side effects).
    """
    if not ray.is_initialized():
        raise RuntimeError("Ray is not running in this process: call ray.init(...) first")
    cfg = rewards_config(cfg)
    if isinstance(spec, str):
        parse_spec(spec)
    replicas = cfg.service_replicas if replicas is None else int(replicas)
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    gpus, dev = _share_gpus(cfg.service_num_gpus if num_gpus is None else num_gpus, device)
    actor = RewardServiceActor.options(
        num_cpus=num_cpus,
        num_gpus=gpus,
        max_restarts=2,
        max_task_retries=2,
        # placed by the cluster, never inside the caller's placement group (a Ray Tune
        # trial's holds only its driver function)
        scheduling_strategy="DEFAULT",
    )
    handles = [actor.remote(spec, cfg, dev) for _ in range(replicas)]
    ray.get([h.ready.remote() for h in handles])
    log.info(
        "%d reward service replica(s) of %s on %s (%g GPU, %g CPU each)",
        replicas, spec if isinstance(spec, str) else type(spec).__name__, dev, gpus, num_cpus,
    )  # fmt: skip
    return handles


def score_with_services(
    handles: Sequence[Any],
    images: Any,
    prompts: Sequence[str],
    ids: Sequence[str],
    batch_size: int | None = None,
) -> ScoreResult:
    """Score a batch over reward service replicas and merge the results by id.

    The batch is cut into calls of ``batch_size`` samples (default: an equal share per
    replica) dealt round robin to the replicas, which score in parallel. Ids are checked
    for duplicates over the whole batch first (a duplicate is an error for its id).
    """
    if not handles:
        raise ValueError("no reward service replicas to score with")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = check_ids(ids)
    prompts = _as_list(prompts, "prompts")
    if len(prompts) != len(ids):
        raise ValueError(f"{len(prompts)} prompts but {len(ids)} ids")
    items = split_images(images, len(ids))
    counts = Counter(ids)
    errors = {
        sid: f"sample {sid!r}: id given {n} times in one call (ids must be unique; no sample "
        "with this id is scored)"
        for sid, n in counts.items()
        if n > 1
    }
    keep = [i for i, sid in enumerate(ids) if counts[sid] == 1]
    size = batch_size or max(1, math.ceil(len(keep) / len(handles)))
    refs = []
    for k, start in enumerate(range(0, len(keep), size)):
        part = keep[start : start + size]
        refs.append(
            handles[k % len(handles)].score.remote(
                _pack([items[i] for i in part]), [prompts[i] for i in part], [ids[i] for i in part]
            )
        )
    merged = ScoreResult.merge(ray.get(refs))
    merged.errors.update(errors)
    return merged


def _pack(items: list[Any]) -> Any:
    """Same-shape tensors as one (N, 3, H, W) tensor (one buffer to ship); else the list.

    Tensors are copied: a pickled view carries its whole storage (the full batch).
    """
    if items and all(isinstance(x, torch.Tensor) for x in items):
        if len({tuple(x.shape) for x in items}) == 1 and items[0].dim() == 3:
            return torch.stack([x.detach().cpu() for x in items])
    return [x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x for x in items]


# --------------------------------------------------------------------------- HTTP (Ray Serve)


def encode_image(image: torch.Tensor | np.ndarray) -> str:
    """(3, H, W) float in [-1, 1] (or uint8 (H, W, 3)) -> base64 PNG, for the HTTP endpoint."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        array = image
    else:
        array = to_uint8(torch.as_tensor(image))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(item: Any) -> torch.Tensor | InvalidImage:
    """base64 PNG (or JPEG; a ``data:`` URL prefix is fine) -> (3, H, W) in [-1, 1]."""
    if not isinstance(item, str):
        return InvalidImage(f"image is a JSON {type(item).__name__}, not a base64 PNG string")
    text = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        return InvalidImage(f"image is not valid base64 ({exc})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_HTTP_SIDE:
                return InvalidImage(
                    f"image is {im.size[0]}x{im.size[1]}; at most {MAX_HTTP_SIDE} a side"
                )
            im.load()
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for broken data
        return InvalidImage(f"image does not decode as PNG ({type(exc).__name__}: {exc})")
    return to_tensor(array)


class RewardHTTPService(RewardService):
    """:class:`RewardService` behind Ray Serve's HTTP proxy.

    POST a JSON body ``{"ids": [...], "prompts": [...], "images": [base64 PNG, ...]}``:
    200 with ``{"scores": {id: {"reward", "quality", "alignment", "passed"}}, "errors":
    {id: message}}`` (an alignment of null means none: a simple reward); a body of the
    wrong form: 400 ``{"error": message}``. GET: the replica's :meth:`info`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # one scoring call at a time per replica

    def _score_json_locked(self, payload: Any) -> dict[str, Any]:
        with self._lock:
            return self.score_json(payload)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse(self.info())
        if request.method != "POST":
            return JSONResponse({"error": "use POST with a JSON body, or GET for info"}, 405)
        try:
            payload = await request.json()
        except Exception as exc:  # starlette raises JSONDecodeError / UnicodeDecodeError
            return JSONResponse({"error": f"the body is not JSON ({exc})"}, 400)
        try:
            # in a worker thread: the replica's event loop keeps answering health checks
            return JSONResponse(await asyncio.to_thread(self._score_json_locked, payload))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)


def check_host(host: str, allow_public: bool = False) -> None:
    """Refuse a non-loopback host unless ``allow_public`` (the security default)."""
    if host in LOCAL_HOSTS:
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and not allow_public:
            raise ValueError(
                "RAY_SERVE_ENABLE_HA_PROXY=1 makes Ray Serve bind all interfaces whatever "
                "host is asked for; unset it, or pass allow_public=True (--allow-public)"
            )
        return
    if not allow_public:
        raise ValueError(
            f"refusing to serve rewards on host {host!r}: the reward service binds "
            f"127.0.0.1 (or localhost) unless allow_public=True (--allow-public) is given; "
            "anything that can reach the port can use it, so put authentication in front"
        )
    log.warning(
        "serving rewards on %s: reachable from other machines, without authentication", host
    )


def serve_rewards(
    spec: str,
    cfg: RewardsConfig | Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_public: bool = False,
    replicas: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    device: str | None = None,
    route_prefix: str = "/score",
    name: str = "medrl-rewards",
    blocking: bool = False,
) -> str:
    """Deploy :class:`RewardHTTPService` on Ray Serve at ``http://host:port/score``.

    Starts Ray (``ray.init()``) if it is not running. Serve's HTTP options are cluster
    wide: if Serve already runs with another host or port, that is an error (shut it down
    with ``serve.shutdown()``). Returns the URL; ``blocking`` serves until Ctrl-C.
    """
    check_host(host, allow_public)
    cfg = rewards_config(cfg)
    parse_spec(spec)
    try:
        from ray import serve
    except ImportError as exc:
        raise RuntimeError(
            f"Ray Serve is not installed ({exc}); install it with: pip install 'ray[serve]'"
        ) from exc

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": int(port)})
    _check_serve_http(host, int(port))
    gpus, dev = _share_gpus(cfg.service_num_gpus if num_gpus is None else num_gpus, device)
    app = serve.deployment(
        RewardHTTPService,
        name="RewardService",
        num_replicas=cfg.service_replicas if replicas is None else int(replicas),
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": gpus},
    ).bind(spec, cfg, dev)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{int(port)}{route_prefix}"
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    log.info("reward service %s on %s (%s)", spec, url, dev)
    if blocking:
        print(f"serving rewards ({spec}) on {url}; Ctrl-C stops", flush=True)
        _wait_for_interrupt()
        serve.delete(name)
        print("stopped", flush=True)
    return url


def _wait_for_interrupt() -> None:
    """Sleep until Ctrl-C or SIGTERM (so a killed server still takes its app down)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _check_serve_http(host: str, port: int) -> None:
    """Serve keeps the HTTP options of its first start: make sure they are ours."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        actual = (config.host, int(config.port))
    except Exception as exc:  # a private API: if it moves, the check is skipped
        log.debug("could not read Serve's HTTP config: %s", exc)
        return
    if actual != (host, port):
        raise RuntimeError(
            f"Ray Serve is already running with HTTP host {actual[0]} port {actual[1]}, not "
            f"{host} port {port}; stop it first (serve.shutdown() or `serve shutdown`)"
        )
