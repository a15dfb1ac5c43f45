"""Iterations that train on nothing (issue 13): every reward failed, or no sample passed
the stage-2 gate. They say so in their record, commit no checkpoint, and
``rl.max_empty_iterations`` of them in a row stop the run, which then resumes from the
last checkpoint that trained."""

from __future__ import annotations

import json

import pytest
import torch

from rewards.scores import ScoreResult
from tests.rl.conftest import EVAL_PROMPTS, PROMPTS, rl_config


def _run(cfg, generator_dir, reward):
    from rl.loop import run_local

    inputs = {
        "run_dir": str(cfg.run_dir),
        "generator_dir": str(generator_dir),
        "train_prompts": list(PROMPTS),
        "eval_prompts": EVAL_PROMPTS[:1],
    }
    return run_local(cfg, inputs, reward)


class _FailingFrom:
    """The spatial reward, except that every training sample of iteration ``first`` or
    later gets an error instead of a score (the evaluation images are still scored)."""

    def __init__(self, first: int):
        from rewards.scorers import build_reward

        self.inner, self.first = build_reward("spatial"), first

    def score(self, images, prompts, ids):
        result = self.inner.score(images, prompts, ids)
        for sid in ids:
            if sid.startswith("it") and int(sid[2:7]) >= self.first:
                del result.scores[sid]
                result.errors[sid] = f"sample {sid!r}: scoring failed: the service is down"
        return ScoreResult(result.scores, result.errors)


def _rl_records(cfg) -> list[dict]:
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "rl" and r.get("stage_n")]


def _latest(cfg) -> str | None:
    latest = cfg.run_dir / "rl" / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.exists() else None


def test_failed_rewards_stop_the_run_and_it_resumes_from_the_last_trained(
    rl_generator_dir, tmp_path
):
    from rl.loop import EmptyIterationsError

    torch.set_num_threads(1)
    common = ("run.name=empty", "rl.iterations=4", "rl.max_empty_iterations=2")
    cfg = rl_config(tmp_path, *common)
    with pytest.raises(EmptyIterationsError) as err:
        _run(cfg, rl_generator_dir, _FailingFrom(1))
    message = str(err.value)
    assert "2 RL iterations in a row trained on nothing" in message
    assert "rl.max_empty_iterations=2" in message
    assert "every sample's reward failed (8 of 8" in message

    records = _rl_records(cfg)
    assert [(r["iteration"], r["trained"]) for r in records] == [(0, True), (1, False), (2, False)]
    assert "reward failed" in records[1]["untrained"]
    assert records[1]["trained_samples"] == 0
    assert _latest(cfg) == "step-000001"  # the empty iterations committed nothing

    # the cause fixed, the same run name resumes after iteration 0 and trains the rest
    resumed, learner = _run(cfg, rl_generator_dir, _FailingFrom(99))
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    assert all(r["trained"] for r in resumed[:-1])
    assert _latest(cfg) == "step-000004"
    assert learner.optimizer_steps == 4 * 2  # 8 samples in micro-batches of 4, each iteration


def test_no_sample_past_the_gate_trains_nothing_and_commits_nothing(rl_generator_dir, tmp_path):
    torch.set_num_threads(1)
    # spatial:1 passes only a reward of 1 (left half white, right half black): none does
    cfg = rl_config(
        tmp_path, "run.name=gate", "rl.iterations=2", "rl.stage2_start=0", "rl.reward=spatial:1",
        "rl.max_empty_iterations=0",
    )  # fmt: skip
    from rewards.scorers import build_reward

    records, learner = _run(cfg, rl_generator_dir, build_reward("spatial:1"))
    assert [r.get("trained") for r in records] == [False, False, None]  # None: the final eval
    for r in records[:-1]:
        assert r["pass_rate"] == 0 and r["trained_samples"] == 0
        assert (
            r["untrained"]
            == "no sample passed the stage-2 gate (8 scored, none reached the threshold)"
        )
    assert learner.optimizer_steps == 0
    assert _latest(cfg) is None
