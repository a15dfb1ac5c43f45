"""The alignment policy's fusions, grid pooling, contrastive pre-training and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards.contrastive import (
    _batch_texts,
    contrastive_loss,
    pretrain_towers,
    swap_eye,
    swap_grade,
)
from rewards.models import META_FILE, AlignmentPolicy
from rewards.objectives import ranking_loss
from rewards.simulated import parse_prompt
from rewards.towers import pool_tokens
from rewards.training_fit import Batchable
from rewards.training_report import eye_swap_detection
from tests.rewards.conftest import tiny_rewards_cfg

LEFT, RIGHT = "colour fundus photograph, left eye", "colour fundus photograph, right eye"


def half_images(sides: torch.Tensor, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: dark noise with a bright left (0) or right (1) half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(sides), 3, size, size, generator=g) * 0.4 - 0.9
    half = size // 2
    for i, side in enumerate(sides.tolist()):
        cols = slice(half, size) if side else slice(0, half)
        x[i, :, :, cols] += 1.2
    return x


def xor_task(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images with a bright left/right half, prompts saying left/right; label = they match."""
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(0, 2, (n,), generator=g)
    says = torch.randint(0, 2, (n,), generator=g)
    prompts = [RIGHT if s else LEFT for s in says.tolist()]
    return half_images(side, seed=seed), prompts, (side == says).float()


