"""One writer per run directory: runfiles.lock, and the commands that hold it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import runfiles.lock as rl_lock
from runfiles import LOCK_FILE, RunDirInUse, hold_run_dir

ROOT = Path(__file__).resolve().parents[1]

#: holds the run directory given as argv[1], says so, and waits for stdin to close
HOLDER = """
import sys
from runfiles import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def dead_pid() -> int:
    """The pid of a process that has ended (and has been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    lock.write_text(json.dumps({"started": "2025-01-02T03:04:05+00:00", **holder}))
    return lock


def test_a_second_acquire_in_this_process_is_refused_naming_the_holder(tmp_path: Path):
    run = tmp_path / "runs" / "x"
    with hold_run_dir(run):
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirInUse) as err, hold_run_dir(run):
            pass
        message = str(err.value)
        assert message.startswith(f"{run} is in use by pid {os.getpid()} on host ")
        assert f"since {holder['started']}" in message and "that pid is running" in message
        assert (run / LOCK_FILE).is_file()  # the refused one left the holder's lock alone
    assert not (run / LOCK_FILE).exists()
    assert sorted(p.name for p in run.iterdir()) == []


def test_another_process_is_refused_while_held_and_admitted_after(tmp_path: Path):
    run = tmp_path / "x"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=rf"in use by pid {holder.pid} on host"):
            with hold_run_dir(run):
                pass
    finally:
        holder.communicate("")  # closing stdin ends its block
    assert holder.returncode == 0 and not (run / LOCK_FILE).exists()
    with hold_run_dir(run):
        pass


def test_this_hosts_lock_of_a_process_that_is_gone_is_taken_over(tmp_path: Path, caplog):
    run = tmp_path / "x"
    pid = dead_pid()
    plant(run, pid=pid, host=socket.gethostname(), token="old")
    with caplog.at_level(logging.WARNING), hold_run_dir(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {pid} on this host" in caplog.text
    assert not (run / LOCK_FILE).exists()
    assert list(run.iterdir()) == []  # nothing set aside is left


def test_a_lock_from_before_a_reboot_is_taken_over_even_if_its_pid_runs(tmp_path: Path):
    run = tmp_path / "x"
    if not rl_lock._boot_id():
        pytest.skip("no boot id on this system")
    plant(run, pid=os.getpid(), host=socket.gethostname(), boot_id="another-boot", token="old")
    with hold_run_dir(run):
        assert json.loads((run / LOCK_FILE).read_text())["token"] != "old"


def test_a_lock_from_another_host_is_never_broken(tmp_path: Path):
    run = tmp_path / "x"
    lock = plant(run, pid=dead_pid(), host="gpu-node-7", token="theirs")
    with pytest.raises(RunDirInUse) as err, hold_run_dir(run):
        pass
    assert str(err.value) == (
        f"{run} is in use by pid {json.loads(lock.read_text())['pid']} on host gpu-node-7 "
        f"since 2025-01-02T03:04:05+00:00; if that process is gone, delete {lock} and "
        "rerun (a lock from another host is never broken automatically)"
    )
    assert json.loads(lock.read_text())["token"] == "theirs"


def test_an_unreadable_lock_is_refused_with_what_to_delete(tmp_path: Path):
    run = tmp_path / "x"
    run.mkdir()
    (run / LOCK_FILE).write_text("")
    with pytest.raises(RunDirInUse, match=r"cannot be read; if no process uses"):
        with hold_run_dir(run):
            pass


def test_the_lock_is_released_by_an_error_and_a_changed_lock_is_left(tmp_path: Path, caplog):
    run = tmp_path / "x"
    with pytest.raises(RuntimeError), hold_run_dir(run):
        raise RuntimeError("the run failed")
    assert not (run / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING), hold_run_dir(run):
        (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "h", "token": "t"}))
    assert (run / LOCK_FILE).is_file() and "no longer this process's" in caplog.text


def test_a_learner_knows_when_its_driver_no_longer_holds_the_lock(tmp_path: Path):
    """runfiles.holder_gone, what rl's check_driver asks before each checkpoint: Ray's
    workers can outlive a driver killed with SIGKILL by the rest of an iteration."""
    from runfiles import holder_gone, lock_token

    run = tmp_path / "run"
    host, boot = socket.gethostname(), rl_lock._boot_id()
    assert lock_token(run) is None  # no lock: the single-process loop checks nothing
    plant(run, pid=os.getpid(), host=host, boot_id=boot, token="t1")
    assert lock_token(run) == "t1" and holder_gone(run, "t1") == ""  # driver alive
    assert "no longer this run's driver's lock" in holder_gone(run, "t0")  # taken over
    plant(run, pid=dead_pid(), host=host, boot_id=boot, token="t1")
    assert "has ended" in holder_gone(run, "t1")  # the driver was killed
    plant(run, pid=dead_pid(), host="another-host", boot_id="b", token="t1")
    assert holder_gone(run, "t1") == ""  # another host's pid cannot be checked from here
    (run / LOCK_FILE).unlink()
    assert "removed" in holder_gone(run, "t1")


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path: Path, monkeypatch):
    def no_link(a, b):
        raise OSError(1, "Operation not permitted")  # EPERM: a file system without links

    monkeypatch.setattr(rl_lock.os, "link", no_link)
    run = tmp_path / "x"
    with hold_run_dir(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirInUse), hold_run_dir(run):
            pass
    assert list(run.iterdir()) == []


# --------------------------------------------------------------------------- the commands


def test_finetune_holds_the_run_directory_and_releases_it(tmp_path: Path, monkeypatch):
    import generators.finetune
    from medrl.config import load_config
    from medrl.runs import finetune_run

    cfg = load_config("configs/demo.yaml", [f"run.root={tmp_path}"])
    seen = []

    def finetune(run_dir, *sections, **kw):
        seen.append(json.loads((run_dir / LOCK_FILE).read_text())["pid"])
        raise RuntimeError("fine-tuning failed")

    monkeypatch.setattr(generators.finetune, "finetune", finetune)
    with pytest.raises(RuntimeError, match="fine-tuning failed"):
        finetune_run(cfg)
    assert seen == [os.getpid()] and (cfg.run_dir / "config.yaml").is_file()
    assert not (cfg.run_dir / LOCK_FILE).exists()


def test_rl_train_on_a_held_run_directory_exits_2_naming_the_holder(tmp_path: Path, capsys):
    from medrl.cli import main

    generator = tmp_path / "generator"
    generator.mkdir()
    (generator / "model_index.json").write_text("{}")  # what resolve_inputs looks for
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("colour fundus photograph, left eye\n")
    run = tmp_path / "runs" / "x"
    args = ["rl", "train", "--config", "configs/demo.yaml", f"run.root={tmp_path / 'runs'}"]
    args += ["run.name=x", f"rl.generator={generator}", "rl.reward=spatial"]
    args += [f"rl.prompts_file={prompts}"]
    with hold_run_dir(run):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"medrl: {run} is in use by pid {os.getpid()} on host" in err
    assert not (run / "config.yaml").exists()  # refused before it wrote anything
