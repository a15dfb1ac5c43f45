"""The reward service: any reward (:mod:`rewards.scorers`) as Ray actors, scoring by sample id.

:class:`RewardService` wraps a reward for Ray: :func:`start_reward_services` starts
replicas as actors (a fractional GPU each where the cluster has GPUs),
:func:`score_with_services` splits a batch over them and merges the results by id, so the
RL learner never knows which models produced a reward. :class:`ScoringCalls` waits for the
calls with a timeout (``rewards.score_timeout_s``): a replica that hangs or dies is
replaced by a fresh one and its calls are scored again. The HTTP endpoint for callers
outside Ray is :mod:`rewards.http`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as _with
from typing import Any

import ray
import torch
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
)

from generators.model import resolve_device
from rewards.config import RewardsConfig
from rewards.scorers import build_reward, parse_spec, rewards_config
from rewards.scores import Reward, ScoreResult, duplicate_id, split_call

log = logging.getLogger(__name__)

#: what a call raises when its actor is gone: its process died or was killed (also by
#: Ray's memory monitor, ``OutOfMemoryError``, which is no ``RayActorError``), its node
#: was lost, or its result was lost with that node. The call is made again elsewhere.
ACTOR_LOST = (RayActorError, OutOfMemoryError, NodeDiedError, ObjectLostError)


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
) -> RewardReplicas:
    """Start ``replicas`` reward service actors (default ``rewards.service_replicas``).

    Each gets ``num_gpus`` (default ``rewards.service_num_gpus``, fractional: replicas
    share a GPU) where the Ray cluster has GPUs and scores on CUDA; without GPUs it runs
    on CPU with ``num_cpus``. Ray must be running (``ray.init``). Returns the handles once
    every replica has loaded its models (an error after
    ``rewards.service_start_timeout_s``); a bad spec is a ValueError before anything
    starts. Actors restart (twice) if their process dies, and a call in flight is
    retried (scoring has no side effects); :class:`ScoringCalls` replaces one that hangs
    or stays dead.
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
    options = {
        "num_cpus": num_cpus,
        "num_gpus": gpus,
        "max_restarts": 2,
        "max_task_retries": 2,
        # placed by the cluster, never inside the caller's placement group (a Ray Tune
        # trial's holds only its driver function)
        "scheduling_strategy": "DEFAULT",
    }
    recipe = (options, (spec, cfg, dev))
    handles = _start_actors(recipe, replicas, cfg.service_start_timeout_s)
    log.info(
        "%d reward service replica(s) of %s on %s (%g GPU, %g CPU each)",
        replicas, spec if isinstance(spec, str) else type(spec).__name__, dev, gpus, num_cpus,
    )  # fmt: skip
    return RewardReplicas(handles, recipe, cfg)


#: (actor options, constructor arguments) of a reward service replica
Recipe = tuple[dict[str, Any], tuple[Any, ...]]


def _start_actors(recipe: Recipe, count: int, timeout_s: float) -> list[Any]:
    """Start ``count`` reward service actors; return once each is ready (within ``timeout_s``)."""
    options, args = recipe
    handles = [RewardServiceActor.options(**options).remote(*args) for _ in range(count)]
    try:
        ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
    except GetTimeoutError as exc:
        for handle in handles:
            _kill(handle)
        raise RuntimeError(
            f"reward service replica(s) not ready within {timeout_s:g} s "
            "(rewards.service_start_timeout_s): not placed on the cluster, or the reward "
            "is still loading"
        ) from exc
    return handles


def _kill(handle: Any) -> None:
    """Kill a reward service actor for good (one already gone is fine)."""
    try:
        ray.kill(handle, no_restart=True)
    except Exception as exc:  # an actor already gone is fine
        log.debug("could not kill %s: %s", handle, exc)


