"""The driver of `medrl rl train` killed with SIGKILL mid-iteration (issue 13, row 4): the
same command rerun takes over the dead driver's lock, resumes from `latest` and ends with
the adapter of an uninterrupted run, bit for bit; no temporary folder is left.

The real command in a subprocess of its own session (its own local Ray, as a user runs
it; two learner ranks, so the resume reloads a ZeRO-2 optimizer partitioned over ranks),
killed with its whole process group (the driver, Ray's GCS and raylet) right after it
reported iteration 0, whose checkpoint is committed by then. Ray's workers (the sampler,
the reward service, the learner ranks) run in process groups of their own and can outlive
the kill by the rest of the iteration: before a checkpoint the learner asks whether its
driver still holds the run's lock (rl.checkpoints.check_driver) and stops without writing
when not. Without that check an orphaned learner committed iteration 1 after the kill
(seen once on a quiet machine: the rerun then resumed after iteration 1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.rl.conftest import PROMPTS, RL_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "rl/adapter/pytorch_lora_weights.safetensors"


class Command:
    """`medrl rl train` in a new session; its output lines with the time each arrived."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDRL_RAY_DASHBOARD": "0"}
        env.pop("RAY_ADDRESS", None)
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medrl.cli", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the driver and its Ray
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip()))

    def seconds_to(self, text: str, timeout: float) -> float:
        """Seconds from the start to the first line containing ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}:\n{self.output()[-4000:]}")

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(30)
        return rc

    def kill_group(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _group_left(pgid: int, timeout: float = 30.0) -> list[str]:
    """The processes of group ``pgid`` still running (zombies not counted) once they have
    had ``timeout`` seconds to go."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True
        )
        left = [
            row for row in out.stdout.splitlines()
            if int(row.split()[1]) == pgid and not row.split()[2].startswith("Z")
        ]  # fmt: skip
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _ray_workers_left(name: str, timeout: float) -> list[str]:
    """Processes whose command line names ``name`` (Ray titles its workers so), once they
    have had up to ``timeout`` seconds to end."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True)
        left = [row for row in out.stdout.splitlines() if name in row and row[0] != "Z"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.mark.slow
def test_a_driver_killed_mid_iteration_resumes_on_rerun_to_the_same_adapter(
    rl_generator_dir, tmp_path
):
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def args(root: Path) -> list[str]:
        return [
            "rl", "train", "--config", "configs/demo.yaml", *RL_OVERRIDES,
            f"run.root={root}", "run.name=killed", f"rl.generator={rl_generator_dir}",
            f"rl.prompts_file={prompts}", "rl.iterations=2", "rl.num_samplers=1",
            "rl.learner_workers=2",
        ]  # fmt: skip

    whole = Command(args(tmp_path / "whole"))
    fresh_first = whole.seconds_to("[rl] iteration 0 ", 900)
    assert whole.wait(900) == 0, whole.output()[-4000:]

    run = tmp_path / "runs"
    ckpts = run / "killed" / "rl" / "checkpoints"
    first = Command(args(run))
    first.seconds_to("[rl] iteration 0 ", 900)  # reported after its checkpoint's commit
    assert (ckpts / "latest").read_text() == "step-000001\n"
    first.kill_group()
    assert _group_left(first.proc.pid) == []  # the driver, its GCS and raylet are gone
    # it died in iteration 1: not finished, not committed, the lock of a dead pid left
    assert (ckpts / "latest").read_text() == "step-000001\n"
    assert not (run / "killed" / "rl" / "adapter").exists()
    assert (run / "killed" / "run.lock").is_file()

    _ray_workers_left("RayTrainWorker", timeout=120)  # the orphaned learner ranks stopped
    assert (ckpts / "latest").read_text() == "step-000001\n"
    again = Command(args(run))
    resumed_first = again.seconds_to("[rl] iteration 1 ", 900)
    assert again.wait(900) == 0, again.output()[-4000:]
    out = again.output()
    assert "taking over the lock of pid" in out and "[rl] iteration 0 " not in out
    print(
        f"\nfirst iteration reported: fresh start {fresh_first:.1f} s, "
        f"rerun after the kill {resumed_first:.1f} s"
    )

    a, b = load_file(tmp_path / "whole" / "killed" / WEIGHTS), load_file(run / "killed" / WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (ckpts / "latest").read_text() == "step-000002\n"
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not (run / "killed" / "run.lock").exists()
