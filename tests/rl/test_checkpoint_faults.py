"""A crash at each step of an RL checkpoint commit (engine files, adapter, RNG and state,
the rename into place, ``latest``, pruning), as an exception and as a kill that runs no
cleanup: ``latest`` never names an incomplete checkpoint, the next start removes what
the commit left and resumes from the last checkpoint ``latest`` names, and the next commit
works over the leftovers. One rank, no DeepSpeed: a stand-in learner writes the engine
files, the real commit and resume do the rest."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

import generators.lora
import rl.checkpoints as ck
import runfiles.files as rf
from rl.checkpoints import commit_rl_checkpoint
from rl.loop import resume
from runfiles import LATEST, read_latest

STEPS = ["engine", "adapter", "state", "rename", "latest", "prune"]


class Crash(BaseException):
    pass


class StandInLearner:
    """Rank 0 of one: engine files written by :meth:`save`, the loaded one recorded."""

    rank, world, optimizer_steps = 0, 1, 0

    def __init__(self, crash_in_save: bool = False):
        self.crash_in_save, self.loaded = crash_in_save, None
        self.engine = type("Engine", (), {"module": None})()

    def save(self, directory: Path) -> None:
        (directory / "engine").mkdir()
        (directory / "engine" / "parameters.safetensors").write_bytes(b"weights")
        if self.crash_in_save:
            raise Crash("killed while the engine files were written")
        (directory / "engine" / "optimizer-rank-00000.safetensors").write_bytes(b"optimizer")

    def gathered(self):
        return contextlib.nullcontext()

    def load(self, directory: Path) -> None:
        self.loaded = directory


def fake_save_adapter(module, out: Path, formats=("diffusers",), extra=None) -> Path:
    out.mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (out / "adapter_config.json").write_text("{}")
    return out


def complete(ckpt: Path) -> bool:
    """Every file a checkpoint is made of is there."""
    names = ("engine/parameters.safetensors", "engine/optimizer-rank-00000.safetensors")
    names += ("rng.json", "state.json")
    names += ("adapter/pytorch_lora_weights.safetensors", "adapter/adapter_config.json")
    return all((ckpt / n).is_file() for n in names)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture()
def one_rank(monkeypatch):
    """No process group: a broadcast and a barrier of one rank change nothing."""
    monkeypatch.setattr(ck, "broadcast", lambda obj, src=0: obj)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **kw: None)
    monkeypatch.setattr(generators.lora, "save_adapter", fake_save_adapter)


def commit(root: Path, done: int, learner: StandInLearner | None = None, keep: int = 1) -> Path:
    state = {"iterations_done": done, "optimizer_steps": 10 * done}
    return commit_rl_checkpoint(learner or StandInLearner(), root, done, state, keep)


def raiser(what: str):
    def crash(*args, **kwargs):
        raise Crash(f"killed during {what}")

    return crash


def inject(step: str, mp: pytest.MonkeyPatch) -> StandInLearner:
    """Make the commit crash at ``step``; the learner to commit with."""
    if step == "adapter":

        def half_adapter(module, out, **kw):
            out.mkdir(parents=True)
            (out / "pytorch_lora_weights.safetensors").write_bytes(b"lo")
            raise Crash("killed while the adapter was written")

        mp.setattr(generators.lora, "save_adapter", half_adapter)
    elif step == "state":
        mp.setattr(ck, "save_rng_state", raiser("the RNG state"))
    elif step == "rename":
        mp.setattr(rf.os, "rename", raiser("the rename into place"))
    elif step == "latest":
        mp.setattr(rf.os, "replace", raiser("the rename of latest"))
    elif step == "prune":
        mp.setattr(ck, "prune_checkpoints", raiser("pruning"))
    return StandInLearner(crash_in_save=step == "engine")


@pytest.mark.parametrize("kill", [False, True], ids=["exception", "kill"])
@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_each_step_of_a_commit_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path, one_rank, step: str, kill: bool
):
    root = tmp_path / "rl" / "checkpoints"
    commit(root, 1)
    with pytest.MonkeyPatch.context() as mp:
        learner = inject(step, mp)
        if kill:  # a killed process runs no cleanup: nothing is removed until the crash
            mp.setattr(shutil, "rmtree", lambda *a, **kw: None)
            mp.setattr(pathlib.Path, "unlink", lambda *a, **kw: None)
        with pytest.raises(Crash):
            commit(root, 2, learner)

    # `latest` names a complete checkpoint: the new one only once it is whole and in place
    latest = read_latest(root)
    assert latest.name == ("step-000002" if step == "prune" else "step-000001")
    assert complete(latest)
    assert (root / "step-000002").is_dir() == (step in ("latest", "prune"))
    if not kill:  # the failed commit removed its temporary folder itself
        assert leftovers(root) == []
    elif step != "prune":
        assert leftovers(root)  # what a kill leaves, until the next start

    # the next start: leftovers removed, resumed from what `latest` names
    learner = StandInLearner()
    start = resume(learner, root, "x")
    assert leftovers(root) == []
    assert learner.loaded == latest and start == int(latest.name[-6:])
    assert learner.optimizer_steps == 10 * start
    assert json.loads((latest / "state.json").read_text())["iterations_done"] == start

    # and the next commit works over whatever the crash left (step-2 again: an exchange)
    final = commit(root, start + 1)
    assert read_latest(root) == final and complete(final)
    assert (root / LATEST).read_text() == f"{final.name}\n"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, final.name]


def test_the_next_start_puts_back_a_checkpoint_set_aside_by_a_crashed_recommit(
    tmp_path: Path, one_rank, monkeypatch
):
    """Without an atomic exchange, recommitting a folder sets the old one aside first; a
    kill between the two renames leaves it aside, and the next start puts it back."""
    root = tmp_path / "checkpoints"
    commit(root, 1, keep=2)
    commit(root, 2, keep=2)
    (root / LATEST).write_text("step-000001\n")  # as after a crash before `latest`
    monkeypatch.setattr(rf, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise Crash("killed between the renames")
        real_rename(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rf.os, "rename", rename)
        mp.setattr(shutil, "rmtree", lambda *a, **kw: None)
        with pytest.raises(Crash):
            commit(root, 2, keep=2)
    assert not (root / "step-000002").exists() and len(leftovers(root)) == 2
    assert resume(StandInLearner(), root, "x") == 1
    assert leftovers(root) == [] and complete(root / "step-000002")
