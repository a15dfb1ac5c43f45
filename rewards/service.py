"""The reward service: any reward (:mod:`rewards.scorers`) as Ray actors, scoring by sample id.

:class:`RewardService` wraps a reward for Ray: :func:`start_reward_services` starts
replicas as actors (a fractional GPU each where the cluster has GPUs),
:func:`score_with_services` splits a batch over them and merges the results by id, so the
RL learner never knows which models produced a reward. The HTTP endpoint for callers
outside Ray is :mod:`rewards.http`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from generators.model import resolve_device
from rewards.config import RewardsConfig
from rewards.scorers import build_reward, parse_spec, rewards_config
from rewards.scores import Reward, ScoreResult, duplicate_id, split_call

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the service


class RewardService:
    """Any :class:`Reward`, as a Ray actor / Serve replica: ``score``, ``score_json``, ``info``.

    ``spec`` is a reward spec (:func:`build_reward`) or a reward object; ``cfg`` a
    RewardsConfig or its dict; ``device`` ``cpu``, ``cuda[:N]`` or ``auto``.
    """

    def __init__(
        self,
        spec: str | Reward,
        cfg: RewardsConfig | Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.cfg = rewards_config(cfg)
        self.device = resolve_device(device)
        if isinstance(spec, str):
            self.spec = spec
            self.reward: Reward = build_reward(spec, self.cfg, self.device)
        elif callable(getattr(spec, "score", None)):
            self.reward = spec
            self.spec = getattr(spec, "name", type(spec).__name__)
        else:
            raise TypeError(f"spec must be a reward spec string or a Reward, not {spec!r}")
        self.name: str = getattr(self.reward, "name", type(self.reward).__name__)
        self._calls = self._scored = self._errors = 0
        self._seconds = 0.0
        log.info("reward service ready: %s on %s (pid %d)", self.name, self.device, os.getpid())

    def score(self, images: Any, prompts: Sequence[str], ids: Sequence[str]) -> ScoreResult:
        started = time.perf_counter()
        with torch.no_grad():
            result = self.reward.score(images, prompts, ids)
        self._seconds += time.perf_counter() - started
        self._calls += 1
        self._scored += len(result.scores)
        self._errors += len(result.errors)
        return result

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "device": str(self.device),
            "batch_size": getattr(self.reward, "batch_size", None),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "calls": self._calls,
            "scored": self._scored,
            "errors": self._errors,
            "seconds_scoring": round(self._seconds, 3),
        }

    def ready(self) -> bool:
        """Returns once the replica is constructed (models loaded)."""
        return True


#: the service as a Ray actor class: ``RewardServiceActor.options(num_gpus=0.25).remote(spec, cfg)``
RewardServiceActor = ray.remote(RewardService)


def share_gpus(num_gpus: float, device: str | None) -> tuple[float, str]:
    """(GPU share per replica, its device): a share only where the Ray cluster has GPUs.

    ``device`` None or ``auto``: CUDA with a share, else CPU; ``cpu``: no share.
    """
    auto = device is None or str(device) == "auto"
    if not auto and torch.device(device).type == "cpu":
        return 0.0, "cpu"
    if num_gpus > 0 and float(ray.cluster_resources().get("GPU", 0.0)) > 0:
        return float(num_gpus), "cuda" if auto else str(device)
    return 0.0, "cpu" if auto else str(device)


def start_reward_services(
    spec: str | Reward,
    cfg: RewardsConfig | Mapping[str, Any] | None = None,
    replicas: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    device: str | None = None,
) -> list[Any]:
    """Start ``replicas`` reward service actors (default ``rewards.service_replicas``).

    Each gets ``num_gpus`` (default ``rewards.service_num_gpus``, fractional: replicas
    share a GPU) where the Ray cluster has GPUs and scores on CUDA; without GPUs it runs
    on CPU with ``num_cpus``. Ray must be running (``ray.init``). Returns once every
    replica has loaded its models; a bad spec is a ValueError before anything starts.
    Actors restart (twice) if their process dies, and a call in flight is retried
    (scoring has no side effects).
    """
    if not ray.is_initialized():
        raise RuntimeError("Ray is not running in this process: call ray.init(...) first")
    cfg = rewards_config(cfg)
    if isinstance(spec, str):
        parse_spec(spec)
    replicas = cfg.service_replicas if replicas is None else int(replicas)
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    gpus, dev = share_gpus(cfg.service_num_gpus if num_gpus is None else num_gpus, device)
    actor = RewardServiceActor.options(
        num_cpus=num_cpus,
        num_gpus=gpus,
        max_restarts=2,
        max_task_retries=2,
        # placed by the cluster, never inside the caller's placement group (a Ray Tune
        # trial's holds only its driver function)
        scheduling_strategy="DEFAULT",
    )
    handles = [actor.remote(spec, cfg, dev) for _ in range(replicas)]
    ray.get([h.ready.remote() for h in handles])
    log.info(
        "%d reward service replica(s) of %s on %s (%g GPU, %g CPU each)",
        replicas, spec if isinstance(spec, str) else type(spec).__name__, dev, gpus, num_cpus,
    )  # fmt: skip
    return handles


def score_with_services(
    handles: Sequence[Any],
    images: Any,
    prompts: Sequence[str],
    ids: Sequence[str],
    batch_size: int | None = None,
) -> ScoreResult:
    """Score a batch over reward service replicas and merge the results by id.

    The batch is cut into calls of ``batch_size`` samples (default: an equal share per
    replica) dealt round robin to the replicas, which score in parallel. Ids are checked
    for duplicates over the whole batch first (a duplicate is an error for its id).
    """
    if not handles:
        raise ValueError("no reward service replicas to score with")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids, prompts, items, counts = split_call(images, prompts, ids)
    errors = {sid: f"sample {sid!r}: {duplicate_id(sid, n)}" for sid, n in counts.items() if n > 1}
    keep = [i for i, sid in enumerate(ids) if counts[sid] == 1]
    size = batch_size or max(1, math.ceil(len(keep) / len(handles)))
    refs = []
    for k, start in enumerate(range(0, len(keep), size)):
        part = keep[start : start + size]
        refs.append(
            handles[k % len(handles)].score.remote(
                _pack([items[i] for i in part]), [prompts[i] for i in part], [ids[i] for i in part]
            )
        )
    merged = ScoreResult.merge(ray.get(refs))
    merged.errors.update(errors)
    return merged


def _pack(items: list[Any]) -> Any:
    """Same-shape tensors as one (N, 3, H, W) tensor (one buffer to ship); else the list.

    Tensors are copied: a pickled view carries its whole storage (the full batch).
    """
    if items and all(isinstance(x, torch.Tensor) for x in items):
        if len({tuple(x.shape) for x in items}) == 1 and items[0].dim() == 3:
            return torch.stack([x.detach().cpu() for x in items])
    return [x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x for x in items]
