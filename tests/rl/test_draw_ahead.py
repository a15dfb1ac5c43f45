"""rl/draw_ahead.py without models: which version draws which iteration, that the draws
run while the caller works, what a checkpoint keeps, and errors reaching the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from rl.draw_ahead import DrawAhead, draw_version


def _adapter(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), float(version))}


class Calls:
    """Fake draw and evaluate that record (what, iteration, version, thread)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, str]] = []
        self.lock = threading.Lock()

    def draw(self, k: int, version: int, adapter: dict[str, torch.Tensor]):
        assert float(adapter["w"][0]) == version  # the adapter of that version
        with self.lock:
            self.log.append(("draw", k, version, threading.current_thread().name))
        return f"batch {k}", {"version": version}

    def evaluate(self, k: int, adapter: dict[str, torch.Tensor]):
        with self.lock:
            self.log.append(("eval", k, int(adapter["w"][0]), threading.current_thread().name))
        return {"eval": k}, None


def _loop(ahead: DrawAhead, start: int, stop: int, calls: Calls) -> list[int]:
    versions = []
    for k in range(start, stop):
        evaluation = ahead.begin(k, _adapter(k))
        batch, drawn = ahead.batch(k)
        assert batch == f"batch {k}" and evaluation.result() == ({"eval": k}, None)
        versions.append(drawn["version"])
    ahead.close()
    return versions


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_iteration_j_is_drawn_with_version_j_minus_s_in_order(staleness):
    calls = Calls()
    ahead = DrawAhead(calls.draw, calls.evaluate, staleness, iterations=6)
    assert _loop(ahead, 0, 6, calls) == [max(0, j - staleness) for j in range(6)]
    assert [draw_version(j, staleness) for j in range(6)] == [
        max(0, j - staleness) for j in range(6)
    ]
    draws = [k for what, k, _, _ in calls.log if what == "draw"]
    assert draws == list(range(6))  # each iteration drawn once, in order, none past the end
    threads = {name for *_, name in calls.log}
    if staleness:
        assert threads == {"medrl-draw-ahead_0"}  # one worker thread does all of it
    else:
        assert threads == {threading.current_thread().name}  # inline: the synchronous loop
        assert [(w, k) for w, k, _, _ in calls.log] == [
            (w, k) for k in range(6) for w in ("eval", "draw")
        ]


def test_the_next_draw_runs_while_the_caller_trains():
    started, release = threading.Event(), threading.Event()
    calls = Calls()

    def draw(k, version, adapter):
        if k == 1:
            started.set()
            assert release.wait(10)
        return calls.draw(k, version, adapter)

    ahead = DrawAhead(draw, calls.evaluate, 1, iterations=3)
    ahead.begin(0, _adapter(0))
    ahead.batch(0)
    assert started.wait(10)  # iteration 1 is being drawn before anyone asks for it
    release.set()
    assert ahead.batch(1)[0] == "batch 1"
    ahead.close()


def test_a_checkpoint_keeps_the_adapters_of_the_pending_draws(tmp_path):
    from safetensors.torch import save_file

    calls = Calls()
    whole = _loop(DrawAhead(calls.draw, calls.evaluate, 2, iterations=6), 0, 6, calls)
    first = DrawAhead(calls.draw, calls.evaluate, 2, iterations=6)
    for k in range(3):
        first.begin(k, _adapter(k))
        first.batch(k)
    saved = first.pending_adapters(3)  # after training iteration 2: 3 and 4 still pending
    first.close()
    assert sorted(saved) == ["version-000001.safetensors", "version-000002.safetensors"]
    (tmp_path / "draw_adapters").mkdir()
    for name, state in saved.items():
        save_file(state, str(tmp_path / "draw_adapters" / name))
    resumed = DrawAhead(calls.draw, calls.evaluate, 2, iterations=6)
    resumed.restore(tmp_path, 3)
    assert _loop(resumed, 3, 6, calls) == whole[3:]

    stricter = DrawAhead(calls.draw, calls.evaluate, 3, iterations=6)
    with pytest.raises(FileNotFoundError, match="version-000000.safetensors.*max_staleness=3"):
        stricter.restore(tmp_path, 3)


def test_an_error_in_a_draw_reaches_the_caller():
    def draw(k, version, adapter):
        raise RuntimeError(f"sampler lost in iteration {k}")

    ahead = DrawAhead(draw, Calls().evaluate, 1, iterations=4)
    ahead.begin(0, _adapter(0))
    with pytest.raises(RuntimeError, match="iteration 0"):
        ahead.batch(0)
    ahead.close()
