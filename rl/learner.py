"""The DDPO learner: a DeepSpeed engine over the UNet, only the LoRA weights trainable.

Loss (DDPO, Black et al. 2023, as trl 0.23's ``DDPOTrainer.calculate_loss``): for each
sample i and each trained DDIM step j (those whose noise std is at least
``rl.min_noise_std``, :meth:`Learner.trained_steps`; a random ``rl.timestep_fraction`` of
them per sample), the log-probability of the recorded transition
``latents[i, j] -> latents[i, j + 1]`` is recomputed through the engine (so gradients
synchronise across ranks) and compared with the one recorded by the sampler:

    ratio   = exp(logp_new - logp_old)
    loss_ij = max(-A_i * ratio, -A_i * clip(ratio, 1 - eps, 1 + eps))

plus, when ``kl_weight > 0``, ``kl_weight * KL(N(mu_new, s) || N(mu_base, s))``, the
closed-form KL of the two Gaussian transitions where ``mu_base`` comes from the same
UNet with its adapter disabled. Advantages are normalised per prompt over its group of
images and clipped (:func:`group_advantages`). Each pass over an iteration's samples
(``inner_epochs`` passes) takes ``updates_per_epoch`` optimizer steps; DeepSpeed
accumulates the gradients of one step over the trained DDIM steps of its micro-batches
and clips their norm. Several smaller steps per iteration learn far more than one step
over all samples at the demo's budget (docs/rl.md, "Defaults that learn"); the first
is on-policy (ratio 1), later ones are corrected by the clipped ratio.

Ranks: every rank gets the same batch and trains on its shard (``rank::world``),
padded with zero-weight rows so that every rank takes the same number of steps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generators.config import LoraConfig, SamplingConfig
from rl.config import RLConfig
from rl.trajectories import Trajectories

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of one iteration, decided in one place (:func:`batch_plan`).

    ``samples`` trained (stage 2: those that passed, so it changes between iterations) are
    dealt to ``world`` ranks, ``per_rank`` each (the shortest shards padded with
    zero-weight rows); each rank cuts its shard into ``micro_batches`` of at most
    ``micro_batch`` samples per pass; ``micro_per_update`` of them make one optimizer step,
    so a pass takes ``updates_per_epoch`` steps (fewer than ``rl.updates_per_epoch`` when
    there are fewer micro-batches); every sample trains ``steps_per_sample`` DDIM steps.
    """

    samples: int
    world: int
    per_rank: int
    padded: int
    micro_batch: int
    micro_batches: int
    micro_per_update: int
    updates_per_epoch: int
    inner_epochs: int
    steps_per_sample: int

    @property
    def optimizer_steps(self) -> int:
        return self.updates_per_epoch * self.inner_epochs

    def describe(self) -> str:
        return (
            f"{self.samples} samples = {self.world} rank(s) x {self.per_rank} "
            f"({self.padded} zero-weight padding); per rank and pass {self.micro_batches} "
            f"micro-batch(es) of <= {self.micro_batch}, {self.micro_per_update} per optimizer "
            f"step -> {self.updates_per_epoch} step(s) x {self.inner_epochs} pass(es) = "
            f"{self.optimizer_steps}; {self.steps_per_sample} DDIM step(s) per sample"
        )


def batch_plan(samples: int, world: int, cfg: RLConfig, eligible_steps: int) -> BatchPlan:
    """The :class:`BatchPlan` of ``samples`` on ``world`` ranks under ``cfg`` (``rl.*``);
    :meth:`Learner.train` checks that its shard and micro-batches match the plan and that it
    took the planned optimizer steps."""
    if world < 1 or samples < 0:
        raise ValueError(f"batch_plan: samples={samples} world={world}")
    per_rank = math.ceil(samples / world) if samples else 0
    micro_batches = math.ceil(per_rank / cfg.micro_batch)
    per_update = max(1, math.ceil(micro_batches / min(cfg.updates_per_epoch, micro_batches or 1)))
    updates = math.ceil(micro_batches / per_update) if micro_batches else 0
    plan = BatchPlan(
        samples=samples,
        world=world,
        per_rank=per_rank,
        padded=per_rank * world - samples,
        micro_batch=cfg.micro_batch,
        micro_batches=micro_batches,
        micro_per_update=per_update,
        updates_per_epoch=updates,
        inner_epochs=cfg.inner_epochs,
        steps_per_sample=max(1, round(cfg.timestep_fraction * eligible_steps)),
    )
    return plan


