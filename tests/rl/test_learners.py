"""The learners ``rl.algorithm`` chooses (rl/learners): the choice and its dispatch, the
states their denoising losses are taken at, the held-out pixel reward each raises, and
checkpoints that resume like DDPO's (tests/rl/test_learning.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.rl.conftest import EVAL_PROMPTS, rl_config
from tests.rl.test_learning import (
    DEFAULT_BATCH,
    _checkpoint_listing,
    _Interrupt,
    _interrupt_at,
    _run,
)

#: the demo's shipped base generator (a trained UNet) and the overrides that sample it
DEMO_BASE_DIR = Path(__file__).resolve().parents[2] / "generators/assets/demo-base"
DEMO_BASE = ("model.resolution=64", "data.demo_size=64")
#: filter_retrain's and feature_align's settings in the reward-gain tests: the gate keeps
#: samples scoring >= 0.51 (the base's held-out mean is 0.504), the loss on freshly
#: noised final latents (medrl finetune's), no real pairs
GATED = (
    "rl.iterations=8", "rl.checkpoint_every=8", "rl.reward=spatial:0.51", "rl.lr=1e-2",
    "rl.real_share=0", "rl.denoise_states=forward", "rl.max_empty_iterations=8",
    *DEMO_BASE, *DEFAULT_BATCH,
)  # fmt: skip


def test_the_algorithm_is_a_validated_choice_and_picks_the_learner(tmp_path):
    from rl.learner import Learner
    from rl.learners import learner_class, stage_of
    from rl.learners.dpo import DPOLearner
    from rl.learners.filter_retrain import FilterRetrainLearner
    from runfiles.config import ConfigError

    assert rl_config(tmp_path).rl.algorithm == "ddpo"
    with pytest.raises(ConfigError, match="rl.algorithm"):
        rl_config(tmp_path, "rl.algorithm=ppo")
    assert learner_class("ddpo") is Learner
    assert issubclass(learner_class("filter_retrain"), FilterRetrainLearner)
    assert learner_class("dpo") is DPOLearner
    assert learner_class("feature_align").__name__ == "FeatureAlignLearner"
    # which samples each trains on: DDPO gates from stage2_start, filter_retrain always,
    # DPO never (it needs the losers)
    rl = rl_config(tmp_path, "rl.stage2_start=2").rl
    assert [stage_of(rl, k) for k in range(4)] == [1, 1, 2, 2]
    fr = rl_config(tmp_path, "rl.algorithm=filter_retrain").rl
    dpo = rl_config(tmp_path, "rl.algorithm=dpo").rl
    assert [stage_of(fr, k) for k in range(3)] == [2, 2, 2]
    assert [stage_of(dpo, k) for k in range(3)] == [1, 1, 1]
    fa = rl_config(tmp_path, "rl.algorithm=feature_align").rl
    assert [stage_of(fa, k) for k in range(3)] == [2, 2, 2]


def test_reward_pairs_pair_best_with_worst_within_a_prompt():
    from rl.learners.dpo import reward_pairs

    prompts = ["a", "a", "b", "a", "b", "a", "b"]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.5, 0.7, 0.2])
    # a: rows 1 (0.9) > 5 (0.7) > 3 (0.4) > 0 (0.1); b: 2 = 4 (0.5) > 6 (0.2)
    assert reward_pairs(prompts, scores) == [(1, 0), (5, 3), (2, 6)]


def test_dpo_loss_by_hand():
    from rl.learners.dpo import dpo_loss

    model = torch.tensor([0.2, 0.5])  # winner, loser errors under the model
    ref = torch.tensor([0.4, 0.4])
    loss, stats = dpo_loss(model, ref, beta=10.0, weights=torch.ones(1))
    inside = -0.5 * 10.0 * ((0.2 - 0.5) - (0.4 - 0.4))  # +1.5: the model prefers the winner
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(inside)))
    assert stats["dpo_accuracy"].item() == 1.0


def test_trajectory_states_are_the_visited_ones(rl_generator_dir, tmp_path):
    """rl.denoise_states=trajectory: a row is taken at the state x_t its trajectory visited
    at a trained DDIM step, with the target that takes x_t to its final latent; forward:
    the final latent noised afresh (not a visited state)."""
    from dataclasses import replace

    from rl.learners import make_learner

    torch.set_num_threads(1)
    learner = make_learner(rl_config(tmp_path, "rl.algorithm=dpo"), rl_generator_dir, {})
    timesteps = learner.scheduler.timesteps.clone()
    traj = torch.randn(3, len(timesteps) + 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = learner.trained_steps(timesteps)[torch.tensor([0, 2, 1])]
    noised = learner.noised_samples(traj, timesteps, torch.Generator(), steps=steps)
    assert torch.equal(noised.t, timesteps[steps])
    torch.testing.assert_close(noised.noisy, traj[torch.arange(3), steps], atol=1e-5, rtol=0)
    a = learner.scheduler.alphas_cumprod[noised.t].view(-1, 1, 1, 1)
    x0 = (noised.noisy - (1 - a).sqrt() * noised.target) / a.sqrt()  # DDIM's x_0 prediction
    torch.testing.assert_close(x0, traj[:, -1], atol=1e-4, rtol=0)
    learner.cfg = replace(learner.cfg, denoise_states="forward")
    forward = learner.noised_samples(traj, timesteps, torch.Generator().manual_seed(1))
    assert not torch.allclose(forward.noisy, traj[torch.arange(3), steps], atol=1e-2)
    torch.testing.assert_close(forward.latents, traj[:, -1])


def _gain(cfg, generator_dir) -> tuple[float, str]:
    records, _ = _run(cfg, generator_dir, EVAL_PROMPTS * 4)
    evals = [r["eval_reward"] for r in records]
    return evals[-1] - evals[0], " ".join(f"{e:.4f}" for e in evals)


@pytest.mark.slow
def test_dpo_raises_held_out_spatial_reward(rl_generator_dir, tmp_path):
    """DPO on each iteration's reward pairs (4 prompts x 8 images, 16 pairs) raises the
    spatial reward of 16 held-out images (test_learning.py's evaluation: prompts never
    trained on, fixed seeds) by at least MARGIN in 12 iterations.

    Measured with these settings (docs/rl.md, "Learners"; benchmarks/rl_learning.py):
    run seeds 0-4 gain +0.032, +0.032, +0.029, +0.024, +0.045 (mean 0.032); this test runs
    seed 0. With the training rewards replaced by random numbers (no signal, same
    settings) the same evaluation moved +0.011, -0.009, +0.003 (seeds 0-2). MARGIN = 0.02
    is above every no-signal run and below every seed's gain. Seed 0 with each pair's
    winner and loser swapped moves it by -0.035; on freshly noised final latents
    (rl.denoise_states=forward, medrl finetune's loss) by -0.011.
    """
    MARGIN = 0.02
    torch.set_num_threads(1)
    cfg = rl_config(
        tmp_path, "run.name=dpo", "rl.iterations=12", "rl.checkpoint_every=12",
        "rl.algorithm=dpo", "rl.dpo_beta=200", "rl.lr=2e-3", *DEFAULT_BATCH,
    )  # fmt: skip
    gain, curve = _gain(cfg, rl_generator_dir)
    assert gain >= MARGIN, f"held-out reward per iteration: {curve}"


def _gain_and_reversed(tmp_path, *overrides: str) -> tuple[float, float, str]:
    """Held-out spatial gains of a gated learner on the demo's base (``GATED``): trained on
    the reward, and trained on the reversed reward (1 - r, the gate on it; the evaluation
    still scores the reward itself)."""
    from tests.rl.conftest import ReversedTrainingRewards

    curves = []
    for name, wrapper in (("up", None), ("reversed", ReversedTrainingRewards)):
        cfg = rl_config(tmp_path / name, f"run.name={name}", *overrides, *GATED)
        records, _ = _run(cfg, DEMO_BASE_DIR, EVAL_PROMPTS * 4, reward_wrapper=wrapper)
        curves.append([r["eval_reward"] for r in records])
    text = "; ".join(" ".join(f"{e:.4f}" for e in c) for c in curves)
    return curves[0][-1] - curves[0][0], curves[1][-1] - curves[1][0], text


#: the two gated learners' reward-gain tests below: the held-out gain trained on the
#: reward minus the gain trained on the reversed reward, per run seed 0-4 (settings GATED,
#: benchmarks/rl_learning.py --generator generators/assets/demo-base --reverse; docs/rl.md,
#: "filter_retrain and feature_align on the demo's base"):
#:   filter_retrain +0.0087 - (-0.0239), +0.0109 - (-0.0115), +0.0133 - (-0.0204),
#:                  +0.0075 - (-0.0230), +0.0120 - (-0.0161): 0.022 to 0.034
#:   feature_align  +0.0123 - (-0.0208), +0.0100 - (-0.0205), +0.0189 - (-0.0185),
#:                  +0.0082 - (-0.0183), +0.0054 - (-0.0130): 0.018 to 0.037
#: Without a signal (random training rewards, the gate's passes shuffled) the same runs
#: moved it -0.0119 to +0.0050 (filter_retrain, 10 runs) and -0.0071 to +0.0058
#: (feature_align, 10 runs): two such runs differ by at most 0.0177. The tests run seed 0.
REVERSAL_MARGIN = 0.018


@pytest.mark.slow
def test_filter_retrain_moves_held_out_spatial_reward_the_rewards_way(tmp_path):
    """filter_retrain on a trained UNet (the demo's shipped base, 64 px), gate spatial:0.51,
    8 iterations: the held-out spatial reward of 16 images rises, and ends at least
    REVERSAL_MARGIN above where the same run trained on the reversed reward ends.
    Fine-tuning on what the gate keeps moves the distribution toward it. (On the 32 px
    fixture's untrained UNet it does not learn measurably: docs/rl.md.)"""
    torch.set_num_threads(1)
    up, reversed_, curves = _gain_and_reversed(tmp_path, "rl.algorithm=filter_retrain")
    assert up > 0 and up - reversed_ >= REVERSAL_MARGIN, f"held-out reward: {curves}"


@pytest.mark.slow
def test_feature_align_moves_held_out_spatial_reward_the_rewards_way(tiny_selector_dir, tmp_path):
    """feature_align (filter_retrain's step plus the alignment term at rl.align_weight 1,
    aligned to the tests' tiny selector), as filter_retrain's test: the alignment term
    does not stop the gated fine-tuning from moving the reward its way."""
    torch.set_num_threads(1)
    up, reversed_, curves = _gain_and_reversed(
        tmp_path, "rl.algorithm=feature_align", "rl.align_weight=1",
        f"rl.align_expert={tiny_selector_dir}",
    )  # fmt: skip
    assert up > 0 and up - reversed_ >= REVERSAL_MARGIN, f"held-out reward: {curves}"


@pytest.mark.parametrize(
    "algorithm",
    [
        ("filter_retrain", "rl.real_share=0.25", "rl.reward=spatial:0.45"),
        ("dpo",),
        (
            "feature_align", "rl.real_share=0.25", "rl.reward=spatial:0.45",
            "rl.align_expert={selector}",
        ),
    ],
)  # fmt: skip
def test_checkpoints_resume_like_ddpo(algorithm, rl_generator_dir, tiny_selector_dir, tmp_path):
    """As DDPO's (test_learning.py): a run interrupted after iteration 0's checkpoint and
    resumed by a fresh learner (another initial adapter, another global RNG state) ends
    with the adapter and records of the uninterrupted run. filter_retrain and
    feature_align mix in real pairs here, so their draws resume too; feature_align's W_p
    (trained beside the adapter, not in it) resumes with it."""
    name, *extra = algorithm
    extra = [e.format(selector=tiny_selector_dir) for e in extra]
    torch.set_num_threads(1)
    manifest = rl_generator_dir.parent / "data" / "manifest.parquet"
    common = (
        "run.name=resume", "rl.iterations=3", "rl.keep_checkpoints=2",
        f"rl.algorithm={name}", f"data.manifest={manifest}", *extra,
    )  # fmt: skip
    eval_prompts = EVAL_PROMPTS[:2]
    whole, whole_learner = _run(
        rl_config(tmp_path / "whole", *common), rl_generator_dir, eval_prompts
    )
    cfg = rl_config(tmp_path / "resumed", *common)
    with pytest.raises(_Interrupt):
        _run(cfg, rl_generator_dir, eval_prompts, reward_wrapper=_interrupt_at(1))
    assert _checkpoint_listing(cfg) == ["latest", "step-000001"]
    torch.manual_seed(12345)
    resumed, learner = _run(cfg, rl_generator_dir, eval_prompts, learner_seed=7)
    assert type(learner).__name__ == type(whole_learner).__name__ != "Learner"
    assert [r["iteration"] for r in resumed] == [1, 2, 3]
    for a, b in zip(whole[1:], resumed, strict=True):
        assert a["eval_reward"] == pytest.approx(b["eval_reward"], abs=1e-5)
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-5)
    state_a, state_b = whole_learner.adapter_state(), learner.adapter_state()
    assert any(v.abs().max() > 0 for k, v in state_a.items() if "lora_B" in k)  # it trained
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], rtol=0, atol=1e-6, msg=k)
    assert whole_learner.optimizer_steps == learner.optimizer_steps == 3 * 4
    if name == "feature_align":
        assert whole_learner.head.weight.abs().sum() > 0
        torch.testing.assert_close(
            learner.head.weight, whole_learner.head.weight, rtol=0, atol=1e-6
        )


