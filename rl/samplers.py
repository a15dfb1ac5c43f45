"""Sampler actors: each holds the base generator plus the current LoRA adapter.

The driver puts each new adapter version in the object store once (``ray.put`` of the
adapter weights only) and hands every sampler call ``(version, [ref])``. A sampler whose
version differs fetches the weights and applies them with
:func:`generators.lora.set_adapter_state`, which checks every key and shape before it
writes, and the actor runs one call at a time, so no image is drawn with a half-applied
adapter. Every sample records the adapter version that drew it.

A sampler that dies is restarted by Ray (``max_restarts``); its unfinished call is
submitted again (by Ray's ``max_task_retries`` and, failing that, by
:func:`draw_samples`), and results are keyed by sample id, so nothing is lost or counted
twice. A restarted sampler starts without an adapter and fetches the current one from
the same reference.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from generators.config import LoraConfig, SamplingConfig
from rl.trajectories import Trajectories

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRequest:
    """One image to draw: its id (the join key for rewards), prompt and seed."""

    sample_id: str
    prompt: str
    seed: int


class Sampler:
    """Draws trajectories with the base generator and the adapter version it is given.

    Plain class: :func:`start_samplers` wraps it as a Ray actor; the single-process
    baseline (benchmarks/rl_iteration.py) uses it directly.
    """

    def __init__(
        self,
        generator_dir: str,
        lora: LoraConfig,
        sampling: SamplingConfig,
        device: str = "auto",
        threads: int | None = None,
    ):
        from generators.lora import attach_lora
        from generators.model import load_generator, resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.gen = load_generator(generator_dir).to(self.device)
        attach_lora(self.gen.unet, lora)
        self.gen.unet.eval()
        self.sampling = sampling
        self.version = -1
        self.calls = 0
        self.fetches = 0  # adapter versions applied (one per new version)
        self.folded = None
        if sampling.merge_lora:
            from generators.lora import FoldedAdapter

            self.folded = FoldedAdapter(self.gen.unet)
            self.folded.fold()
        self.compiled = False
        if sampling.compile:
            from generators.compiling import compile_in_place

            self.compiled = compile_in_place(self.gen.unet)

    def set_adapter(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Apply adapter ``version``; with ``sampling.merge_lora`` the old adapter is taken
        out of the base weights first and the new one (or, if ``state`` is refused, the old
        one) folded in again."""
        import contextlib

        from generators.lora import set_adapter_state

        with self.folded.unfolded() if self.folded else contextlib.nullcontext():
            set_adapter_state(self.gen.unet, state)  # checks everything before writing
        self.version = version

    def sample(
        self, requests: Sequence[SampleRequest], version: int, adapter: list[Any]
    ) -> Trajectories:
        """Draw ``requests`` with adapter ``version``; ``adapter`` is ``[ref or state]``.

        The reference sits inside a list so that Ray does not fetch the weights for calls
        that already hold this version.
        """
        if version != self.version:
            state = adapter[0]
            if not isinstance(state, dict):
                import ray

                state = ray.get(state)
            self.set_adapter(version, state)  # raises before writing if anything is off
            self.fetches += 1
        self.calls += 1
        out = self._draw(requests)
        return Trajectories(
            ids=[r.sample_id for r in requests],
            prompts=out.prompts,
            seeds=out.seeds,
            versions=[self.version] * len(requests),
            images=out.images,
            latents=out.latents,
            log_probs=out.log_probs,
            timesteps=out.timesteps,
            meta={"pid": os.getpid()},
        )

    def _draw(self, requests: Sequence[SampleRequest]):
        """:func:`generators.sampling.sample`; a compiled UNet that fails is made eager
        (one warning) and the call drawn again: each sample's noise comes from its seed, so
        the redraw is what the first try would have drawn."""
        from generators.sampling import sample

        s = self.sampling
        args = ([r.prompt for r in requests], [r.seed for r in requests])
        kwargs = dict(num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale,
                      batch_size=s.batch_size)  # fmt: skip
        if not self.compiled:
            return sample(self.gen, *args, **kwargs)
        try:
            return sample(self.gen, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a real fault fails again eagerly
            from generators.compiling import make_eager

            what = str(exc).strip().split("\n\n")[0].replace("\n", " ")  # torch's hints follow
            log.warning("sampling.compile: the compiled UNet failed (%s: %s); drawing eagerly",
                        type(exc).__name__, what)  # fmt: skip
            make_eager(self.gen.unet)
            self.compiled = False
            return sample(self.gen, *args, **kwargs)

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": self.version,
            "calls": self.calls,
            "fetches": self.fetches,
            "compiled": self.compiled,
        }


