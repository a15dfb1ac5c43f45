"""The Tune search space: parsing, errors that name the entry, Ray Tune objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.tune import parse_space, to_tune_space


def test_space_parses_every_distribution():
    space = parse_space(
        [
            "rl.lr=loguniform(1e-4, 1e-2)",
            "rl.clip_range = uniform(0.1, 0.3)",
            "rl.group_size=randint(2, 9)",
            "rl.kl_weight=choice(0.0, 0.01)",
        ]
    )
    assert space == {
        "rl.lr": ("loguniform", (1e-4, 1e-2)),
        "rl.clip_range": ("uniform", (0.1, 0.3)),
        "rl.group_size": ("randint", (2, 9)),
        "rl.kl_weight": ("choice", (0.0, 0.01)),
    }
    tune_space = to_tune_space(space)
    lr = tune_space["rl.lr"].sample()
    assert 1e-4 <= lr <= 1e-2
    assert tune_space["rl.kl_weight"].sample() in (0.0, 0.01)
    assert 2 <= tune_space["rl.group_size"].sample() < 9


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("rl.lr=gaussian(0, 1)", "expected key=distribution"),
        ("rl.lr=uniform(0.3, 0.1)", "low must be below high"),
        ("rl.lr=loguniform(0, 1)", "low > 0"),
        ("rl.lr=uniform(1)", "two numbers"),
        ("rl.lr=choice()", "at least one value"),
        ("rl.lr=choice(a b)", "not literals"),
    ],
)
def test_bad_entries_name_the_entry(entry, message):
    with pytest.raises(ValueError) as info:
        parse_space(["rl.clip_range=uniform(0.1, 0.2)", entry])
    assert "tune.space[1]" in str(info.value) and message in str(info.value)


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="appears twice"):
        parse_space(["rl.lr=uniform(0.1, 0.2)", "rl.lr=choice(0.1)"])


def test_sweep_preset_loads_and_its_space_parses():
    from medrl.config import load_config

    cfg = load_config("configs/sweep.yaml")
    space = parse_space(cfg.tune.space)
    assert "rl.lr" in space and "rewards.threshold" in space


def test_trials_are_retried_tune_max_failures_times(tmp_path):
    """A trial that fails is run again (same run name: its RL run resumes from latest),
    tune.max_failures times; rl.max_failures is the learner's own, inside each try."""
    from cluster.tune import _tuner
    from medrl.config import load_config

    cfg = load_config("configs/sweep.yaml", ["tune.max_failures=3", "rl.max_failures=0"])
    tuner = _tuner(cfg, parse_space(cfg.tune.space), load_config, None, [], tmp_path)
    assert tuner._local_tuner.get_run_config().failure_config.max_failures == 3
    assert load_config("configs/sweep.yaml").tune.max_failures == 1  # the default
    with pytest.raises(ValueError, match="tune.max_failures"):
        load_config("configs/sweep.yaml", ["tune.max_failures=-1"])


def test_a_sweep_of_the_same_run_name_is_restored(tmp_path, monkeypatch):
    """Rerunning `medrl tune` restores the saved sweep (failed trials run again) instead of
    starting new trials, where Tune saved one under tune.out."""
    from ray import tune

    from cluster.tune import _tuner
    from medrl.config import load_config

    cfg = load_config("configs/sweep.yaml", ["run.name=sw"])
    space = parse_space(cfg.tune.space)
    saved = tmp_path / "ray" / "tune-sw"
    calls: list[tuple] = []
    monkeypatch.setattr(tune.Tuner, "can_restore", classmethod(lambda cls, p: Path(p) == saved))
    monkeypatch.setattr(
        tune.Tuner, "restore", classmethod(lambda cls, *a, **kw: calls.append((a, kw)) or "old")
    )
    assert _tuner(cfg, space, load_config, None, [], tmp_path) == "old"
    ((args, kwargs),) = calls
    assert args[0] == str(saved) and kwargs == {"resume_errored": True}
    other = tmp_path / "other"  # nothing saved there: a new sweep
    assert isinstance(_tuner(cfg, space, load_config, None, [], other), tune.Tuner)
    assert len(calls) == 1


# --------------------------------------------------------------------------- the sweep