class RewardReplicas(list):
    """Reward service actor handles (a list) that know how to start one more like them.

    :func:`start_reward_services` returns one; its ``recipe`` (the actor options and the
    constructor's arguments) starts a fresh replica in the place of one that failed.
    Handles made otherwise come without a recipe: a failed one is only left out. ``cfg``
    gives the timeouts.
    """

    def __init__(
        self,
        handles: Iterable[Any] = (),
        recipe: Recipe | None = None,
        cfg: RewardsConfig | None = None,
    ):
        super().__init__(handles)
        self.recipe = recipe
        self.cfg = cfg or RewardsConfig()

    @classmethod
    def of(cls, handles: Iterable[Any]) -> RewardReplicas:
        """``handles`` itself if it is a RewardReplicas, else its handles without a recipe."""
        return handles if isinstance(handles, cls) else cls(handles)

    def position(self, handle: Any) -> int | None:
        return next((i for i, h in enumerate(self) if h is handle), None)

    def replace(self, handle: Any) -> None:
        """Kill ``handle``; a fresh replica takes its place once ready (none without a recipe)."""
        _kill(handle)
        at = self.position(handle)
        if at is None:  # already replaced
            return
        if self.recipe is None:
            del self[at]
            return
        self[at] = _start_actors(self.recipe, 1, self.cfg.service_start_timeout_s)[0]


def score_with_services(
    handles: Sequence[Any],
    images: Any,
    prompts: Sequence[str],
    ids: Sequence[str],
    batch_size: int | None = None,
    timeout_s: float | None = None,
) -> ScoreResult:
    """Score a batch over reward service replicas and merge the results by id.

    The batch is cut into calls of ``batch_size`` samples (default: an equal share per
    replica) dealt round robin to the replicas, which score in parallel. Ids are checked
    for duplicates over the whole batch first (a duplicate is an error for its id). A
    replica that hangs (``timeout_s``, default ``rewards.score_timeout_s``) or dies is
    replaced and its calls scored again (:class:`ScoringCalls`).
    """
    if not handles:
        raise ValueError("no reward service replicas to score with")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids, prompts, items, counts = split_call(images, prompts, ids)
    errors = {sid: f"sample {sid!r}: {duplicate_id(sid, n)}" for sid, n in counts.items() if n > 1}
    keep = [i for i, sid in enumerate(ids) if counts[sid] == 1]
    size = batch_size or max(1, math.ceil(len(keep) / len(handles)))
    calls = ScoringCalls(handles, timeout_s)
    for start in range(0, len(keep), size):
        part = keep[start : start + size]
        calls.submit(
            _pack([items[i] for i in part]), [prompts[i] for i in part], [ids[i] for i in part]
        )
    merged = calls.collect()
    merged.errors.update(errors)
    return merged


#: times a batch is sent to a replica before its failures end the scoring
SCORE_ATTEMPTS = 3


@dataclass(frozen=True)
class _Call:
    """One scoring call: the replica it went to, its arguments, the failed tries so far."""

    handle: Any
    batch: tuple[Any, list[str], list[str]]  # images, prompts, ids
    attempts: int = 0


