"""The learners ``rl.algorithm`` chooses among (docs/rl.md, "Learners").

Every learner is a :class:`rl.learner.Learner`: the same DeepSpeed engine over the UNet
with only the LoRA weights trainable, the same frozen text encoder, save/load and
checkpoints; they differ only in :meth:`~rl.learner.Learner.train`, the step that turns
an iteration's rewarded samples into optimizer steps, and in which samples the loop
hands them (:func:`stage_of`).

- ``ddpo``: DDPO's clipped policy gradient (:mod:`rl.learner`).
- ``filter_retrain``: supervised fine-tuning on the samples that pass the reward's gate,
  mixed with real pairs (:mod:`rl.learners.filter_retrain`).
- ``dpo``: Diffusion-DPO on preference pairs (:mod:`rl.learners.dpo`).
- ``feature_align``: ``filter_retrain`` plus Feature-Aligned Diffusion's alignment of the
  UNet's down-block features to the quality selector's (:mod:`rl.learners.feature_align`).

The denoising learners share :class:`rl.learners.base.RunLearner` (their constructor
and the states their losses are taken at, ``rl.denoise_states``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rl.config import RLConfig, RLRun
from rl.learner import Learner

#: algorithms that train only on the samples passing the reward's gate, every iteration
GATED = ("filter_retrain", "feature_align")


def learner_class(algorithm: str) -> type[Learner]:
    """The :class:`Learner` subclass of ``rl.algorithm``."""
    if algorithm == "ddpo":
        return Learner
    if algorithm == "filter_retrain":
        from rl.learners.filter_retrain import FilterRetrainLearner

        return FilterRetrainLearner
    if algorithm == "dpo":
        from rl.learners.dpo import DPOLearner

        return DPOLearner
    if algorithm == "feature_align":
        from rl.learners.feature_align import FeatureAlignLearner

        return FeatureAlignLearner
    raise ValueError(f"rl.algorithm: unknown learner {algorithm!r}")


def make_learner(
    cfg: RLRun,
    generator_dir: str | os.PathLike,
    inputs: dict[str, Any],
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Learner:
    """The learner ``cfg.rl.algorithm`` names over the generator at ``generator_dir``
    (``inputs``: the run's resolved inputs, :func:`rl.inputs.resolve_inputs`)."""
    cls = learner_class(cfg.rl.algorithm)
    if cls is Learner:
        return Learner(generator_dir, cfg.lora, cfg.sampling, cfg.rl, device=device, seed=seed)
    return cls(generator_dir, cfg, inputs, device=device, seed=seed)


def stage_of(rl: RLConfig, iteration: int) -> int:
    """Which samples iteration ``iteration`` trains on: 1 = every scored sample, 2 = those
    that pass the reward's gate. DDPO switches to 2 at ``rl.stage2_start``; the gated
    learners (:data:`GATED`) filter from the start; DPO needs the samples that fail as
    much as those that pass, so it never filters."""
    if rl.algorithm in GATED:
        return 2
    if rl.algorithm == "dpo":
        return 1
    return 2 if iteration >= rl.stage2_start else 1