@pytest.mark.slow
def test_medrl_tune_runs_trials_on_ray_and_writes_results_and_the_best_preset(
    rl_generator_dir, tmp_path, capsys, monkeypatch
):
    """`medrl tune` end to end: two trials (each an RL run: samplers, reward service, a
    TorchTrainer) under ASHA, results.csv with every trial, best.yaml a loadable preset
    holding the best trial's values and the base run's generator. The first trial crashes
    once after iteration 0 (rl.loop's MEDRL_TEST_FAIL_ONCE; rl.max_failures=0, so the
    trainer does not restart it itself): Tune retries it (tune.max_failures), it resumes
    from its own checkpoint, and the sweep finishes with every trial's row."""
    import csv

    import yaml

    from medrl.cli import main
    from medrl.config import load_config
    from rl.loop import FAIL_ONCE_ENV
    from rl.records import eval_curve, read_rl_records
    from tests.rl.conftest import PROMPTS, RL_OVERRIDES

    marker = tmp_path / "fail-after"
    marker.write_text("0")
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))  # the local Ray's workers inherit it

    # the dashboard serves the State API, through which Ray Train's placement group
    # cleaner notices the trainer of a trial that ASHA stopped
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    space = ["rl.lr=loguniform(1e-3, 3e-2)", "rl.clip_range=choice(0.1, 0.3)"]
    args = [
        "tune",
        "--config",
        "configs/sweep.yaml",
        *RL_OVERRIDES,
        f"run.root={tmp_path / 'runs'}",
        "run.name=sw",
        f"rl.generator={rl_generator_dir}",
        f"rl.prompts_file={prompts}",
        "rl.iterations=2",
        "rl.num_samplers=1",
        "tune.num_samples=2",
        "tune.max_failures=1",
        "rl.max_failures=0",
        f"tune.space={json.dumps(space)}",
    ]
    assert main(args) == 0
    assert not marker.exists()  # the injected crash happened, once
    printed = capsys.readouterr().out
    out = tmp_path / "runs" / "sw" / "tune"
    assert f"results: {out / 'results.csv'}" in printed
    assert f"best config: {out / 'best.yaml'}" in printed

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert row["error"] == ""
        assert 1e-3 <= float(row["rl.lr"]) <= 3e-2
        assert float(row["rl.clip_range"]) in (0.1, 0.3)
        assert 0.0 <= float(row["eval_reward_last"]) <= 1.0  # spatial reward, in [0, 1]
        # the last report: iteration 2 is the final evaluation; ASHA may stop the second
        # trial after iteration 1 (its first rung) when the first one is ahead there
        assert int(row["last_iteration"]) in (1, 2)
    # each trial is an RL run of its own (sw-<trial id>) in the base run's root
    trial_runs = sorted((tmp_path / "runs").glob("sw-*"))
    assert len(trial_runs) == 2
    for run in trial_runs:
        records = read_rl_records(run)
        assert records and records[0]["iteration"] == 0
        assert (run / "config.yaml").is_file()
        # its row reports what the run itself measured last
        trial_id = run.name.removeprefix("sw-")
        (row,) = [r for r in rows if trial_id in r["trial"]]
        curve = eval_curve(records)  # by adapter version = iteration
        assert float(row["eval_reward_last"]) == pytest.approx(curve[int(row["last_iteration"])])
    # the crashed trial was retried under its run name and resumed after iteration 0 from
    # its own checkpoint; the retry is Tune's first pending trial, so it reaches ASHA's
    # first rung first and runs to the end (its learner then writes its rank record)
    started = [json.loads(p.read_text())["started_at"] for p in _rank_records(trial_runs)]
    assert sorted(started)[-1] == 1 and started.count(1) == 1, started

    # the best: of the trials that ran furthest, the one with the highest last reward
    furthest = max(int(r["last_iteration"]) for r in rows)
    assert furthest == 2  # the first trial always runs to the end
    finalists = [r for r in rows if int(r["last_iteration"]) == furthest]
    best = max(finalists, key=lambda r: float(r["eval_reward_last"]))
    text = (out / "best.yaml").read_text()
    assert text.startswith("# best of 2 trials")
    cfg = load_config(out / "best.yaml")  # a preset `medrl rl train --config` takes
    assert cfg.rl.lr == pytest.approx(float(best["rl.lr"]))
    assert cfg.rl.clip_range == pytest.approx(float(best["rl.clip_range"]))
    assert cfg.rl.generator == str(rl_generator_dir) and cfg.rl.reward == "spatial"
    assert cfg.rl.iterations == 2 and yaml.safe_load(text)["run"]["name"] == "sw"

    # the same command again restores the finished sweep: no new trial, the same rows
    assert main(args) == 0
    assert sorted((tmp_path / "runs").glob("sw-*")) == trial_runs
    again = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["trial"] for r in again) == sorted(r["trial"] for r in rows)


def _rank_records(runs: list[Path]) -> list[Path]:
    """Rank 0's end-of-run record of each run that ran to its end."""
    return [p for run in runs for p in (run / "rl" / "ranks").glob("rank-000.json")]


def test_medrl_tune_refuses_a_bad_search_space_before_ray_starts(tmp_path, capsys):
    from medrl.cli import main

    args = [
        "tune",
        "--config",
        "configs/sweep.yaml",
        f"run.root={tmp_path}",
        'tune.space=["rl.lr=loguniform(0, 1)"]',
    ]
    ray = pytest.importorskip("ray")
    was_running = ray.is_initialized()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tune.space[0]" in err and "loguniform needs low > 0" in err
    assert not (tmp_path / "demo").exists()
    assert ray.is_initialized() == was_running  # refused before Ray was started


def test_the_learner_is_a_choice_that_reaches_the_trials_config():
    """`rl.algorithm=choice(...)` in tune.space: every drawn value becomes the trial's
    `rl.algorithm` through the same override a trial applies (cluster.tune._override); a
    value no learner has is refused like a command line's."""
    from cluster.tune import _override
    from medrl.config import load_config
    from runfiles.config import ConfigError

    space = parse_space(['rl.algorithm=choice("ddpo", "filter_retrain", "dpo")'])
    assert space == {"rl.algorithm": ("choice", ("ddpo", "filter_retrain", "dpo"))}
    domain = to_tune_space(space)["rl.algorithm"]
    drawn = {domain.sample() for _ in range(60)}
    assert drawn == {"ddpo", "filter_retrain", "dpo"}
    for value in drawn:
        cfg = load_config("configs/sweep.yaml", [_override("rl.algorithm", value)])
        assert cfg.rl.algorithm == value
    with pytest.raises(ConfigError, match="rl.algorithm"):
        load_config("configs/sweep.yaml", [_override("rl.algorithm", "ppo")])
