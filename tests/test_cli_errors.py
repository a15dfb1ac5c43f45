"""Every CLI error path ends in one line naming the file, row or key, never a traceback
(issue 13): `medrl` run in this process on bad inputs, its stderr read back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medrl.cli import main

#: what is not the error: log records, progress bars, a library's notice ("[transformers] ...")
_NOISE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) |%\||^\[\w+\] ")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not _NOISE.search(line)]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Bad inputs, one file each."""
    (tmp_path / "bad.yaml").write_text("rl:\n  lr: [1, 2\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00rl: 1\n")
    (tmp_path / "bad_row.csv").write_text("path,Text,modality\nimg/none.png,a fundus,fundus\n")
    (tmp_path / "fake.sqlite").write_text("not a database")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors at all")
    return tmp_path


# (case, argv with {d} for the inputs folder, what its last line says, exit status); others
# have tests of their own: a locked ratings store (tests/rewards/test_ratings.py), a held
# run directory (tests/test_runlock.py), an unreachable Jobs API (tests/test_cluster.py)
CASES = [
    ("missing preset", "config show --config {d}/nope.yaml", "{d}/nope.yaml does not exist", 2),
    (
        "preset not YAML",
        "config show --config {d}/bad.yaml",
        "{d}/bad.yaml: not valid YAML at line 3, column 1: expected ',' or ']'",
        2,
    ),
    ("preset not UTF-8", "config show --config {d}/binary.yaml", "binary.yaml: not UTF-8", 2),
    ("unknown key", "config show rl.iterationz=2", "unknown key rl.iterationz", 2),
    ("bad value", "config show rl.lr=abc", "rl.lr: expected a number, got 'abc'", 2),
    ("NaN", "config show rewards.threshold=nan", "rewards.threshold: nan is not a finite", 2),
    ("override not YAML", "config show tune.space=[a", "tune.space: cannot read value", 2),
    ("CSV missing", "data ingest {d}/nope.csv", "{d}/nope.csv: no such file", 2),
    ("CSV bad row", "data ingest {d}/bad_row.csv", "line 2 (path): 'img/none.png'", 1),
    (
        "not a ratings store",
        "ratings export {d}/out.csv --db {d}/fake.sqlite",
        "{d}/fake.sqlite: not a medrl ratings store",
        2,
    ),
    (
        "runtime env not YAML",
        "submit --address http://127.0.0.1:9 --runtime-env {d}/bad.yaml -- config show",
        "runtime env {d}/bad.yaml: not valid YAML at line 3",
        2,
    ),
    (
        "adapter not safetensors",
        "export {d}/adapter --out {d}/exported",
        "{d}/adapter/pytorch_lora_weights.safetensors: not a safetensors file",
        2,
    ),
]


@pytest.mark.parametrize(
    ("argv", "says", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_bad_input_ends_in_one_line_naming_it(inputs, capsys, argv, says, status):
    code = main(argv.format(d=inputs).split())
    err = capsys.readouterr().err
    assert code == status
    assert "Traceback" not in err
    lines = _error_lines(err)
    # a bad CSV: the file and its count of bad rows, then one line per bad row
    assert len(lines) == (2 if argv.startswith("data ingest") and code == 1 else 1), lines
    assert says.format(d=inputs) in lines[-1]


def test_a_failed_learner_ends_in_one_line_naming_its_error(monkeypatch, capsys):
    """An error no command expected (here Ray Train's, carrying each rank's traceback in its
    text): one line with the rank's own error, exit 1; `-v` shows the traceback."""
    from ray.train import WorkerGroupError

    from medrl.cli import reports
    from rl.loop import EmptyIterationsError

    cause = EmptyIterationsError("3 RL iterations in a row trained on nothing")
    text = "Traceback (most recent call last):\n  File ...\nEmptyIterationsError: 3 RL ..."

    def fail(args):
        raise WorkerGroupError(text, {0: cause})

    monkeypatch.setattr(reports, "cmd_config_show", fail)
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        "medrl: WorkerGroupError: learner rank 0 failed: EmptyIterationsError: 3 RL iterations "
        "in a row trained on nothing (-v shows the traceback)"
    ]
    with pytest.raises(WorkerGroupError):
        main(["-v", "config", "show"])