def group_advantages(prompts: Sequence[str], rewards: torch.Tensor, clip: float) -> torch.Tensor:
    """(reward - mean of its prompt's group) / std of the group, clipped to +-clip.

    A group whose rewards are all equal gets zero advantages (nothing to learn from it).
    """
    from trl.trainer.utils import nanstd

    rewards = rewards.double()
    adv = torch.zeros_like(rewards)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = rewards[rows]
        std = nanstd(group) if len(rows) > 1 else torch.tensor(0.0, dtype=group.dtype)
        if not torch.isfinite(std) or std < 1e-8:
            continue
        adv[rows] = (group - group.mean()) / std
    return adv.clamp(-clip, clip).float()


def ppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's clipped objective (trl 0.23 ``DDPOTrainer.loss``), weighted per row."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    denom = weights.sum().clamp(min=1.0)
    loss = (per_row * weights).sum() / denom
    with torch.no_grad():
        stats = {
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2 * weights).sum() / denom,
            "clipfrac": (((ratio - 1.0).abs() > clip_range).float() * weights).sum() / denom,
        }
    return loss, stats


@dataclass(frozen=True)
class _DeviceShard:
    """A rank's shard of one iteration on the learner's device (timesteps on the cpu)."""

    latents: torch.Tensor  # (n, T + 1, C, h, w)
    log_probs: torch.Tensor  # (n, T)
    advantages: torch.Tensor  # (n,)
    weights: torch.Tensor  # (n,)
    cond: torch.Tensor  # (n, L, D) text embeddings
    timesteps: torch.Tensor  # (T,)