def start_samplers(
    count: int,
    generator_dir: str,
    lora: LoraConfig,
    sampling: SamplingConfig,
    num_gpus: float = 0.0,
    max_restarts: int = 3,
    max_task_retries: int | None = None,
) -> list[Any]:
    """Start ``count`` sampler actors (fractional GPUs where the cluster has them).

    A dead actor is restarted up to ``max_restarts`` times and Ray resubmits its
    unfinished call up to ``max_task_retries`` times (default: ``max_restarts``); 0 leaves
    the resubmission to :func:`draw_samples`. Returns at once; the actors load the
    generator in the background (calls queue until they are ready).
    """
    import ray

    gpus = num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    actor = ray.remote(Sampler).options(
        num_cpus=1,
        num_gpus=gpus,
        max_restarts=max_restarts,
        max_task_retries=max_restarts if max_task_retries is None else max_task_retries,
        max_concurrency=1,
        # placed by the cluster, never inside the caller's placement group (a Ray Tune
        # trial's holds only its driver function)
        scheduling_strategy="DEFAULT",
    )
    device = "cuda" if gpus > 0 else "cpu"
    return [
        actor.remote(generator_dir, lora, sampling, device=device, threads=1) for _ in range(count)
    ]


def chunked(requests: Sequence[SampleRequest], size: int) -> list[list[SampleRequest]]:
    return [list(requests[i : i + size]) for i in range(0, len(requests), size)]


_Chunk = list[SampleRequest]


class _ChunkQueue:
    """The state of one :func:`draw_samples` call: chunks waiting, running and answered,
    samplers free or being probed after a failure."""

    def __init__(self, samplers: Sequence[Any], chunks: list[_Chunk]):
        self.samplers = samplers
        self.pending: list[tuple[_Chunk, int]] = [(c, 0) for c in chunks]
        self.free = list(range(len(samplers)))
        self.running: dict[Any, tuple[int, _Chunk, int]] = {}
        # info() of a failed sampler: (who, deadline)
        self.probes: dict[Any, tuple[int, float]] = {}
        self.done: dict[str, tuple[Trajectories, int]] = {}
        self.redrawn = 0

    def submit(self, version: int, adapter_ref: Any) -> None:
        """Hand waiting chunks to free samplers, first in the queue to first free."""
        while self.pending and self.free:
            (work, attempts), who = self.pending.pop(0), self.free.pop(0)
            ref = self.samplers[who].sample.remote(work, version, [adapter_ref])
            self.running[ref] = (who, work, attempts)

    def probe(self, who: int, deadline: float) -> None:
        """Ask sampler ``who`` for ``info()``; it gets work again once that answers."""
        self.probes[self.samplers[who].info.remote()] = (who, deadline)

    def answer_probe(self, ref: Any) -> None:
        """Free the probed sampler if it answered; ask again until its deadline if not."""
        import ray

        from rewards.service import ACTOR_LOST

        who, deadline = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ACTOR_LOST:
            if time.monotonic() < deadline:
                time.sleep(0.2)  # still restarting: ask again shortly
                self.probe(who, deadline)
            else:
                log.warning("sampler %d did not come back; not used again", who)
            return
        self.free.append(who)

    def collect(self, ref: Any, max_attempts: int, restart_timeout_s: float) -> Trajectories | None:
        """The new samples of a finished chunk, or None if its sampler died (then the
        chunk goes back to the front of the queue and the sampler is probed)."""
        import ray

        from rewards.service import ACTOR_LOST

        who, work, attempts = self.running.pop(ref)
        try:
            part: Trajectories = ray.get(ref)
        except ACTOR_LOST as exc:
            attempts += 1
            self.redrawn += len(work)
            if attempts >= max_attempts:
                raise RuntimeError(
                    f"samples {work[0].sample_id}..{work[-1].sample_id} failed {attempts} "
                    f"times (sampler {who}): {exc}"
                ) from exc
            log.warning(
                "sampler %d lost (%s); redrawing %d samples (%s..)",
                who, type(exc).__name__, len(work), work[0].sample_id,
            )  # fmt: skip
            self.pending.insert(0, (work, attempts))
            self.probe(who, time.monotonic() + restart_timeout_s)  # work again once it is back
            return None
        self.free.append(who)
        fresh = [i for i, sid in enumerate(part.ids) if sid not in self.done]
        if len(fresh) != len(part.ids):
            part = part.select(fresh)
        for i, sid in enumerate(part.ids):
            self.done[sid] = (part, i)
        return part


