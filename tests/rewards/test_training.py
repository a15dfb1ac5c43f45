"""REINFORCE with a learned value baseline, the regression baseline, and train_rewards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from rewards.models import AlignmentPolicy, QualitySelector, RewardModels
from rewards.objectives import (
    agreement_reward,
    policy_gradient_loss,
    regression_loss,
    reinforce_loss,
)
from rewards.rating_data import holdout_split, image_source, load_images, rating_targets
from rewards.ratings import read_ratings
from rewards.training import REPORT_FILE, train_rewards
from rewards.training_report import agreement_by_source, agreement_metrics, format_report
from tests.rewards.conftest import tiny_rewards_cfg

PROMPT = "colour fundus photograph, left eye, moderate non-proliferative diabetic retinopathy"


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_agreement_reward():
    s, y = torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(agreement_reward(s, y, "absolute"), torch.tensor([0.8, 0.9]))
    torch.testing.assert_close(agreement_reward(s, y, "squared"), torch.tensor([0.96, 0.99]))
    with pytest.raises(ValueError, match="unknown reward"):
        agreement_reward(s, y, "hinge")


@pytest.mark.parametrize("kind", ["selector", "alignment"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_moves_the_log_probability(tiny_rewards, kind, sign):
    """One SGD step on -A * log pi(s) raises log pi(s) when A > 0 and lowers it when A < 0."""
    torch.manual_seed(0)
    model = (
        QualitySelector.from_config(tiny_rewards)
        if kind == "selector"
        else AlignmentPolicy.from_config(tiny_rewards)
    )
    model.eval()  # deterministic forward passes (no dropout anywhere anyway)
    inputs = model.inputs(batch(1), [PROMPT])
    dist = model(**inputs).distribution()
    sample = dist.sample().clamp(1e-4, 1 - 1e-4)
    before = dist.log_prob(sample).detach()
    loss = policy_gradient_loss(dist, sample, torch.tensor([sign]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model(**inputs).distribution().log_prob(sample).detach()
    assert (after - before).item() * sign > 0


def test_advantage_uses_the_value_head_detached(tiny_rewards):
    """The policy term never trains the value head; only the value loss does."""
    torch.manual_seed(0)
    model = QualitySelector.from_config(tiny_rewards)
    out = model(pixel_values=batch())
    loss, parts = reinforce_loss(out, torch.rand(8), value_coef=0.0, entropy_coef=0.0)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.value_head.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.policy_head.parameters())
    model.zero_grad()
    out = model(pixel_values=batch())
    loss, _ = reinforce_loss(out, torch.rand(8), value_coef=1.0, entropy_coef=0.0)
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.value_head.parameters())
    assert {"reward", "advantage_std", "entropy", "value_loss"} <= set(parts)


def test_value_baseline_lowers_the_gradient_variance(tiny_rewards):
    """Per-sample REINFORCE gradients on a fixed model and batch: same mean, less variance."""
    torch.manual_seed(0)
    model = QualitySelector.from_config(tiny_rewards).eval()
    x, y = batch(8), torch.tensor([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    with torch.no_grad():
        features = model.features(x)
    # fit V(x) = E[r | x] for this fixed policy by regression on sampled rewards (as in training)
    with torch.no_grad():
        alpha, beta = model.policy_head(features)
    dist = torch.distributions.Beta(alpha, beta)
    opt = torch.optim.Adam(model.value_head.parameters(), lr=1e-2)
    for _ in range(400):
        r = agreement_reward(dist.sample((64,)), y.expand(64, -1))
        loss = ((model.value_head(features).expand_as(r) - r) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        value = model.value_head(features)
        expected = agreement_reward(dist.sample((20000,)), y.expand(20000, -1)).mean(0)
    assert torch.allclose(value, expected, atol=0.03)  # the value head learnt E[r | x]

    params = list(model.policy_head.parameters())

    def gradients(baseline: torch.Tensor) -> np.ndarray:
        torch.manual_seed(1)  # the same score samples with and without the baseline
        grads = []
        for _ in range(300):
            a, b = model.policy_head(features)
            d = torch.distributions.Beta(a, b)
            s = d.sample().clamp(1e-6, 1 - 1e-6)
            advantage = agreement_reward(s, y) - baseline
            g = torch.autograd.grad(policy_gradient_loss(d, s, advantage), params)
            grads.append(torch.cat([t.flatten() for t in g]).numpy())
        return np.stack(grads)

    with_baseline = gradients(value)
    without = gradients(torch.zeros_like(value))
    var_with, var_without = with_baseline.var(0).sum(), without.var(0).sum()
    assert var_with < 0.5 * var_without, (var_with, var_without)
    # both estimate the same gradient: the difference of the means is within noise
    diff = with_baseline.mean(0) - without.mean(0)
    stderr = np.sqrt((with_baseline.var(0) + without.var(0)) / len(without)).sum()
    assert np.abs(diff).sum() < 4 * stderr


def test_regression_loss():
    from rewards.towers import PolicyOutput

    out = PolicyOutput(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]), torch.zeros(2))
    loss, _ = regression_loss(out, torch.tensor([0.0, 1.0]))  # means 0.25 and 0.75
    assert loss.item() == pytest.approx(0.0625)
    bce, _ = regression_loss(out, torch.tensor([0.0, 1.0]), "bce")
    assert bce.item() == pytest.approx(-np.log(0.75))


def test_agreement_metrics_hand_example():
    m = agreement_metrics(np.array([0.1, 0.4, 0.8, 0.3]), np.array([0.0, 0.5, 1.0, 0.0]), 0.25)
    assert m["n"] == 4
    # ranks (1, 3, 4, 2) and (1.5, 3, 4, 1.5), centred: (-1.5, .5, 1.5, -.5), (-1, .5, 1.5, -1);
    # sum of products 4.5, sums of squares 5 and 4.5
    assert m["spearman"] == pytest.approx(4.5 / np.sqrt(5 * 4.5))
    assert m["mae"] == pytest.approx((0.1 + 0.1 + 0.2 + 0.3) / 4)
    assert m["pass_accuracy"] == pytest.approx(0.75)  # 0.3 passes, its rating 0 does not
    assert (
        agreement_metrics(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 0.5]), 0.25)["spearman"]
        is None
    )


def test_rating_targets_average_raters_latest_rating_and_faithfulness(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text(
        "image_path,rating,prompt,rater_id,timestamp,prompt_faithfulness\n"
        "a.png,3,p,A,2025-01-01T00:00:00,10\n"
        "a.png,1,p,B,2025-01-01T00:00:00,0\n"
        "a.png,1,p,A,2024-01-01T00:00:00,0\n"  # older rating by A: ignored
        "a.png,2,q,A,2025-01-01T00:00:01,\n"  # no faithfulness: alignment = rating
    )
    targets = rating_targets(read_ratings(csv)).set_index("prompt")
    assert targets.loc["p", "quality"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    assert targets.loc["p", "alignment"] == pytest.approx(0.5)
    assert targets.loc["p", "raters"] == 2
    assert targets.loc["q", "alignment"] == pytest.approx(0.5)
    assert targets.loc["q", "from_faithfulness"] == 0


def test_image_source_and_agreement_by_source():
    assert [image_source(c) for c in ("", "phantom", "real", "vae:runs/x/generator", "runs/x/rl/adapter")] == [
        "phantom", "phantom", "real", "reconstruction", "generated"
    ]  # fmt: skip
    pred = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])
    target = np.array([0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    by = agreement_by_source(pred, target, ["phantom"] * 3 + ["generated"] * 3, 0.5)
    assert by["phantom"]["spearman"] == pytest.approx(1.0)
    assert by["generated"]["spearman"] == pytest.approx(-1.0)
    assert by["generated"]["n"] == 3


def test_holdout_split_keeps_an_image_on_one_side():
    paths = ["a", "a", "b", "c", "c", "d", "e"]
    train, held = holdout_split(paths, 0.4, seed=0)
    assert sorted(np.concatenate([train, held])) == list(range(7))
    assert not {paths[i] for i in train} & {paths[i] for i in held}
    assert 1 <= len({paths[i] for i in held}) <= 4
    again = holdout_split(paths, 0.4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, held), strict=True))


def test_holdout_split_is_stable_when_ratings_are_added():
    """The next rating round adds images: every image keeps its side (rewards.init_from
    continues a model whose held-out images must stay unseen), and the share is close."""
    first = [f"pool/img-{i:04d}.png" for i in range(400)]
    later = first + [f"rounds/round-1/img-{i:03d}.png" for i in range(200)]
    _, held1 = holdout_split(first, 0.2, seed=3)
    _, held2 = holdout_split(later, 0.2, seed=3)
    held_first = {first[i] for i in held1}
    assert held_first == {later[i] for i in held2 if i < 400}
    assert 0.15 < len(held2) / len(later) < 0.25
    assert {first[i] for i in holdout_split(first, 0.2, seed=4)[1]} != held_first
    # tiny sets still get one image on each side; fraction 0 holds out nothing
    train, held = holdout_split(["x", "y"], 0.01, seed=0)
    assert len(train) == 1 and len(held) == 1
    assert len(holdout_split(["x", "y"], 0.0, seed=0)[1]) == 0


def test_train_rewards_end_to_end(tmp_path, rating_pool):
    pool, csv = rating_pool
    cfg = tiny_rewards_cfg(holdout_fraction=0.25)
    out = tmp_path / "rewards"
    report = train_rewards(csv, pool, out, cfg, device="cpu")
    frame = read_ratings(csv)
    assert report["ratings"] == len(frame) and report["raters"] == [
        "simulated-expert-1",
        "simulated-expert-2",
    ]
    images = sorted(set(read_ratings(csv)["image_path"]))
    _, held_idx = holdout_split(images, cfg.holdout_fraction, cfg.seed)
    assert report["images"] == 24 and report["heldout_images"] == len(held_idx) > 0
    assert set(report["results"]) == {"reinforce", "regression"}
    assert report["pretrain"]["epochs"] == 0  # no manifest: no contrastive pre-training
    for result in report["results"].values():
        for model in ("selector", "alignment"):
            assert result[model]["n"] > 0
            assert set(result[model]) >= {"spearman", "pearson", "mae", "pass_accuracy"}
        stage2 = result["alignment"]["stage2"]
        assert 0 <= stage2["passed"] <= stage2["of"] == report["train_pairs"]
    assert json.loads((out / REPORT_FILE).read_text())["ratings"] == report["ratings"]
    assert (out / "compare-regression" / "selector" / "model.safetensors").is_file()
    assert "REINFORCE / regression" in format_report(report)
    # the OOD guard of the reward the RL uses: fitted on every rated image's selector features
    from rewards.ood import OODGuard, selector_features

    guard = OODGuard.load(out)
    assert guard is not None and guard.pool_size == report["images"] == 24
    assert report["ood_guard"]["edge"] == pytest.approx(guard.edge)
    assert report["sources"] == {"phantom": report["pairs"]}
    selector = RewardModels.load(out).selector
    pool_images = load_images(pool, sorted(set(frame["image_path"])), selector.image_size)
    inside = guard.distance(selector_features(selector, pool_images)) <= guard.edge + 1e-6
    assert inside.float().mean() >= 0.9  # the 0.99 quantile edge: (nearly) all inside
    assert "OOD guard: fitted on the selector features of 24 rated images" in format_report(report)

    rewards = RewardModels.load(out)
    assert rewards.threshold == cfg.threshold
    items = pd.read_json(pool / "pool.jsonl", lines=True).head(3)
    from generators.images import load_image

    imgs = [load_image(pool / p) for p in items["path"]]
    scores = rewards.score(imgs, items["prompt"].tolist())
    assert scores["quality"].shape == (3,) and scores["passed"].dtype == torch.bool


def test_train_rewards_names_missing_images(tmp_path, rating_pool):
    pool, csv = rating_pool
    copy = tmp_path / "pool"
    shutil.copytree(pool, copy)
    (copy / "images" / "pool-00001.png").unlink()
    (copy / "images" / "pool-00002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="2 rated image") as err:
        train_rewards(
            copy / "ratings.csv", None, tmp_path / "out", tiny_rewards_cfg(), device="cpu"
        )
    assert "pool-00001.png" in str(err.value) and "pool-00002.png" in str(err.value)


def test_train_rewards_pretrains_the_alignment_towers_on_a_manifest(tmp_path, rating_pool):
    from generators.datasets import ingest_csv
    from generators.phantom_dataset import write_demo_dataset

    pool, csv = rating_pool
    write_demo_dataset(tmp_path / "data", count=16, size=32, seed=1)
    manifest = tmp_path / "data" / "manifest.parquet"
    ingest_csv(tmp_path / "data" / "data.csv", root=tmp_path / "data", out=manifest)
    cfg = tiny_rewards_cfg(
        pretrain_manifest=str(manifest), pretrain_epochs=2, pretrain_batch_size=8,
        compare_objectives=False, alignment_objective="ranking",
    )  # fmt: skip
    report = train_rewards(csv, pool, tmp_path / "rewards", cfg, device="cpu")
    assert report["pretrain"] == {
        "manifest": str(manifest),
        "epochs": 2,
        "pairs": 14,
    }  # train split
    assert report["alignment_objective"] == "ranking" and report["fusion"] == "interaction"
    ali = report["results"]["reinforce"]["alignment"]
    assert ali["objective"] == "ranking" and ali["pretrain"]["steps"] == 2
    assert ali["eye_swap"]["n"] > 0 and 0 <= ali["eye_swap"]["detected"] <= 1
    assert "pre-trained contrastively on 14 pairs" in format_report(report)


def test_pretrain_cache_reproduces_the_pretrained_towers(tmp_path, rating_pool):
    """A retraining with the same manifest and settings (the next rating round) loads the
    pre-trained towers and ends with the very models of a run that pre-trained again; a
    changed pre-training setting misses the cache."""
    from safetensors.torch import load_file

    from generators.datasets import ingest_csv
    from generators.phantom_dataset import write_demo_dataset

    pool, csv = rating_pool
    write_demo_dataset(tmp_path / "data", count=16, size=32, seed=1)
    manifest = tmp_path / "data" / "manifest.parquet"
    ingest_csv(tmp_path / "data" / "data.csv", root=tmp_path / "data", out=manifest)
    common = dict(
        pretrain_manifest=str(manifest), pretrain_epochs=2, pretrain_batch_size=8,
        compare_objectives=False, stage1_epochs=2, stage2_epochs=1, epochs=2,
    )  # fmt: skip
    cache = tmp_path / "cache"
    plain = train_rewards(csv, pool, tmp_path / "plain", tiny_rewards_cfg(**common), device="cpu")
    cfg = tiny_rewards_cfg(**common, pretrain_cache=str(cache))
    first = train_rewards(csv, pool, tmp_path / "r0", cfg, device="cpu")
    assert len(list(cache.glob("alignment-*.safetensors"))) == 1
    assert "cached" not in first["results"]["reinforce"]["alignment"]["pretrain"]
    again = train_rewards(csv, pool, tmp_path / "r1", cfg, device="cpu")
    pre = again["results"]["reinforce"]["alignment"]["pretrain"]
    assert pre["cached"].startswith(str(cache)) and pre["steps"] == 2
    assert "loaded from" in format_report(again)
    for run in ("r0", "r1"):
        a = load_file(tmp_path / "plain" / "alignment" / "model.safetensors")
        b = load_file(tmp_path / run / "alignment" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
    spearman = plain["results"]["reinforce"]["alignment"]["spearman"]
    assert again["results"]["reinforce"]["alignment"]["spearman"] == spearman

    other = tiny_rewards_cfg(**common, pretrain_cache=str(cache), pretrain_lr=1e-4)
    train_rewards(csv, pool, tmp_path / "r2", other, device="cpu")
    assert len(list(cache.glob("alignment-*.safetensors"))) == 2


def test_init_from_continues_the_previous_models(tmp_path, rating_pool):
    """rewards.init_from: the next round starts from the last round's selector and
    alignment policy (at lr 0 it ends with exactly their weights; trained on, it moves
    away from them), skips the contrastive pre-training, and refuses models of another
    architecture, naming the file."""
    from safetensors.torch import load_file

    pool, csv = rating_pool
    common = dict(compare_objectives=False, stage1_epochs=2, stage2_epochs=1, epochs=2)
    first = tmp_path / "round-0"
    train_rewards(csv, pool, first, tiny_rewards_cfg(**common), device="cpu")
    frozen = tiny_rewards_cfg(**common, init_from=str(first), lr=0.0)
    report = train_rewards(csv, pool, tmp_path / "frozen", frozen, device="cpu")
    for part in ("selector", "alignment"):
        a = load_file(first / part / "model.safetensors")
        b = load_file(tmp_path / "frozen" / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    pre = report["results"]["reinforce"]["alignment"]["pretrain"]
    assert pre == {"epochs": 0, "init_from": str(first)}
    assert f"continued from {first}" in format_report(report)

    moved = tiny_rewards_cfg(**common, init_from=str(first), lr=1e-2)
    train_rewards(csv, pool, tmp_path / "moved", moved, device="cpu")
    a = load_file(first / "selector" / "model.safetensors")
    b = load_file(tmp_path / "moved" / "selector" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)

    wider = tiny_rewards_cfg(**common, init_from=str(first), selector_hidden=(32,))
    with pytest.raises(ValueError, match="selector/model.safetensors does not fit"):
        train_rewards(csv, pool, tmp_path / "wider", wider, device="cpu")
    with pytest.raises(FileNotFoundError, match="rewards.init_from"):
        train_rewards(
            csv, pool, tmp_path / "none", tiny_rewards_cfg(**common, init_from=str(tmp_path)),
            device="cpu",
        )  # fmt: skip
