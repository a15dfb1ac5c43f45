"""The one trajectory type of an RL iteration, from the sampler to the learner.

A sampler returns :class:`Trajectories` (ids, prompts, seeds, the adapter version that drew
each sample, images and the DDIM trajectory with its recorded log-probabilities). Rank 0
scores the images, then :meth:`Trajectories.for_learner` keeps the samples the stage trains
on, attaches their advantages and drops the images (no learner rank trains on pixels, so
they are not broadcast); every rank takes its :meth:`Trajectories.shard`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Trajectories:
    """Samples with their DDIM trajectories, in the order of ``ids``."""

    ids: list[str]
    prompts: list[str]
    seeds: list[int]
    versions: list[int]  # adapter version that drew each sample
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None once handed to the learner
    latents: torch.Tensor  # (B, T + 1, C, h, w)
    log_probs: torch.Tensor  # (B, T) recorded by the sampler
    timesteps: torch.Tensor  # (T,)
    advantages: torch.Tensor | None = None  # (B,), set by for_learner
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, order: Sequence[int]) -> Trajectories:
        """The samples at positions ``order``, every per-sample field alike."""
        order = list(order)
        idx = torch.as_tensor(order, dtype=torch.long)
        return Trajectories(
            ids=[self.ids[i] for i in order],
            prompts=[self.prompts[i] for i in order],
            seeds=[self.seeds[i] for i in order],
            versions=[self.versions[i] for i in order],
            images=None if self.images is None else self.images[idx],
            latents=self.latents[idx],
            log_probs=self.log_probs[idx],
            timesteps=self.timesteps,
            advantages=None if self.advantages is None else self.advantages[idx],
            meta=dict(self.meta),
        )

    @staticmethod
    def cat(parts: Sequence[Trajectories]) -> Trajectories:
        if not parts:
            raise ValueError("no trajectories to concatenate")
        for p in parts[1:]:
            if not torch.equal(p.timesteps, parts[0].timesteps):
                raise ValueError("trajectories drawn with different timesteps")

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return Trajectories(
            ids=[i for p in parts for i in p.ids],
            prompts=[x for p in parts for x in p.prompts],
            seeds=[x for p in parts for x in p.seeds],
            versions=[x for p in parts for x in p.versions],
            images=joined("images"),
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            timesteps=parts[0].timesteps,
            advantages=joined("advantages"),
        )

    def for_learner(self, advantages: torch.Tensor, keep: Sequence[int]) -> Trajectories:
        """The samples ``keep`` with their ``advantages`` (one per sample of ``self``), and
        without images: what the learner ranks receive."""
        if len(advantages) != len(self):
            raise ValueError(f"{len(advantages)} advantages for {len(self)} samples")
        return replace(self, images=None, advantages=advantages, meta={}).select(keep)

    def shard(self, rank: int, world: int) -> tuple[Trajectories, torch.Tensor]:
        """This rank's rows (``rank::world``), padded to the longest shard with zero-weight
        copies of a real row; returns (trajectories, row weights)."""
        n = len(self)
        per_rank = math.ceil(n / world) if n else 0
        rows = list(range(rank, n, world))
        weights = [1.0] * len(rows)
        while len(rows) < per_rank:
            rows.append(rows[0] if rows else 0)
            weights.append(0.0)
        return self.select(rows), torch.tensor(weights)