def _deepspeed_env(cpu_shm: bool) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if not torch.cuda.is_available() and not cpu_shm:
        # DeepSpeed's CPU backend compiles a shared-memory allreduce op (C++, ~45 s) on
        # first use; gloo's allreduce does the same job for LoRA-sized gradients.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_single_process_group(backend: str = "gloo") -> None:
    """A one-rank process group for running the learner outside Ray Train (gloo; pass
    ``nccl`` on a GPU, where ZeRO's collectives on CUDA tensors need it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend, rank=0, world_size=1)


class Learner:
    """The UNet with LoRA under a DeepSpeed engine, plus the frozen text encoder."""

    def __init__(
        self,
        generator_dir: str | os.PathLike,
        lora: LoraConfig,
        sampling: SamplingConfig,
        cfg: RLConfig,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        """``seed`` draws the adapter's initial A matrices (B = 0), so two runs with the
        same settings start from the same adapter whatever the global RNG did before."""
        import torch.distributed as dist

        _deepspeed_env(cfg.deepspeed_cpu_shm)
        import deepspeed

        from generators.lora import attach_lora, lora_parameters
        from generators.model import load_generator

        if not dist.is_initialized():
            init_single_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cfg, self.sampling = cfg, sampling
        self.device = torch.device(device)
        self.gen = load_generator(generator_dir).to(self.device)
        self.gen.text_encoder.requires_grad_(False).eval()
        self.gen.vae.requires_grad_(False).eval()
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            attach_lora(self.gen.unet, lora)
        params = lora_parameters(self.gen.unet) + self._extra_trainable(seed)
        self.num_trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ds_config = {  # accumulation is driven by train() (set_gradient_accumulation_boundary)
            "train_micro_batch_size_per_gpu": cfg.micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            ds_config["bf16"] = {"enabled": False}
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.gen.unet,
            optimizer=optimizer,
            model_parameters=params,
            config=ds_config,
        )
        self.scheduler = self.gen.scheduler
        self.scheduler.set_timesteps(sampling.num_steps, device="cpu")
        sigma = self.step_std(self.scheduler.timesteps)
        if not bool((sigma >= cfg.min_noise_std).any()):
            raise ValueError(
                f"rl.min_noise_std ({cfg.min_noise_std}) excludes every DDIM step: their noise "
                f"std is at most {float(sigma.max()):.3g} (sampling.eta = {sampling.eta})"
            )
        self.optimizer_steps = 0
        self.last_plan: BatchPlan | None = None
        self._uncond: torch.Tensor | None = None

    def _extra_trainable(self, seed: int) -> list[torch.nn.Parameter]:
        """Parameters trained beside the LoRA (none here): a subclass registers their module
        on ``self.gen.unet`` so that the engine's optimizer, gradient clipping, ZeRO
        partitioning and checkpoints (:mod:`rl.engine_state`) hold them as the adapter's;
        the exported adapter (peft's keys) never does."""
        return []

    # ------------------------------------------------------------------ adapter
    def gathered(self):
        """Context in which the trained weights are whole on this rank (ZeRO-3 partitions
        them)."""
        import contextlib

        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(trained, modifier_rank=None)

    def adapter_config(self):
        """The peft LoRA config of the trained adapter (no weights: no collective)."""
        from generators.lora import ADAPTER_NAME

        return self.engine.module.peft_config[ADAPTER_NAME]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights as cpu tensors (what the samplers receive)."""
        from generators.lora import get_adapter_state

        with self.gathered():
            state = get_adapter_state(self.engine.module)
            return {k: v.detach().cpu().clone() for k, v in state.items()}

    # ------------------------------------------------------------------ loss
    def step_std(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma_t of the DDIM transition from each of ``timesteps`` (the policy's noise)."""
        from generators.sampling import ddim_mean_std

        zeros = torch.zeros(len(timesteps), 1, 1, 1, dtype=torch.float64)
        _, std = ddim_mean_std(self.scheduler, zeros, timesteps.cpu(), zeros, self.sampling.eta)
        return std.flatten().float()

    def trained_steps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Indices of the DDIM steps that may be trained on (sigma_t >= rl.min_noise_std).

        The score-function gradient of step j is A * (x_{j+1} - mu_j) / sigma_j^2 * dmu_j,
        whose noise grows like 1 / sigma_j while what it estimates (how mu_j moves the
        reward) does not; a near-deterministic step is almost all noise.
        """
        sigma = self.step_std(timesteps)
        return torch.nonzero(sigma >= self.cfg.min_noise_std).flatten()

    def _noise_pred(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
    ) -> torch.Tensor:
        """The guided prediction, both halves of guidance in one UNet call."""
        g = self.sampling.guidance_scale
        model_in = self.scheduler.scale_model_input(x, t)
        if g == 1.0:
            return self.engine(model_in, t, encoder_hidden_states=cond).sample
        t2 = torch.cat([t, t]) if t.dim() else t
        out = self.engine(
            torch.cat([model_in, model_in]), t2, encoder_hidden_states=torch.cat([uncond, cond])
        ).sample
        e_u, e_c = out.chunk(2)
        return e_u + g * (e_c - e_u)

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text embeddings of the distinct ``prompts``, once each (the encoder is frozen)."""
        unique = list(dict.fromkeys(prompts))
        if self._uncond is None:
            self._uncond = self.gen.encode_prompts([""])
        return dict(zip(unique, self.gen.encode_prompts(unique), strict=True))

    def _embeds(
        self, prompts: list[str], cache: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = cache if cache is not None else self._encode(prompts)
        cond = torch.stack([cache[p] for p in prompts])
        return cond, self._uncond.expand(len(prompts), -1, -1)

    def _on_device(self, shard: Trajectories, weights: torch.Tensor) -> _DeviceShard:
        """This rank's shard on the learner's device, once per iteration, with the text
        embedding of every row (each distinct prompt encoded once)."""
        on = {"device": self.device, "non_blocking": True}
        return _DeviceShard(
            latents=shard.latents.to(**on),
            log_probs=shard.log_probs.to(**on),
            advantages=shard.advantages.to(**on),
            weights=weights.to(**on),
            cond=self._embeds(list(shard.prompts))[0],
            timesteps=shard.timesteps.cpu(),
        )

    def train(self, batch: Trajectories, iteration: int, seed: int) -> dict[str, float]:
        """Inner epochs over this rank's shard of ``batch``; returns mean statistics.

        An optimizer step sums the losses of its micro-steps (micro-batch x DDIM step);
        ``rl.steps_per_forward`` DDIM steps of a micro-batch share one UNet call, and the
        gradient of their summed loss is the sum of theirs (the same update as one call per
        step, up to float summation order).
        """
        cfg = self.cfg
        shard, weights = batch.shard(self.rank, self.world)
        n = len(shard)
        if n == 0:
            return {"updates": 0.0}
        rng = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
        self.engine.train()
        eligible = self.trained_steps(batch.timesteps)
        plan = batch_plan(len(batch), self.world, cfg, len(eligible))
        if self.rank == 0 and plan != self.last_plan:  # stage 2 changes the sample count
            log.info("iteration %d batch: %s", iteration, plan.describe())
        self.last_plan = plan
        data = self._on_device(shard, weights)
        totals: dict[str, torch.Tensor] = {}
        count = 0
        steps_before = self.optimizer_steps
        k = cfg.steps_per_forward
        for _epoch in range(cfg.inner_epochs):
            order = torch.randperm(n, generator=rng)
            micro = list(order.split(cfg.micro_batch))
            assert len(micro) == plan.micro_batches and n == plan.per_rank, (plan, n)
            for first in range(0, len(micro), plan.micro_per_update):
                drawn = [
                    (rows, eligible[torch.randperm(len(eligible), generator=rng)])
                    for rows in micro[first : first + plan.micro_per_update]
                ]
                calls = [
                    (rows, steps[i : min(i + k, plan.steps_per_sample)].tolist())
                    for rows, steps in drawn
                    for i in range(0, plan.steps_per_sample, k)
                ]
                micro_steps = len(drawn) * plan.steps_per_sample
                # one optimizer step per group: gradients accumulate over its calls
                for c, (rows, steps) in enumerate(calls):
                    self.engine.set_gradient_accumulation_boundary(c == len(calls) - 1)
                    losses = self._step_losses(data, rows, steps)
                    total = torch.stack([loss for loss, _ in losses]).sum()
                    self.engine.backward(total / micro_steps, scale_wrt_gas=False)
                    for loss, stats in losses:
                        for key, v in {"loss": loss.detach(), **stats}.items():
                            totals[key] = totals[key] + v if key in totals else v
                    count += len(losses)
                self.engine.step()
                self.optimizer_steps += 1
        assert self.optimizer_steps - steps_before == plan.optimizer_steps, plan
        out = {key: float(v) / max(count, 1) for key, v in totals.items()}
        out["updates"] = float(self.optimizer_steps)
        out["optimizer_steps_iteration"] = float(plan.optimizer_steps)
        out["samples_per_rank"] = float(plan.per_rank)
        return out

    def _step_losses(
        self, data: _DeviceShard, rows: torch.Tensor, steps: list[int]
    ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The loss and statistics of each micro-step ``(rows, j)`` for ``j`` in ``steps``,
        from one UNet call over all of them (rows step by step: step s is rows
        ``s * len(rows) ... (s + 1) * len(rows) - 1`` of the call)."""
        from generators.sampling import ddim_step_with_logprob

        cfg, eta, m = self.cfg, self.sampling.eta, len(rows)
        j_cpu = torch.tensor(steps).repeat_interleave(m)
        r, j = rows.repeat(len(steps)).to(self.device), j_cpu.to(self.device)
        x, x_next = data.latents[r, j], data.latents[r, j + 1]
        t_cpu = data.timesteps[j_cpu]
        cond, uncond = data.cond[r], self._uncond.expand(len(r), -1, -1)
        pred = self._noise_pred(x, t_cpu.to(self.device), cond, uncond)
        _, logp = ddim_step_with_logprob(self.scheduler, pred, t_cpu, x, eta, prev_sample=x_next)
        old, adv, w = data.log_probs[r, j], data.advantages[r], data.weights[r]
        kl_rows = self._kl_rows(pred, x, t_cpu, cond, uncond) if cfg.kl_weight > 0 else None
        out = []
        for s in range(len(steps)):
            seg = slice(s * m, (s + 1) * m)
            loss, stats = ppo_loss(logp[seg], old[seg], adv[seg], cfg.clip_range, w[seg])
            if kl_rows is not None:
                kl = (kl_rows[seg] * w[seg]).sum() / w[seg].sum().clamp(min=1.0)
                loss = loss + cfg.kl_weight * kl
                stats["kl_to_base"] = kl.detach()
            out.append((loss, stats))
        return out

    def _kl_rows(self, pred, x, t_cpu, cond, uncond) -> torch.Tensor:
        """KL(N(mu_new, s) || N(mu_base, s)) of each row, mean over latent dims; mu_base
        from the same UNet with its adapter disabled."""
        from generators.sampling import ddim_mean_std

        eta = self.sampling.eta
        mean_new, std = ddim_mean_std(self.scheduler, pred, t_cpu, x, eta)
        unet = self.engine.module
        unet.disable_adapters()
        try:
            with torch.no_grad():
                base = self._noise_pred(x, t_cpu.to(x.device), cond, uncond)
        finally:
            unet.enable_adapters()
        mean_base, _ = ddim_mean_std(self.scheduler, base, t_cpu, x, eta)
        return ((mean_new - mean_base) ** 2 / (2 * std**2)).flatten(1).mean(1)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        """Collective: every rank writes its part of the engine state into
        ``directory/engine`` (safetensors and JSON: :mod:`rl.engine_state`)."""
        from rl.engine_state import save_engine_state

        stage = self.cfg.zero_stage
        save_engine_state(self.engine, directory, self.rank, self.world, stage, self.gathered)

    def load(self, directory: Path) -> None:
        """The engine state of checkpoint ``directory``; nothing in it is unpickled
        (:mod:`rl.engine_state`: anything else there is refused, naming the file)."""
        from rl.engine_state import load_engine_state

        load_engine_state(self.engine, directory, self.rank, self.world, self.cfg.zero_stage)
