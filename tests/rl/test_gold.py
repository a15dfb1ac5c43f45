"""The gold judge beside the proxy: from pixels only, the hacking verdict, rl/best."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.overoptimisation import format_version_table, proxy_gold_verdict, version_table
from generators.images import to_tensor, to_uint8
from generators.phantom import sample_record
from generators.phantom_render import render
from rl.gold import SimulatedGold, make_gold_judge, selection_score


def _swap_eye(prompt: str) -> str:
    return prompt.replace("left", "@").replace("right", "left").replace("@", "right")


@pytest.fixture(scope="module")
def phantoms():
    rng = np.random.default_rng(3)
    records = [sample_record(rng, f"g{i}") for i in range(12)]
    images = torch.stack([to_tensor(render(r, 64)) for r in records])
    return records, images


def test_gold_is_the_simulated_expert_rating_the_pixels(phantoms):
    """Gold equals SimulatedExpert.rate(image=...) (pixels only, no record), per image."""
    from rewards.simulated import SimulatedExpert

    records, images = phantoms
    prompts = [r.prompt for r in records]
    out = SimulatedGold().judge(images, prompts)
    expert = SimulatedExpert(noise=0.0)
    rated = [expert.rate(p, image=img) for p, img in zip(prompts, to_uint8(images), strict=True)]
    assert out["gold_quality"] == pytest.approx(np.mean([q for q, _ in rated]))
    assert out["gold_faithfulness"] == pytest.approx(np.mean([a for _, a in rated]))
    assert out["gold_combined"] == pytest.approx(np.mean([q + a for q, a in rated]))
    assert out["gold_fair_share"] == pytest.approx(np.mean([q >= 2 for q, _ in rated]))
    assert "fd_real" not in out  # no reference images given


def test_gold_sees_the_eye_and_the_blur_in_the_pixels(phantoms):
    records, images = phantoms
    prompts = [r.prompt for r in records]
    from eval.features import FallbackFeatures

    judge = SimulatedGold(reference=images, features=FallbackFeatures())  # fast; FID in the loop
    true = judge.judge(images, prompts)
    swapped = judge.judge(images, [_swap_eye(p) for p in prompts])
    assert true["gold_eye_match"] >= 0.9 and swapped["gold_eye_match"] <= 0.1
    assert swapped["gold_faithfulness"] < true["gold_faithfulness"]
    assert swapped["gold_quality"] == true["gold_quality"]  # the prompt does not change it
    # a blurred copy of the same images: quality falls, and it moves away from the real ones
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    soft = judge.judge(blurred, prompts)
    assert soft["gold_quality"] < true["gold_quality"] and soft["gold_fair_share"] == 0.0
    assert soft["fd_real"] > true["fd_real"]
    with pytest.raises(ValueError, match="2 prompts"):
        judge.judge(images[:3], prompts[:2])


def test_make_gold_judge_names_the_allowed_judges():
    assert make_gold_judge("none", [], 64) is None
    with pytest.raises(ValueError, match="allowed: simulated, none"):
        make_gold_judge("oracle", [], 64)


def _run(proxy, gold, se_p=0.005, se_g=0.05):
    records = [
        {
            "stage": "rl",
            "iteration": v,
            "eval_reward": p,
            "eval_reward_se": se_p,
            "gold_combined": g,
            "gold_combined_se": se_g,
        }  # fmt: skip
        for v, (p, g) in enumerate(zip(proxy, gold, strict=True))
    ]
    records[-1]["stage_n"] = 0
    return records


def test_verdict_flags_a_planted_hacked_run():
    """Proxy up, gold down (beyond 2 standard errors): hacking, in words, with versions."""
    hacked = _run([0.40, 0.42, 0.60, 0.70], [3.0, 3.0, 2.6, 2.4])
    v = proxy_gold_verdict(hacked)
    assert v["verdict"] == "hacking" and v["hacked"] == [2, 3]
    assert "REWARD HACKING" in v["text"] and "2, 3" in v["text"]
    assert proxy_gold_verdict(_run([0.40, 0.50], [3.0, 3.6]))["verdict"] == "confirmed"
    # a wobble inside the noise is not a trend, either way
    assert proxy_gold_verdict(_run([0.400, 0.402], [3.0, 2.98]))["verdict"] == "flat"
    assert proxy_gold_verdict(_run([0.40, 0.50], [3.0, 3.02]))["verdict"] == "unconfirmed"
    # gold fooled (it rises) while the images leave the real ones: hacking all the same
    away = _run([0.40, 0.60], [2.4, 2.5])
    away[0]["fd_real"], away[1]["fd_real"] = 160.0, 225.0
    v = proxy_gold_verdict(away)
    assert v["verdict"] == "hacking" and v["off_manifold"] == [1] and "+41%" in v["text"]
    no_gold = [{"iteration": 0, "eval_reward": 0.4}, {"iteration": 1, "eval_reward": 0.5}]
    assert proxy_gold_verdict(no_gold)["verdict"] == "no-gold"


def test_version_table_keeps_the_latest_record_of_a_version():
    records = _run([0.40, 0.45, 0.50], [3.0, 3.2, 3.4])
    records.insert(2, {**records[1], "eval_reward": 0.47})  # a resumed run repeats version 1
    rows = version_table(records)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["eval_reward"] == 0.47
    assert len(format_version_table(records)) == 4  # header + 3 versions


def test_selection_score_prefers_gold():
    r = {"eval_reward": 0.9, "gold_combined": 3.5}
    assert selection_score(r, "gold") == 3.5
    assert selection_score(r, "proxy") == 0.9
    assert selection_score({"eval_reward": 0.9}, "gold") == 0.9  # no gold judge: the proxy


def test_best_adapter_keeps_the_best_version_across_a_resume(tmp_path):
    from peft import LoraConfig

    from rl.checkpoints import BestAdapter

    peft_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    state = {"down.lora_A.weight": torch.ones(2, 4), "down.lora_B.weight": torch.zeros(4, 2)}
    best = BestAdapter(tmp_path / "best", "gold", peft_cfg, 0.25)
    best.offer(0, {"eval_reward": 0.5, "gold_combined": 3.0}, state)
    best.offer(1, {"eval_reward": 0.9, "gold_combined": 2.5}, state)  # proxy up, gold down
    best.offer(2, {"eval_reward": 0.6, "gold_combined": 3.0}, state)  # a tie keeps version 0
    meta = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert (meta["version"], meta["score"], meta["selected_by"]) == (0, 3.0, "gold_combined")
    resumed = BestAdapter(tmp_path / "best", "gold", peft_cfg, 0.25)
    assert (resumed.version, resumed.score) == (0, 3.0)
    resumed.offer(3, {"eval_reward": 0.6, "gold_combined": 3.4}, state)
    meta = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert meta["version"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left over


def test_best_adapter_skips_versions_that_left_the_real_images(tmp_path):
    from peft import LoraConfig

    from rl.checkpoints import BestAdapter

    peft_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    state = {"down.lora_A.weight": torch.ones(2, 4), "down.lora_B.weight": torch.zeros(4, 2)}
    best = BestAdapter(tmp_path / "best", "gold", peft_cfg, 0.25)
    best.offer(0, {"eval_reward": 0.5, "gold_combined": 2.4, "fd_real": 160.0}, state)
    best.offer(1, {"eval_reward": 0.6, "gold_combined": 2.6, "fd_real": 230.0}, state)  # +44 %
    best.offer(2, {"eval_reward": 0.6, "gold_combined": 2.5, "fd_real": 180.0}, state)  # +13 %
    assert best.version == 2
    resumed = BestAdapter(tmp_path / "best", "gold", peft_cfg, 0.25)
    assert resumed.base_fd == 160.0
    resumed.offer(3, {"eval_reward": 0.7, "gold_combined": 2.9, "fd_real": 210.0}, state)
    assert resumed.version == 2  # still away from the real images after a resume


def test_report_states_the_verdict_and_draws_proxy_against_gold():
    from eval.report import render_report

    records = _run([0.40, 0.42, 0.60, 0.70], [3.0, 3.0, 2.6, 2.4])
    grid = np.zeros((8, 8, 3), np.uint8)
    page = render_report({"run": "x"}, curves=records, version_grids=[(0, grid), (3, grid)])
    assert "REWARD HACKING" in page
    assert "proxy: eval_reward" in page and "gold: quality + faithfulness (2-6)" in page
    assert "adapter version 3: the evaluation images" in page
    assert "stage_n" not in page  # counters are not charted
