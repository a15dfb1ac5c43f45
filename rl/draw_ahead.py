"""Rank 0's draws and evaluations, in order, up to ``rl.max_staleness`` iterations ahead.

With ``max_staleness`` s = 0 every iteration k evaluates adapter version k, then draws its
batch with version k, then trains: the synchronous loop. With s >= 1 a worker thread
does the same work ahead of the learner: while the learner trains on iteration k, the
thread evaluates nothing new and draws iteration k + s with the newest adapter it has
(version k), so the batch of iteration j is always drawn with version ``max(0, j - s)``
(:func:`draw_version`). Each sample's recorded log-probabilities are those of the version
that drew it, which is what the PPO ratio needs; the staleness of every trained sample
(iteration minus drawing version) goes into the iteration's record.

Which version draws which iteration depends only on (j, s), so a run resumed from a
checkpoint redraws the pending iterations exactly: the checkpoint keeps the adapters of
the versions they need (:meth:`DrawAhead.pending_adapters`, saved as safetensors).

One thread does every draw and evaluation in submission order, so the backend (its
sampler actors, reward replicas, object-store references) is never used by two calls at
once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

DRAW_ADAPTERS = "draw_adapters"


def draw_version(iteration: int, max_staleness: int) -> int:
    """The adapter version that draws iteration ``iteration``'s batch."""
    return max(0, iteration - max_staleness)


class DrawAhead:
    """Rank 0's queue of evaluations and draws (see the module docstring)."""

    def __init__(
        self,
        draw: Callable[[int, int, dict[str, torch.Tensor]], Any],
        evaluate: Callable[[int, dict[str, torch.Tensor]], Any],
        max_staleness: int,
        iterations: int,
    ):
        """``draw(k, version, adapter)`` draws iteration k; ``evaluate(k, adapter)`` judges
        version k. Both run on the worker thread when ``max_staleness`` > 0, inline
        otherwise."""
        self._draw, self._evaluate = draw, evaluate
        self.staleness, self.iterations = max_staleness, iterations
        self._pool = ThreadPoolExecutor(1, "medrl-draw-ahead") if max_staleness else None
        self._draws: dict[int, Future] = {}
        self._adapters: dict[int, dict[str, torch.Tensor]] = {}

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # surfaces at .result(), as from the thread
            done.set_exception(exc)
        return done

    def restore(self, directory: Path | None, start: int) -> None:
        """The adapters that drew the iterations pending at ``start`` (from a checkpoint)."""
        if directory is None or not self.staleness:
            return
        from safetensors.torch import load_file

        for version in self._pending_versions(start):
            path = directory / DRAW_ADAPTERS / f"version-{version:06d}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: missing; rl.max_staleness={self.staleness} resumes the draws "
                    f"that were pending at iteration {start} with the adapters that drew them "
                    "(a checkpoint written with another rl.max_staleness: use that value)"
                )
            self._adapters[version] = load_file(str(path))

    def _pending_versions(self, start: int) -> list[int]:
        """Versions (older than ``start``) that draw iterations ``start`` .. ``start + s - 1``."""
        ahead = range(start, min(start + self.staleness, self.iterations))
        return sorted({draw_version(j, self.staleness) for j in ahead} - {start})

    def pending_adapters(self, done: int) -> dict[str, dict[str, torch.Tensor]]:
        """File name -> adapter state, for the checkpoint after ``done`` iterations."""
        return {
            f"version-{v:06d}.safetensors": self._adapters[v] for v in self._pending_versions(done)
        }

    def begin(self, k: int, adapter: dict[str, torch.Tensor]) -> Future:
        """Iteration ``k`` starts with adapter version ``k``: queue its evaluation and the
        draws up to ``k + s``; returns the evaluation's future."""
        self._adapters[k] = adapter
        evaluation = self._submit(self._evaluate, k, adapter)
        for j in range(k, min(k + self.staleness, self.iterations - 1) + 1):
            if j not in self._draws:
                v = draw_version(j, self.staleness)
                self._draws[j] = self._submit(self._draw, j, v, self._adapters[v])
        keep = draw_version(k + 1, self.staleness)  # oldest version a later draw can need
        for v in [v for v in self._adapters if v < keep]:
            del self._adapters[v]
        return evaluation

    def batch(self, k: int) -> Any:
        """What ``draw`` returned for iteration ``k`` (waits for it)."""
        return self._draws.pop(k).result()

    def close(self) -> None:
        """Cancel what has not started; a draw under way finishes on its own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._draws.clear()
