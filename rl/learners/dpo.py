"""``rl.algorithm=dpo``: Diffusion-DPO (Wallace et al. 2023) on preference pairs.

For a pair of samples (x_w preferred to x_l) under the same prompt c, both are taken at
one timestep t, at states x_t with targets eps (``rl.denoise_states``,
:mod:`rl.learners.base`: for drawn samples by default the states their DDIM trajectories
visited, at every trained DDIM step, with the noise relating each to its final latent; for
rated images, or ``forward``, the final latents noised with one fresh noise at one
timestep of the training schedule); with the denoising errors

    e_theta(x) = || eps - eps_theta(x_t, t, c) ||^2     (the LoRA'd UNet)
    e_ref(x)   = || eps - eps_ref(x_t, t, c) ||^2       (the same UNet, adapter disabled)

the loss is ``-log sigmoid(-beta / 2 * ((e_theta(x_w) - e_theta(x_l)) - (e_ref(x_w) -
e_ref(x_l))))`` (as the authors' train script, with ``beta = rl.dpo_beta``): the adapter
learns to denoise the preferred image better than the reference does, relative to the
other one, with no reward model in the gradient.

Pairs (``rl.dpo_pairs``): ``rewards``: each iteration's samples, within each prompt's
group the best against the worst, the second best against the second worst, and so on
(ties skipped), with their DDIM trajectories as drawn; ``ratings``: the expert ratings store
``rewards.ratings_db`` (images under ``rewards.images_root``), every two images of the
same prompt with different ratings (:func:`rewards.rating_data.rating_targets`: each
rater's latest rating, averaged over raters), their latents drawn from the VAE's
posterior at every step. An iteration takes ``rl.updates_per_epoch * rl.inner_epochs``
optimizer steps of ``max(1, rl.micro_batch // 2)`` pairs each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from generators.training_common import (
    NoisedLatents,
    denoising_error,
    encode_latents,
    noise_latents,
    noised_at,
)
from rl.config import RLRun
from rl.learners.base import RunLearner
from rl.trajectories import Trajectories


def dpo_loss(
    model_err: torch.Tensor, ref_err: torch.Tensor, beta: float, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO's loss from per-row denoising errors ``[winners; losers]`` (2P,) of the
    model and of the reference, weighted per pair (P,)."""
    m_w, m_l = model_err.chunk(2)
    r_w, r_l = ref_err.chunk(2)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    denom = weights.sum().clamp(min=1e-8)
    loss = (-F.logsigmoid(inside) * weights).sum() / denom
    with torch.no_grad():
        stats = {"dpo_accuracy": ((inside > 0).float() * weights).sum() / denom}
    return loss, stats