def _in_request_order(
    parts: list[Trajectories], ids: list[str], done: dict[str, Any]
) -> Trajectories:
    """The drawn parts as one batch in the order of ``ids``; every id must be in ``done``."""
    missing = [sid for sid in ids if sid not in done]
    if missing:
        raise RuntimeError(f"draw_samples: {len(missing)} samples never came back: {missing[:5]}")
    merged = Trajectories.cat(parts)
    position = {sid: i for i, sid in enumerate(merged.ids)}
    return merged.select([position[sid] for sid in ids])


def draw_samples(
    samplers: Sequence[Any],
    requests: Sequence[SampleRequest],
    version: int,
    adapter_ref: Any,
    chunk: int,
    on_chunk: Callable[[Trajectories], None] | None = None,
    max_attempts: int = 4,
    restart_timeout_s: float = 300.0,
) -> tuple[Trajectories, dict[str, Any]]:
    """Spread ``requests`` over the sampler actors; return them in request order.

    Chunks go to whichever sampler is free (``ray.wait``). A sampler that dies is
    restarted by Ray (on another node if its node was lost), which also retries its
    unfinished call on the restarted actor (``max_task_retries``). A call that still fails
    because its sampler is gone (:data:`rewards.service.ACTOR_LOST`: the actor died, Ray's
    memory monitor killed it, its node or its result was lost) goes back to
    the front of the queue, for the next free sampler; the failed sampler gets no work
    until it answers ``info()`` again (it is restarting), and none at all if it is not
    back within ``restart_timeout_s``. A chunk that fails ``max_attempts`` times is an
    error. Results are keyed by sample id: a chunk answered twice is counted once, and
    the function checks that every id came back exactly once. ``on_chunk`` sees each
    finished chunk as it arrives (rewards can score while others draw).
    ``meta["redrawn"]`` counts the samples submitted again here.
    """
    import ray

    ids = [r.sample_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("draw_samples: duplicate sample ids in the requests")
    if not samplers:
        raise ValueError("draw_samples: no sampler actors")
    queue = _ChunkQueue(samplers, chunked(requests, chunk))
    parts: list[Trajectories] = []
    t0 = time.perf_counter()
    while queue.pending or queue.running:
        queue.submit(version, adapter_ref)
        if not queue.running and not queue.probes:
            raise RuntimeError(
                f"draw_samples: no sampler came back within {restart_timeout_s:g} s; "
                f"{sum(len(w) for w, _ in queue.pending)} samples not drawn"
            )
        ready, _ = ray.wait([*queue.running, *queue.probes], num_returns=1)
        if ready[0] in queue.probes:
            queue.answer_probe(ready[0])
            continue
        part = queue.collect(ready[0], max_attempts, restart_timeout_s)
        if part is not None and len(part):
            parts.append(part)
            if on_chunk is not None:
                on_chunk(part)
    out = _in_request_order(parts, ids, queue.done)
    out.meta = {"seconds": time.perf_counter() - t0, "redrawn": queue.redrawn}
    return out, out.meta
