"""Fitting one reward model to rating targets with one objective (REINFORCE, ranking or
regression), in mini-batches over images already in memory; the learning-rate schedule
and the optimizer step, which contrastive pre-training shares.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rewards.config import RewardsConfig
from rewards.models import AlignmentPolicy, RewardModel
from rewards.objectives import ranking_loss, regression_loss, reinforce_loss
from rewards.rating_data import pixels_on
from rewards.towers import PolicyOutput

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- fitting


@dataclasses.dataclass
class Batchable:
    """Inputs of one model for N items, indexable by a tensor of positions."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    target: torch.Tensor  # float (N,)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.target)

    def inputs(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        x = {"pixel_values": pixels_on(self.images[idx], device)}
        if self.input_ids is not None and self.attention_mask is not None:
            x["input_ids"] = self.input_ids[idx].to(device)
            x["attention_mask"] = self.attention_mask[idx].to(device)
        return x

    def images_only(self) -> Batchable:
        """The same items without prompts (what the selector takes)."""
        return Batchable(self.images, self.target)

    def subset(self, idx: np.ndarray) -> Batchable:
        t = torch.as_tensor(idx, dtype=torch.long)
        return Batchable(
            self.images[t],
            self.target[t],
            None if self.input_ids is None else self.input_ids[t],
            None if self.attention_mask is None else self.attention_mask[t],
        )


def warmup_cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of ``total`` steps, then a cosine from 1 down to 0.1."""
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: Iterable[torch.Tensor],
    grad_clip: float,
) -> None:
    """Back-propagate ``loss``, clip the norm of ``params``' gradient (``grad_clip`` > 0), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def _optimizer(model: RewardModel, cfg: RewardsConfig, tower_lr_scale: float) -> torch.optim.AdamW:
    """AdamW over the heads at ``rewards.lr`` and the backbones at ``tower_lr_scale`` times it."""
    towers = [*model.vit.parameters()]
    if isinstance(model, AlignmentPolicy):
        towers += [*model.text_encoder.parameters()]
    tower_ids = {id(p) for p in towers}
    heads = [p for p in model.parameters() if id(p) not in tower_ids]
    return torch.optim.AdamW(
        [{"params": heads}, {"params": towers, "lr": cfg.lr * tower_lr_scale}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )


def _objective_loss(
    objective: str, out: PolicyOutput, target: torch.Tensor, cfg: RewardsConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``objective`` (and its parts) for a batch's output and rating targets."""
    if objective == "reinforce":
        return reinforce_loss(
            out,
            target,
            num_samples=cfg.num_samples,
            entropy_coef=cfg.entropy_coef,
            value_coef=cfg.value_coef,
            reward=cfg.reward,
        )
    if objective == "regression":
        return regression_loss(out, target, cfg.regression_loss)
    if objective == "ranking":
        return ranking_loss(out, target)
    raise ValueError(f"unknown objective {objective!r}; allowed: reinforce, regression, ranking")


def _fit_epoch(
    model: RewardModel,
    data: Batchable,
    target: torch.Tensor,
    order: torch.Tensor,
    cfg: RewardsConfig,
    objective: str,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[dict[str, float], int]:
    """One pass over ``data`` in the batches of ``order``: the mean losses and the steps."""
    sums: dict[str, float] = {}
    batches = 0
    for start in range(0, len(data), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        out = model(**data.inputs(idx, device))
        loss, parts = _objective_loss(objective, out, target[idx.to(device)], cfg)
        optimizer_step(loss, opt, sched, model.parameters(), cfg.grad_clip)
        batches += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / max(batches, 1) for k, v in sums.items()}, batches


def fit(
    model: RewardModel,
    data: Batchable,
    cfg: RewardsConfig,
    objective: str,
    epochs: int,
    *,
    device: torch.device,
    desc: str,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    tower_lr_scale: float = 1.0,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` for ``epochs`` with ``objective``; returns statistics.

    ``on_epoch(epoch, mean losses)`` is called after every epoch (logging, evaluation).
    ``tower_lr_scale`` scales the learning rate of the backbones (ViT, text encoder),
    e.g. to keep what contrastive pre-training taught them.
    """
    if len(data) == 0 or epochs == 0:
        return {"epochs": 0, "steps": 0, "items": len(data)}
    model.train()
    opt = _optimizer(model, cfg, tower_lr_scale)
    sched = warmup_cosine(opt, epochs * math.ceil(len(data) / cfg.batch_size))
    order_rng = np.random.default_rng([seed, 3])
    target = data.target.to(device)
    steps, history = 0, []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", mininterval=1.0)
    for _ in bar:
        order = torch.as_tensor(order_rng.permutation(len(data)))
        epoch_stats, batches = _fit_epoch(
            model, data, target, order, cfg, objective, opt, sched, device
        )
        steps += batches
        history.append(epoch_stats)
        if on_epoch is not None:
            on_epoch(len(history), epoch_stats)
            model.train()
        bar.set_postfix({k: f"{v:.3f}" for k, v in epoch_stats.items() if k in ("loss", "reward")})
    model.eval()
    return {"epochs": epochs, "steps": steps, "items": len(data), "last_epoch": history[-1]}
