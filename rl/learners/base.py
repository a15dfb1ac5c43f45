"""What the learners other than DDPO share (rl/learners): the constructor over the whole
run config, and the states their denoising losses are computed at.

``rl.denoise_states`` chooses those states for a drawn sample with DDIM trajectory
x_T ... x_0 (``Trajectories.latents``):

- ``trajectory``: a state the sampler visited, x_{t_j} at one of the DDIM steps the
  policy gradient trains on (``Learner.trained_steps``), with the target the noise
  eps* = (x_{t_j} - sqrt(a_t) x_0) / sqrt(1 - a_t) that relates it to the sample's final
  latent: lowering the error there moves the sampler's own prediction of x_0 from that
  state towards the sample;
- ``forward``: ``medrl finetune``'s loss: x_0 noised with fresh noise at a timestep drawn
  from the whole training schedule. States the sampler visits only when the UNet already
  denoises its own samples (a trained generator).
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import torch

from generators.training_common import NoisedLatents, noise_latents, noised_at
from rl.config import RLRun
from rl.learner import Learner


class RunLearner(Learner):
    """A :class:`~rl.learner.Learner` built from the whole run config ``run`` (what a
    learner other than DDPO reads beyond ``lora``, ``sampling`` and ``rl``) and the run's
    resolved ``inputs`` (:func:`rl.inputs.resolve_inputs`)."""

    def __init__(
        self,
        generator_dir: str | os.PathLike,
        run: RLRun,
        inputs: dict[str, Any],
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        self.run, self.inputs = run, inputs  # before Learner's init: its hooks may read them
        super().__init__(generator_dir, run.lora, run.sampling, run.rl, device=device, seed=seed)
        self.setup()

    def setup(self) -> None:
        """What a learner builds once its engine exists (subclasses; here nothing)."""

    def draw_steps(self, timesteps: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
        """``n`` DDIM step indices drawn uniformly from the trained ones (``rl.min_noise_std``)."""
        steps = self.trained_steps(timesteps)
        return steps[torch.randint(0, len(steps), (n,), generator=rng)]

    def noised_samples(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        rng: torch.Generator,
        steps: torch.Tensor | None = None,
    ) -> NoisedLatents:
        """Drawn samples' trajectories ``latents`` (B, T + 1, C, h, w) at the states of
        ``rl.denoise_states`` (see the module docstring); ``steps`` (B,): the DDIM step of
        each row under ``trajectory`` (default: drawn from ``rng``)."""
        x0 = latents[:, -1].to(self.device)
        if self.cfg.denoise_states == "forward":
            return noise_latents(self.scheduler, x0, rng)
        j = self.draw_steps(timesteps, len(x0), rng) if steps is None else steps
        t = timesteps[j].to(self.device)
        a = self.scheduler.alphas_cumprod.to(self.device, x0.dtype)[t].view(-1, 1, 1, 1)
        x_t = latents[torch.arange(len(x0)), j].to(self.device)
        return noised_at(self.scheduler, x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt(), t)


def joined(parts: list[NoisedLatents]) -> NoisedLatents:
    """The rows of ``parts``, one after the other."""
    return NoisedLatents(
        *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(NoisedLatents))
    )
