"""``rl.algorithm=filter_retrain``: reward-ranked fine-tuning (MINIM's self-improvement).

Each iteration the loop draws samples, scores them and hands the learner only those whose
reward passes the gate (the selector's ``rewards.threshold``; a pixel reward's
``spatial:<t>``). The learner fine-tunes the LoRA on them with a supervised denoising
loss: at a state x_t of a kept sample (``rl.denoise_states``, :mod:`rl.learners.base`:
by default a state its DDIM trajectory visited, with the noise eps that relates it to the
sample's final latent x_0) the UNet predicts that noise,

    loss = sum_i w_i * || eps_i - eps_theta(x_t_i, t_i, c_i) ||^2 / sum_i w_i

where eps_theta is the guided prediction the samplers draw with, eps_u + g (eps_c - eps_u)
(``sampling.guidance_scale``; :meth:`Learner._noise_pred`), as DDPO's loss is: the LoRA
moves both branches, so training the conditional one alone need not move the guided one
the same way.

over micro-batches of ``rl.micro_batch`` rows, ``round(rl.real_share * micro_batch)`` of
them real image-text pairs from data.manifest (their latents drawn from the VAE's
posterior, noised as ``medrl finetune`` does: they have no trajectory) and the rest kept
samples, cycled in a shuffled order. An iteration takes ``rl.updates_per_epoch *
rl.inner_epochs`` optimizer steps, DDPO's count at the same settings, so the two spend the
same sample and step budget.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generators.training_common import (
    ImageTextData,
    NoisedLatents,
    batch_indices,
    denoising_error,
    encode_latents,
    noise_latents,
)
from rl.config import RLRun
from rl.learners.base import RunLearner, joined
from rl.trajectories import Trajectories


class SupervisedLearner(RunLearner):
    """A :class:`Learner` whose step is the supervised denoising loss on kept samples plus
    a share of real pairs (:meth:`extra_loss` adds to it in subclasses)."""

    def setup(self) -> None:
        self.real = real_pairs(self.run) if self.cfg.real_share > 0 else None

    def micro_rows(self) -> tuple[int, int]:
        """(kept samples, real pairs) of one micro-batch."""
        n_real = round(self.cfg.real_share * self.cfg.micro_batch) if self.real is not None else 0
        return self.cfg.micro_batch - n_real, n_real

    def train(self, batch: Trajectories, iteration: int, seed: int) -> dict[str, float]:
        """``rl.updates_per_epoch * rl.inner_epochs`` optimizer steps of the supervised loss
        on this rank's shard of ``batch`` (the kept samples) and real pairs."""
        shard, weights = batch.shard(self.rank, self.world)
        if len(shard) == 0:
            return {"updates": 0.0}
        rng = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
        n_kept, n_real = self.micro_rows()
        steps = self.cfg.updates_per_epoch * self.cfg.inner_epochs
        order = torch.randperm(len(shard), generator=rng)
        texts = self._encode(shard.prompts)
        self.engine.train()
        totals: dict[str, float] = {}
        for s in range(steps):
            rows = order[(s * n_kept + torch.arange(n_kept)) % len(shard)]
            noised = self.noised_samples(shard.latents[rows], shard.timesteps, rng)
            cond, _ = self._embeds([shard.prompts[i] for i in rows.tolist()], texts)
            w = weights[rows].to(self.device)
            if n_real:
                x, real_texts = self.real.batch(batch_indices(len(self.real), n_real, rng))
                real = noise_latents(self.scheduler, encode_latents(self.gen.vae, x, rng), rng)
                noised = joined([noised, real])
                with torch.no_grad():
                    cond = torch.cat([cond, self.gen.encode_prompts(real_texts)])
                w = torch.cat([w, torch.ones(n_real, device=self.device)])
            uncond = self._uncond.expand(len(cond), -1, -1)
            pred = self._noise_pred(noised.noisy, noised.t, cond, uncond)
            sft = (denoising_error(pred, noised) * w).sum() / w.sum().clamp(min=1e-8)
            loss, stats = self.extra_loss(sft, noised, pred, w)
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()
            self.optimizer_steps += 1
            for k, v in {"loss": loss.detach(), "sft_loss": sft.detach(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        out = {k: v / steps for k, v in totals.items()}
        out.update(updates=float(self.optimizer_steps), optimizer_steps_iteration=float(steps))
        out["samples_per_rank"] = float(len(shard))
        return out

    def extra_loss(
        self, sft: torch.Tensor, noised: NoisedLatents, pred: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise given the supervised one (here: just that)."""
        return sft, {}


class FilterRetrainLearner(SupervisedLearner):
    """``rl.algorithm=filter_retrain`` (see the module docstring)."""


def real_pairs(run: RLRun) -> ImageTextData:
    """The real image-text pairs (train split of data.manifest) mixed into each micro-batch."""
    manifest = Path(run.data.manifest_path)
    if not manifest.is_file():
        raise FileNotFoundError(
            f"rl.real_share={run.rl.real_share} mixes in real pairs from data.manifest, but "
            f"{manifest} does not exist (run `medrl data ingest`, or set rl.real_share=0)"
        )
    return ImageTextData.from_manifest(manifest, run.model.resolution, split="train")
