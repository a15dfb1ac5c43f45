"""The rewards medrl provides, and the spec that names one.

- :class:`RewardModelScorer`: the trained selector and alignment policy (the output
  directory of ``medrl rewards train``); ``reward`` = (w_q quality + w_a alignment) /
  (w_q + w_a) and ``passed`` = quality >= threshold, weights and threshold from the
  config (``rewards.quality_weight``, ``rewards.alignment_weight``, ``rewards.threshold``);
- :class:`BrightnessReward` and :class:`SpatialReward`: pixel rewards a tiny generator can
  learn to raise, for RL tests.

:func:`build_reward` makes one from a spec string (``brightness``, ``spatial``, a
reward-models directory or ``models:DIR``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generators.model import resolve_device
from rewards.config import RewardsConfig
from rewards.models import META_FILE, AlignmentPolicy, QualitySelector, RewardModels
from rewards.ood import WEIGHTS_FILE as OOD_WEIGHTS_FILE
from rewards.ood import OODGuard, selector_features
from rewards.scores import Reward, RewardScore, ScoreResult, validate_batch
from runfiles.config import build

log = logging.getLogger(__name__)


#: the pixel rewards a spec names by word
SIMPLE_REWARDS = ("brightness", "spatial")

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
            QualitySelector.from_pretrained(models_dir / "selector", self.device),
            AlignmentPolicy.from_pretrained(models_dir / "alignment", self.device),
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


def load_selector(
    path: str | os.PathLike, key: str, device: str | torch.device = "cpu"
) -> QualitySelector:
    """The quality selector at ``path`` (a selector checkpoint directory, or a reward-models
    directory holding ``selector/``), frozen in eval mode: Feature-Aligned Diffusion's
    expert. A path holding neither is a FileNotFoundError naming ``key``."""
    path = Path(path)
    for folder in (path, path / "selector"):
        if (folder / META_FILE).is_file():
            model = QualitySelector.from_pretrained(folder, device)
            return model.requires_grad_(False).eval()
    raise FileNotFoundError(
        f"{key}: {path} holds no quality selector (expected a selector checkpoint directory "
        "or the output directory of `medrl rewards train`, holding selector/)"
    )


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
        return build(RewardsConfig, cfg, "rewards")
    raise TypeError(f"cfg must be a RewardsConfig or a dict, not {type(cfg).__name__}")


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
