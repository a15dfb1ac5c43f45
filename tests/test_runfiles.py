"""The ground floor's run files: atomic writes, folder commits, the latest pointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import runfiles.files as rf
from runfiles import (
    atomic_path,
    atomic_write_text,
    read_latest,
    recover_folder,
    staged_folder,
    write_latest,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path):
    out = tmp_path / "a" / "metrics.json"
    atomic_write_text(out, "one")
    atomic_write_text(out, "two")
    assert out.read_text() == "two"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert out.read_text() == "two" and leftovers(out.parent) == []


def write_folder(dest: Path, text: str) -> None:
    with staged_folder(dest) as tmp:
        (tmp / "weights.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text(text)


class Crash(BaseException):
    pass


def crash_between_fallback_renames(dest: Path, monkeypatch) -> None:
    """Commit "v2" over ``dest`` without the exchange, killed after the old copy was set
    aside and before the new one was in place."""
    monkeypatch.setattr(rf, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise Crash("killed between the renames")
        real_rename(a, b)

    monkeypatch.setattr(rf.os, "rename", rename)
    with pytest.raises(Crash):
        write_folder(dest, "v2")
    monkeypatch.undo()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_crash_between_new_in_place_and_old_removed_leaves_a_loadable_copy(
    tmp_path: Path, monkeypatch, exchange: bool
):
    dest = tmp_path / "generator"
    write_folder(dest, "v1")
    swapped: list[bool] = []
    real_exchange = rf._exchange

    def exchange_or_not(a: Path, b: Path) -> bool:
        swapped.append(real_exchange(a, b) if exchange else False)
        return swapped[-1]

    monkeypatch.setattr(rf, "_exchange", exchange_or_not)

    def crash(path: Path) -> None:
        raise Crash("killed before the old copy was removed")

    monkeypatch.setattr(rf, "_remove", crash)
    with pytest.raises(Crash):
        write_folder(dest, "v2")
    assert (dest / "weights.txt").read_text() == "v2"  # the new copy is in place, whole
    assert (dest / "sub" / "config.json").read_text() == "v2"
    if exchange and swapped != [True]:
        pytest.skip("this file system cannot exchange folders (renameat2); fallback tested")
    monkeypatch.undo()
    write_folder(dest, "v3")  # and the next commit works over the leftovers
    assert (dest / "weights.txt").read_text() == "v3"


def test_fallback_crash_between_the_two_renames_is_recovered(tmp_path: Path, monkeypatch):
    dest = tmp_path / "adapter"
    write_folder(dest, "v1")
    crash_between_fallback_renames(dest, monkeypatch)
    assert not dest.exists()
    assert recover_folder(dest)
    assert (dest / "weights.txt").read_text() == "v1"  # the old copy, whole
    assert not recover_folder(dest)


def test_failed_folder_write_leaves_the_old_one_and_no_temporary(tmp_path: Path):
    dest = tmp_path / "ckpt"
    write_folder(dest, "v1")
    with pytest.raises(RuntimeError), staged_folder(dest) as tmp:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (dest / "weights.txt").read_text() == "v1"
    assert leftovers(tmp_path) == []


def test_latest_pointer_is_validated(tmp_path: Path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert read_latest(root) is None
    with pytest.raises(FileNotFoundError):
        write_latest(root, "step-000001")
    (root / "step-000001").mkdir()
    assert write_latest(root, "step-000001") == root / "step-000001"
    assert read_latest(root) == root / "step-000001"
    for bad in ("", "\n", "../../../etc", "/etc", "..", "a/b"):
        (root / "latest").write_text(bad)
        with pytest.raises(ValueError, match="latest"):
            read_latest(root)
    (root / "latest").write_text("step-000009\n")
    with pytest.raises(FileNotFoundError, match="step-000009"):
        read_latest(root)


def test_metrics_jsonl_one_policy_for_bad_lines(tmp_path: Path, caplog):
    from runfiles import append_metrics, read_metrics

    path = tmp_path / "run" / "metrics.jsonl"
    assert read_metrics(path) == []
    assert append_metrics(path, [{"stage": "unet", "step": 1}, {"stage": "rl", "iteration": 0}])
    with open(path, "a") as fh:
        fh.write('[1, 2]\n{"stage": "rl", "itera')  # not an object; a line torn by a crash
    append_metrics(path, [])  # nothing to add: the file is left alone
    with open(path, "a") as fh:
        fh.write('\n{"stage": "rl", "iteration": 1}\n')
    assert [r.get("iteration") for r in read_metrics(path, stage="rl")] == [0, 1]
    assert len(read_metrics(path)) == 3
    assert "line 3: not a JSON object" in caplog.text and "line 4" in caplog.text


def test_a_commit_after_a_fallback_crash_recovers_first_and_leaves_no_backup(
    tmp_path: Path, monkeypatch
):
    dest = tmp_path / "rewards"
    write_folder(dest, "v1")
    crash_between_fallback_renames(dest, monkeypatch)
    assert not dest.exists()
    write_folder(dest, "v3")  # commit_folder puts v1 back first, then replaces it
    assert (dest / "weights.txt").read_text() == "v3"
    assert leftovers(tmp_path) == []


def test_checkpoints_listed_oldest_first_and_pruned(tmp_path: Path):
    from runfiles import list_checkpoints, prune_checkpoints

    for name in ("step-000003", "step-000001", "step-000002", ".step-000004.tmp-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step-000003\n")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-000001", "step-000002", "step-000003"]  # fmt: skip
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert (tmp_path / ".step-000004.tmp-x").is_dir()  # a commit in progress is not touched


def test_check_format_names_the_file_and_refuses_newer_versions():
    from runfiles import check_format

    meta = {"format": "medrl-x", "version": 2}
    assert check_format(meta, "medrl-x", 2, "a.json", "thing") is meta
    with pytest.raises(ValueError, match=r"a\.json: not a medrl thing"):
        check_format({"format": "other", "version": 1}, "medrl-x", 2, "a.json", "thing")
    with pytest.raises(ValueError, match=r"a\.json: not a medrl thing"):
        check_format({"format": "medrl-x", "version": "2"}, "medrl-x", 2, "a.json", "thing")
    with pytest.raises(
        ValueError, match=r"version 3 is newer than this medrl reads \(2\); upgrade"
    ):
        check_format(
            {"format": "medrl-x", "version": 3}, "medrl-x", 2, "a.json", "thing", "upgrade"
        )


def test_clean_temporaries_removes_only_what_unfinished_writes_left(tmp_path: Path, caplog):
    from runfiles import clean_temporaries

    for name in ("step-000001", ".step-000002.tmp-ab", ".step-000001.old-cd", ".keep"):
        (tmp_path / name).mkdir()
    for name in ("latest", ".latest.x1.tmp", ".notes"):
        (tmp_path / name).write_text("step-000001\n")
    removed = clean_temporaries(tmp_path)
    assert [p.name for p in removed] == [
        ".latest.x1.tmp",
        ".step-000001.old-cd",
        ".step-000002.tmp-ab",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".keep",
        ".notes",
        "latest",
        "step-000001",
    ]
    assert "removed what interrupted writes left" in caplog.text
    (tmp_path / "step-000001").rename(tmp_path / ".step-000001.old-ef")  # set aside, not back
    assert clean_temporaries(tmp_path) == [] and (tmp_path / "step-000001").is_dir()
    assert clean_temporaries(tmp_path / "nowhere") == []
