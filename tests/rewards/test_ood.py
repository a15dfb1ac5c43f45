"""The OOD guard: no penalty inside the rated pool's range, the full weight far outside."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rewards.ood import OODGuard, fit_ood_guard


def test_guard_penalises_only_what_lies_beyond_the_pool(tmp_path):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(400, 8, generator=g) * torch.linspace(0.5, 3.0, 8)
    guard = fit_ood_guard(pool, quantile=0.99)
    inside = guard.penalty(pool, weight=1.0)
    assert (inside == 0).float().mean() >= 0.98  # the pool's own 99 %
    fresh = torch.randn(400, 8, generator=g) * torch.linspace(0.5, 3.0, 8)
    assert (guard.penalty(fresh, 1.0) == 0).float().mean() >= 0.95  # new in-range points
    far = pool.mean(0, keepdim=True) + 10 * pool.std(0, keepdim=True)
    assert guard.penalty(far, weight=0.7).item() == pytest.approx(0.7)  # capped at the weight
    # the distance is Mahalanobis: the same step costs more along a narrow direction
    narrow, wide = torch.zeros(1, 8), torch.zeros(1, 8)
    narrow[0, 0], wide[0, 7] = 2.0, 2.0
    assert guard.distance(narrow + guard.mean) > guard.distance(wide + guard.mean)
    guard.save(tmp_path)
    loaded = OODGuard.load(tmp_path)
    assert loaded.edge == pytest.approx(guard.edge) and loaded.pool_size == 400
    assert torch.allclose(loaded.distance(fresh), guard.distance(fresh))
    assert OODGuard.load(tmp_path / "none") is None
    with pytest.raises(ValueError, match="N >= 2"):
        fit_ood_guard(pool[:1])


def test_scorer_takes_the_penalty_off_images_unlike_the_rated_pool(tmp_path):
    """A scorer with the guard: phantoms (the pool's kind) keep their reward, a flat orange
    square (what the demo's hacked adapters drew) loses rewards.ood_weight of it."""
    from generators.images import to_tensor
    from generators.phantom import sample_record
    from generators.phantom_render import render
    from rewards.models import AlignmentPolicy, QualitySelector
    from rewards.scorers import RewardModelScorer
    from tests.rewards.conftest import tiny_rewards_cfg

    cfg = tiny_rewards_cfg()
    torch.manual_seed(0)
    models = tmp_path / "models"
    QualitySelector.from_config(cfg).save_pretrained(models / "selector", threshold=0.25)
    AlignmentPolicy.from_config(cfg).save_pretrained(models / "alignment", threshold=0.25)
    rng = np.random.default_rng(0)
    records = [sample_record(rng, f"p{i}") for i in range(72)]
    phantoms = torch.stack([to_tensor(render(r, 32)) for r in records])
    plain = RewardModelScorer(models)
    guard = fit_ood_guard(plain.selector_features(phantoms[:64]), quantile=0.99)
    guard.save(models)
    guarded = RewardModelScorer(models, ood_weight=0.5)
    orange = torch.tensor([0.9, 0.2, -0.8]).view(1, 3, 1, 1).expand(4, 3, 32, 32).clone()
    test = torch.cat([phantoms[64:], orange])
    prompts = [r.prompt for r in records[64:]] + [records[0].prompt] * 4
    ids = [f"s{i}" for i in range(len(test))]
    a = plain.score(test, prompts, ids).scores
    b = guarded.score(test, prompts, ids).scores
    drop = np.array([a[i].reward - b[i].reward for i in ids])
    assert (drop[:8] <= 1e-6).mean() >= 0.75  # held-out phantoms: mostly untouched
    assert drop[8:] == pytest.approx(0.5, abs=1e-5)  # the orange squares: the whole weight
    shutil.rmtree(models)