def test_rating_pairs_are_same_prompt_different_ratings(tmp_path):
    """rl.dpo_pairs=ratings: pairs from a ratings file (each rater's latest rating, averaged):
    same prompt, different mean rating, the better-rated image first; an equal pair and
    pairs across prompts are not pairs."""
    import numpy as np

    from generators.images import save_png
    from rl.learners.dpo import rating_pairs

    header = "image_path,rating,modality,expert_level,prompt,rater_id,timestamp,generator_ckpt,seed"
    rows = [  # image, rating, prompt, rater, time
        ("a.png", 3, "p", "r1", "2026-01-01T00:00:00"),
        ("b.png", 1, "p", "r1", "2026-01-01T00:00:01"),
        ("c.png", 2, "p", "r1", "2026-01-01T00:00:02"),
        ("c.png", 3, "p", "r1", "2026-01-02T00:00:00"),  # r1's latest for c: 3, as a's
        ("d.png", 1, "q", "r1", "2026-01-01T00:00:03"),
        ("e.png", 2, "q", "r1", "2026-01-01T00:00:04"),
    ]
    lines = [header] + [f"{i},{r},fundus,expert,{p},{who},{t},phantom," for i, r, p, who, t in rows]
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    for name in "abcde":
        save_png(np.full((8, 8, 3), 100, dtype=np.uint8), tmp_path / f"{name}.png")
    cfg = rl_config(
        tmp_path,
        f"rewards.ratings_db={tmp_path / 'ratings.csv'}",
        f"rewards.images_root={tmp_path}",
    )
    rated = rating_pairs(cfg)
    named = sorted((rated.paths[w], rated.paths[lo]) for w, lo in rated.pairs)
    assert named == [("a.png", "b.png"), ("c.png", "b.png"), ("e.png", "d.png")]  # a = c
    assert rated.images.shape[1:] == (3, 32, 32) and rated.images.dtype == torch.uint8