def _train_match(fusion: str, steps: int, seed: int = 0) -> tuple[float, float]:
    """BCE on the XOR match task; (held-out accuracy, last training loss)."""
    torch.manual_seed(seed)
    cfg = tiny_rewards_cfg(fusion=fusion, fusion_dim=16)
    model = AlignmentPolicy.from_config(cfg)
    x, prompts, y = xor_task(128, seed=1)
    xt, pt, yt = xor_task(128, seed=2)
    tok, tok_t = model.tokenize(prompts), model.tokenize(pt)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.as_tensor(rng.choice(len(y), 32, replace=False))
        out = model(x[idx], tok["input_ids"][idx], tok["attention_mask"][idx])
        loss = F.binary_cross_entropy(out.mean, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model.eval()(xt, tok_t["input_ids"], tok_t["attention_mask"]).mean
    return float(((pred > 0.5).float() == yt).float().mean()), loss.item()


def test_interaction_fusion_learns_the_xor_match_faster_than_concat():
    # measured held-out accuracy after 25 steps, seeds 0 and 1: interaction 1.00 and 1.00,
    # concat 0.83 and 0.54 (both reach 1.00 by 40 steps: concat is slower, not unable)
    interaction = [_train_match("interaction", steps=25, seed=s)[0] for s in (0, 1)]
    concat = [_train_match("concat", steps=25, seed=s)[0] for s in (0, 1)]
    assert min(interaction) >= 0.9, interaction
    assert np.mean(interaction) > np.mean(concat) + 0.1, (interaction, concat)


def test_grid_pooling_keeps_the_quadrants():
    hidden = torch.zeros(1, 1 + 16, 2)
    grid = hidden[:, 1:].view(1, 4, 4, 2)
    grid[:, :2, 2:, 0] = 1.0  # top-right quadrant
    pooled = pool_tokens(hidden, "grid")
    assert pooled.shape == (1, 8)
    torch.testing.assert_close(pooled[0, ::2], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert pool_tokens(hidden, "mean").shape == (1, 2)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_tokens(hidden, "max")


def test_swap_eye_and_grade():
    prompt = "colour fundus photograph, left eye, mild non-proliferative diabetic retinopathy"
    assert swap_eye(prompt) == prompt.replace("left", "right")
    assert swap_eye(swap_eye(prompt)) == prompt
    assert swap_eye("Right eye") == "Left eye"
    assert swap_eye("no laterality here") is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = swap_grade(prompt, rng)
        claims = parse_prompt(other)
        assert claims["laterality"] == "left" and min(claims["dr_grade"], 3) != 1
    grade4 = "left eye, proliferative diabetic retinopathy"
    assert parse_prompt(swap_grade(grade4, rng))["dr_grade"] < 3
    assert swap_grade("left eye", rng) is None


def test_batch_texts_pair_each_orientation_with_its_eye():
    rng = np.random.default_rng(0)
    texts, eye_of, hard, hard_of = _batch_texts([LEFT, "a photograph"], True, False, rng)
    assert texts == [LEFT, "a photograph", RIGHT, "a photograph"]
    assert eye_of == [2, -1, 0, -1] and hard == [] and hard_of == []
    texts, eye_of, hard, hard_of = _batch_texts([LEFT, "a photograph"], False, False, rng)
    assert texts == [LEFT, "a photograph"] and hard == [RIGHT] and eye_of == [2, -1]


def test_contrastive_loss_is_low_for_matching_pairs():
    u = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    good, _ = contrastive_loss(u, u)
    bad, _ = contrastive_loss(u, u.roll(1, 0))
    assert good < bad
    with_hard, _ = contrastive_loss(u, u, hard=-u)
    assert with_hard.item() == pytest.approx(good.item(), abs=0.05)


def test_contrastive_pretraining_lowers_its_loss_and_learns_the_eye():
    torch.manual_seed(0)
    cfg = tiny_rewards_cfg(fusion_dim=16, pretrain_batch_size=16, pretrain_lr=3e-3)
    model = AlignmentPolicy.from_config(cfg)
    side = torch.arange(48) % 2  # 0: left half bright = the left eye
    images = half_images(side).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    prompts = [RIGHT if s else LEFT for s in side.tolist()]
    stats = pretrain_towers(model, images, prompts, cfg, device=torch.device("cpu"), epochs=15)
    assert stats["epochs"] == 15 and stats["pairs"] == 48
    assert stats["last_epoch"]["loss"] < stats["first_epoch"]["loss"]
    assert stats["last_epoch"]["eye_accuracy"] >= 0.9
    # the policy's own projections hold it: the eye check of the report agrees
    data = Batchable(images, torch.ones(len(images)))
    check = eye_swap_detection(model, data, prompts, torch.device("cpu"))
    assert check["n"] == 48


def test_pretraining_a_concat_policy_trains_the_towers_only():
    torch.manual_seed(0)
    cfg = tiny_rewards_cfg(fusion="concat", pretrain_batch_size=8)
    model = AlignmentPolicy.from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    prompts = [LEFT, RIGHT] * 8
    stats = pretrain_towers(model, images, prompts, cfg, device=torch.device("cpu"), epochs=1)
    assert stats["steps"] == 2
    after = model.state_dict()
    assert set(after) == set(before)  # no projections left behind
    assert not torch.equal(after["vit.embeddings.patch_embeddings.projection.weight"],
                           before["vit.embeddings.patch_embeddings.projection.weight"])  # fmt: skip
    assert torch.equal(after["policy_head.mlp.0.weight"], before["policy_head.mlp.0.weight"])


def test_ranking_loss_orders_the_batch():
    from rewards.towers import PolicyOutput

    logits = torch.zeros(3, requires_grad=True)
    alpha, beta = F.softplus(logits) + 1.0, F.softplus(-logits) + 1.0
    out = PolicyOutput(alpha, beta, torch.zeros(3))
    loss, parts = ranking_loss(out, torch.tensor([1.0, 0.5, 0.0]))
    loss.backward()
    assert parts["rank"] > 0 and logits.grad[0] < 0 < logits.grad[2]  # descent raises 0
    same = PolicyOutput(alpha.detach(), beta.detach(), torch.zeros(3))
    assert ranking_loss(same, torch.full((3,), 0.5))[1]["rank"] == 0.0


@pytest.mark.parametrize("fusion", ["interaction", "concat"])
def test_fusion_checkpoint_roundtrip(tmp_path, fusion):
    torch.manual_seed(0)
    model = AlignmentPolicy.from_config(tiny_rewards_cfg(fusion=fusion, fusion_dim=12))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = half_images(torch.tensor([0, 1, 0]))
    expected = model.score(x, [LEFT, RIGHT, RIGHT])
    out = model.save_pretrained(tmp_path / "alignment")
    arch = json.loads((out / META_FILE).read_text())["architecture"]
    assert arch["fusion"] == fusion and arch["fusion_dim"] == 12 and arch["pooling"] == "grid"
    loaded = AlignmentPolicy.from_pretrained(out)
    assert loaded.fusion_kind == fusion
    torch.testing.assert_close(loaded.score(x, [LEFT, RIGHT, RIGHT]), expected)


def test_old_concat_checkpoints_still_load(tmp_path):
    """A checkpoint written before the fusion key (concat, mean pooling) loads as concat."""
    torch.manual_seed(0)
    model = AlignmentPolicy.from_config(tiny_rewards_cfg(fusion="concat", alignment_pooling="mean"))
    x = half_images(torch.tensor([0, 1]))
    expected = model.score(x, [LEFT, RIGHT])
    out = model.save_pretrained(tmp_path / "old")
    meta = json.loads((out / META_FILE).read_text())
    del meta["architecture"]["fusion"], meta["architecture"]["fusion_dim"]
    (out / META_FILE).write_text(json.dumps(meta))
    loaded = AlignmentPolicy.from_pretrained(out)
    assert loaded.fusion_kind == "concat" and loaded.pooling == "mean"
    torch.testing.assert_close(loaded.score(x, [LEFT, RIGHT]), expected)
    with pytest.raises(ValueError, match="unknown fusion"):
        AlignmentPolicy.from_config(tiny_rewards_cfg()).__class__(
            model.vit, model.text_encoder, model.tokenizer, (8,), 8, 16, "mean", "sum"
        )
