"""Reading the RL loop's records back: the held-out reward by adapter version."""

from __future__ import annotations

import math

from rl.records import eval_curve, finite


def test_eval_curve_by_version_latest_record_wins_and_skips_missing():
    records = [
        {"iteration": 0, "eval_reward": 0.50},
        {"iteration": 1, "eval_reward": 0.52},
        # interrupted after iteration 1; the resumed run redoes iteration 1 and goes on
        {"iteration": 1, "eval_reward": 0.53},
        {"iteration": 2, "eval_reward": 0.55},
        {"iteration": 3, "stage_n": 0, "eval_reward": 0.58},  # the exported adapter
    ]
    assert eval_curve(records) == [0.50, 0.53, 0.55, 0.58]
    assert eval_curve(list(reversed(records))) == [0.50, 0.52, 0.55, 0.58]
    # rl.eval_prompts=0: every eval_reward is NaN (or absent)
    assert eval_curve([{"iteration": 0, "eval_reward": math.nan}, {"iteration": 1}]) == []


def test_finite_takes_real_numbers_only():
    assert finite(0.5) and finite(3)
    assert not any(finite(v) for v in (math.nan, math.inf, None, "0.5", True))