def reward_pairs(prompts: Sequence[str], scores: torch.Tensor) -> list[tuple[int, int]]:
    """(winner, loser) rows: within each prompt's group, the i-th best against the i-th
    worst for i below half the group; pairs of equal score are skipped."""
    pairs = []
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        ranked = sorted(rows, key=lambda i: -float(scores[i]))
        for i in range(len(ranked) // 2):
            w, lo = ranked[i], ranked[-1 - i]
            if float(scores[w]) > float(scores[lo]):
                pairs.append((w, lo))
    return pairs


@dataclass
class RatedPairs:
    """Rated images (uint8, N x 3 x H x W) with their paths and prompts, and (winner,
    loser) rows."""

    images: torch.Tensor
    paths: list[str]
    prompts: list[str]
    pairs: list[tuple[int, int]]


def rating_pairs(run: RLRun) -> RatedPairs:
    """Every two images of one prompt with different mean ratings in ``rewards.ratings_db``."""
    from rewards.rating_data import load_images, rating_targets
    from rewards.ratings import read_ratings

    db = run.rewards.ratings_db
    targets = rating_targets(read_ratings(db))
    prompts = targets["prompt"].tolist()
    quality = torch.tensor(targets["quality"].to_numpy(), dtype=torch.float64)
    pairs = [
        (w, lo) if quality[w] > quality[lo] else (lo, w)
        for w in range(len(prompts))
        for lo in range(w + 1, len(prompts))
        if prompts[w] == prompts[lo] and quality[w] != quality[lo]
    ]
    if not pairs:
        raise ValueError(
            f"rl.dpo_pairs=ratings: {db} has no two images of one prompt with different "
            "ratings, so there is no preference to learn"
        )
    root = Path(run.rewards.images_root or Path(db).parent)
    paths = targets["image_path"].tolist()
    return RatedPairs(load_images(root, paths, run.model.resolution), paths, prompts, pairs)


@contextlib.contextmanager
def adapter_disabled(unet: Any) -> Iterator[None]:
    """The UNet without its LoRA (the reference model) inside the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class DPOLearner(RunLearner):
    """``rl.algorithm=dpo`` (see the module docstring)."""

    def setup(self) -> None:
        self.rated = rating_pairs(self.run) if self.cfg.dpo_pairs == "ratings" else None

    def _pair_latents(
        self, batch: Trajectories, pairs: list[tuple[int, int]], rng: torch.Generator
    ) -> tuple[torch.Tensor, list[str]]:
        """``[winners; losers]`` of ``pairs`` and their prompts: drawn samples' trajectories
        (2P, T + 1, C, h, w), or rated images' latents (2P, C, h, w)."""
        rows = [w for w, _ in pairs] + [lo for _, lo in pairs]
        if self.rated is None:
            return batch.latents[rows], [batch.prompts[i] for i in rows]
        x = self.rated.images[rows].float().div(127.5).sub(1.0)
        return encode_latents(self.gen.vae, x, rng), [self.rated.prompts[i] for i in rows]

    def train(self, batch: Trajectories, iteration: int, seed: int) -> dict[str, float]:
        """``rl.updates_per_epoch * rl.inner_epochs`` optimizer steps of the DPO loss on this
        rank's share of the pairs."""
        rng = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
        if self.rated is None:
            pairs = reward_pairs(batch.prompts, batch.advantages)
        else:
            pairs = self.rated.pairs
        mine = pairs[self.rank :: self.world]
        per_rank = -(-len(pairs) // self.world)
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine += [pairs[0]] * (per_rank - len(mine)) if pairs else []
        if not mine:
            return {"updates": 0.0, "dpo_pairs": 0.0}
        per_step = max(1, self.cfg.micro_batch // 2)
        steps = self.cfg.updates_per_epoch * self.cfg.inner_epochs
        order = torch.randperm(len(mine), generator=rng)
        self.engine.train()
        totals: dict[str, float] = {}
        for s in range(steps):
            take = order[(s * per_step + torch.arange(per_step)) % len(mine)].tolist()
            latents, prompts = self._pair_latents(batch, [mine[i] for i in take], rng)
            w = torch.tensor([weights[i] for i in take], device=self.device)
            noised, prompts, w = self._noised_pairs(latents, prompts, w, batch.timesteps, rng)
            loss, stats = self._dpo_step(noised, prompts, w)
            for k, v in {"loss": loss, **stats}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        out = {k: v / steps for k, v in totals.items()}
        out.update(updates=float(self.optimizer_steps), optimizer_steps_iteration=float(steps))
        out["dpo_pairs"] = float(len(pairs))
        return out

    def _noised_pairs(
        self,
        latents: torch.Tensor,
        prompts: list[str],
        w: torch.Tensor,
        timesteps: torch.Tensor,
        rng: torch.Generator,
    ) -> tuple[NoisedLatents, list[str], torch.Tensor]:
        """The pairs ``[winners; losers]`` noised, with their prompts and pair weights.

        Drawn samples under ``rl.denoise_states=trajectory``: every pair at each trained
        DDIM step, both images at the states their trajectories visited (as DDPO takes
        every trained step of a sample in one optimizer step); otherwise one timestep per
        pair and one noise shared by its two images."""
        p = len(latents) // 2
        if latents.dim() == 5 and self.cfg.denoise_states == "trajectory":
            steps = self.trained_steps(timesteps)
            k = len(steps)
            won, lost = latents.chunk(2)
            rows = torch.cat([won.repeat(k, 1, 1, 1, 1), lost.repeat(k, 1, 1, 1, 1)])
            j = steps.repeat_interleave(p).repeat(2)
            noised = self.noised_samples(rows, timesteps, rng, steps=j)
            return noised, prompts[:p] * k + prompts[p:] * k, w.repeat(k)
        x0 = (latents[:, -1] if latents.dim() == 5 else latents).to(self.device)
        half = noise_latents(self.scheduler, x0.chunk(2)[0], rng)
        noised = noised_at(self.scheduler, x0, half.noise.repeat(2, 1, 1, 1), half.t.repeat(2))
        return noised, prompts, w

    def _dpo_step(
        self, noised: NoisedLatents, prompts: list[str], w: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step on the noised pairs ``[winners; losers]``."""
        cond, uncond = self._embeds(prompts)
        with torch.no_grad():
            with adapter_disabled(self.engine.module):
                ref = self._noise_pred(noised.noisy, noised.t, cond, uncond)
        pred = self._noise_pred(noised.noisy, noised.t, cond, uncond)
        loss, stats = dpo_loss(
            denoising_error(pred, noised), denoising_error(ref, noised), self.cfg.dpo_beta, w
        )
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        self.optimizer_steps += 1
        return loss.detach(), stats