class ScoringCalls:
    """Reward service calls in flight, waited for with a timeout; failed calls run again.

    :meth:`submit` sends a batch to the next replica (round robin); :meth:`collect`
    waits for all and merges the results by id, each batch's once. A replica that has
    calls waiting and answers none of them within ``timeout_s`` (default
    ``rewards.score_timeout_s``; counted from the start of :meth:`collect`, its last
    answer, or the call that found it idle) is hung; one whose call fails with
    :data:`ACTOR_LOST` (died, killed for memory, its node lost) is dead. Either way it is killed and replaced
    (:meth:`RewardReplicas.replace`) and its calls go to the replicas again; the call it
    was running counts one failure, and a batch that fails ``max_attempts`` times is an
    error naming its samples and the replica.
    """

    def __init__(
        self,
        replicas: Iterable[Any],
        timeout_s: float | None = None,
        max_attempts: int = SCORE_ATTEMPTS,
    ):
        self.replicas = RewardReplicas.of(replicas)
        self.timeout_s = self.replicas.cfg.score_timeout_s if timeout_s is None else timeout_s
        self.max_attempts = max_attempts
        self.turn = 0
        self.clear()

    def clear(self) -> None:
        """Forget the calls in flight and the results (the round robin turn stays)."""
        self.running: dict[Any, _Call] = {}  # ref -> call, in the order sent
        self.results: list[ScoreResult] = []
        self.ids: list[str] = []
        self._since: dict[Any, float] = {}  # replica -> when its wait began

    def submit(self, images: Any, prompts: Sequence[str], ids: Sequence[str]) -> None:
        """Send one batch to the next replica; :meth:`collect` gets its result."""
        self.ids.extend(ids)
        self._send(_Call(None, (images, list(prompts), list(ids))))

    def _send(self, call: _Call) -> None:
        if not self.replicas:
            raise RuntimeError("no reward service replica left to score with")
        handle = self.replicas[self.turn % len(self.replicas)]
        self.turn += 1
        if not any(c.handle is handle for c in self.running.values()):
            self._since[handle] = time.monotonic()
        self.running[handle.score.remote(*call.batch)] = _with(call, handle=handle)

    def collect(self) -> ScoreResult:
        """Every call's result, merged by id; hung or dead replicas are replaced."""
        try:
            self._since = dict.fromkeys(self._since, time.monotonic())
            while self.running:
                now = time.monotonic()
                due = min(self._since[c.handle] for c in self.running.values()) + self.timeout_s
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=max(0.0, due - now))
                if ready:
                    self._answer(ready[0])
                else:
                    self._time_out()
            return ScoreResult.merge(self.results)
        finally:
            self.clear()

    def _answer(self, ref: Any) -> None:
        """Keep a finished call's result; a dead replica fails on its oldest call."""
        call = self.running[ref]
        try:
            result = ray.get(ref, timeout=self.timeout_s)
        except ACTOR_LOST as exc:
            reason = f"died ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
            self._fail(call.handle, self._oldest(call.handle), reason)
            return
        del self.running[ref]
        self.results.append(result)
        self._since[call.handle] = time.monotonic()

    def _oldest(self, handle: Any) -> _Call:
        """The first call sent to ``handle`` still in flight: the one it is running."""
        return next(c for c in self.running.values() if c.handle is handle)

    def _time_out(self) -> None:
        """Fail the replica that has waited longest, if past the timeout, on its oldest call."""
        handle = min((c.handle for c in self.running.values()), key=self._since.__getitem__)
        if time.monotonic() - self._since[handle] >= self.timeout_s:
            reason = f"did not answer within {self.timeout_s:g} s (rewards.score_timeout_s)"
            self._fail(handle, self._oldest(handle), reason)

    def _fail(self, handle: Any, culprit: _Call, reason: str) -> None:
        """Replace ``handle`` and send its calls again, ``culprit`` with one more failure."""
        at = self.replicas.position(handle)
        actor = getattr(getattr(handle, "_actor_id", None), "hex", lambda: "?")()[:8]
        who = f"reward replica {at} (actor {actor})"
        ids = culprit.batch[2]
        samples = f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else ids[0]
        failed = culprit.attempts + 1
        refs = [ref for ref, c in self.running.items() if c.handle is handle]
        waiting = [c for c in map(self.running.pop, refs) if c is not culprit]
        self._since.pop(handle, None)
        if failed >= self.max_attempts:
            _kill(handle)
            raise RuntimeError(
                f"reward scoring: samples {samples} failed {failed} times; last: {who} {reason}"
            )
        log.warning(
            "%s %s; replacing it and scoring its %d sample(s) again (samples %s: failure %d "
            "of %d)",
            who, reason, sum(len(c.batch[2]) for c in [culprit, *waiting]), samples, failed,
            self.max_attempts,
        )  # fmt: skip
        self.replicas.replace(handle)
        now = time.monotonic()  # starting the fresh replica counts against no other
        self._since = {h: max(t, now) for h, t in self._since.items()}
        for call in [_with(culprit, attempts=failed), *waiting]:
            self._send(call)


def _pack(items: list[Any]) -> Any:
    """Same-shape tensors as one (N, 3, H, W) tensor (one buffer to ship); else the list.

    Tensors are copied: a pickled view carries its whole storage (the full batch).
    """
    if items and all(isinstance(x, torch.Tensor) for x in items):
        if len({tuple(x.shape) for x in items}) == 1 and items[0].dim() == 3:
            return torch.stack([x.detach().cpu() for x in items])
    return [x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x for x in items]
