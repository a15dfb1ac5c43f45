"""Drawing and scoring: where samples come from (:class:`RayBackend`: sampler and reward
service actors; :class:`LocalBackend`: this process), rewards joined to samples by id,
and the held-out evaluation of an adapter version (proxy and gold).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from rl.gold import GoldJudge, standard_error
from rl.inputs import eval_requests
from rl.samplers import SampleRequest
from rl.trajectories import Trajectories

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Where samples are drawn and scored: Ray actors, or this process."""

    def draw(
        self, requests: Sequence[SampleRequest], version: int, adapter: dict[str, torch.Tensor]
    ) -> Trajectories: ...

    def score(self, traj: Trajectories) -> Any: ...


class RayBackend:
    """Sampler actors and reward-service actors, by handle.

    Scoring overlaps drawing: each chunk a sampler returns goes to a reward service
    replica at once (round robin) while the samplers draw the rest, and :meth:`score`
    collects those calls. Scores are per sample, so they equal one call over the batch.
    A reward replica that hangs or dies is replaced and its chunks scored again
    (:class:`rewards.service.ScoringCalls`, ``rewards.score_timeout_s``).
    """

    def __init__(self, samplers: Sequence[Any], rewards: Sequence[Any], chunk: int):
        from rewards.service import ScoringCalls

        self.samplers, self.chunk = list(samplers), chunk
        self._version, self._ref = None, None
        self._scoring = ScoringCalls(rewards)  # the reward calls of the last draw
        self.rewards = self._scoring.replicas

    def draw(self, requests, version, adapter):
        import ray

        from rl.samplers import draw_samples

        if version != self._version:  # one ray.put per adapter version
            self._ref, self._version = ray.put(adapter), version
        self._scoring.clear()
        traj, _ = draw_samples(
            self.samplers, requests, version, self._ref, self.chunk, on_chunk=self._score_chunk
        )
        return traj

    def _score_chunk(self, part: Trajectories) -> None:
        self._scoring.submit(part.images, part.prompts, part.ids)

    def score(self, traj):
        from rewards.service import score_with_services

        if set(self._scoring.ids) != set(traj.ids):  # not the samples draw() just returned
            self._scoring.clear()
            return score_with_services(
                self.rewards, traj.images, traj.prompts, traj.ids, batch_size=self.chunk
            )
        return self._scoring.collect()


class LocalBackend:
    """One in-process sampler and reward: the single-process reference."""

    def __init__(self, sampler: Any, reward: Any):
        self.sampler, self.reward = sampler, reward

    def draw(self, requests, version, adapter):
        return self.sampler.sample(list(requests), version, [adapter])

    def score(self, traj):
        return self.reward.score(traj.images, traj.prompts, traj.ids)


def score_map(traj: Trajectories, result: Any) -> tuple[list[int], torch.Tensor, list[bool]]:
    """Join scores to samples by id; rows with an error are dropped (and logged)."""
    rows, rewards, passed = [], [], []
    for i, sid in enumerate(traj.ids):
        if sid in result.errors:
            log.warning("reward error for %s: %s (sample dropped)", sid, result.errors[sid])
            continue
        s = result.scores[sid]
        rows.append(i)
        rewards.append(float(s.reward))
        passed.append(bool(s.passed))
    return rows, torch.tensor(rewards, dtype=torch.float32), passed


def evaluate_adapter(
    backend: Backend,
    prompts: Sequence[str],
    iteration: int,
    version: int,
    adapter,
    rl: Any,
    gold: GoldJudge | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Proxy and gold of the fixed evaluation images under adapter ``version``.

    Returns the record keys (``eval_reward`` and its standard error ``eval_reward_se``,
    plus the gold judge's keys, rl/gold.py) and the images.
    """
    if not prompts:
        return {"eval_reward": float("nan")}, None
    requests = eval_requests(prompts, iteration, rl.eval_seed, rl.eval_per_prompt)
    traj = backend.draw(requests, version, adapter)
    rows, rewards, _ = score_map(traj, backend.score(traj))
    out = {
        "eval_reward": float(rewards.mean()) if rows else float("nan"),
        "eval_reward_se": standard_error(rewards.tolist()),
    }
    if gold is not None:
        out.update(gold.judge(traj.images, traj.prompts))
    return out, traj.images
