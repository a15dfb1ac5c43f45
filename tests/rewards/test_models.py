"""The selector and the alignment policy: scores, independence, heads, loading, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

from generators.config import TextEncoderConfig
from rewards.config import VisionConfig
from rewards.models import META_FILE, AlignmentPolicy, QualitySelector, RewardModel, RewardModels
from rewards.towers import DetailChannels, prepare_images
from tests.rewards.conftest import tiny_rewards_cfg

PROMPTS = [
    "colour fundus photograph, left eye, no diabetic retinopathy",
    "colour fundus photograph, right eye, mild non-proliferative diabetic retinopathy",
    "colour fundus photograph, left eye, proliferative diabetic retinopathy with haemorrhages",
    "right eye",
]


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_selector_scores_are_the_beta_mean_in_unit_interval(tiny_rewards):
    torch.manual_seed(0)
    model = QualitySelector.from_config(tiny_rewards).eval()
    out = model(pixel_values=images())
    assert (out.alpha > 1).all() and (out.beta > 1).all()  # softplus + 1
    torch.testing.assert_close(out.mean, out.alpha / (out.alpha + out.beta))
    scores = model.score(images())
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()
    torch.testing.assert_close(scores, out.mean)


@pytest.mark.parametrize("kind", ["selector", "alignment"])
def test_an_image_score_does_not_depend_on_its_batch(tiny_rewards, kind):
    torch.manual_seed(0)
    model = (
        QualitySelector.from_config(tiny_rewards)
        if kind == "selector"
        else AlignmentPolicy.from_config(tiny_rewards)
    )
    model.train()  # score() must switch to eval mode by itself
    x = images(4)
    others = images(4, seed=1)
    alone = torch.stack(
        [model.score(x[i : i + 1], PROMPTS[i : i + 1])[0] for i in range(4)]
    )  # fmt: skip
    batch = model.score(x, PROMPTS)
    mixed = model.score(torch.cat([x[:2], others]), PROMPTS[:2] + PROMPTS)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[:2], alone[:2], atol=1e-5, rtol=0)
    assert model.training  # restored


def test_value_head_is_separate_from_the_policy(tiny_rewards):
    torch.manual_seed(0)
    for model in (
        QualitySelector.from_config(tiny_rewards),
        AlignmentPolicy.from_config(tiny_rewards),
    ):
        policy = {id(p) for p in model.policy_head.parameters()}
        value = {id(p) for p in model.value_head.parameters()}
        assert policy.isdisjoint(value)
        x = images()
        inputs = model.inputs(x, PROMPTS)
        before = model.eval()(**inputs)
        with torch.no_grad():
            for p in model.value_head.parameters():
                p.add_(1.0)
        after = model(**inputs)
        torch.testing.assert_close(after.mean, before.mean)  # the score ignores the value head
        assert not torch.allclose(after.value, before.value)


@pytest.mark.parametrize(
    ("fusion", "pooling"), [("concat", "mean"), ("concat", "grid"), ("interaction", "grid")]
)
def test_alignment_policy_shapes_follow_the_config(fusion, pooling):
    cfg = tiny_rewards_cfg(
        fusion_hidden=(24, 12), value_hidden=6, fusion=fusion, alignment_pooling=pooling,
        fusion_dim=10,
    )  # fmt: skip
    model = AlignmentPolicy.from_config(cfg)
    image = cfg.vision.hidden_size * (4 if pooling == "grid" else 1)
    fused = image + cfg.text_encoder.hidden_size if fusion == "concat" else 4 * 10
    if fusion == "interaction":
        assert model.image_proj.in_features == image and model.image_proj.out_features == 10
        assert model.text_proj.in_features == cfg.text_encoder.hidden_size
    linears = [m for m in model.fusion if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(fused, 24), (24, 12)]
    assert (
        model.policy_head.mlp[-1].in_features == 12 and model.policy_head.mlp[-1].out_features == 2
    )
    assert model.value_head.mlp[0].in_features == fused  # value head reads the fused features
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        model.score(images(2), PROMPTS[:1])


def test_prepare_images_accepts_uint8_arrays_and_resizes():
    arrays = [np.full((48, 48, 3), 255, np.uint8), np.zeros((48, 48, 3), np.uint8)]
    x = prepare_images(arrays, 32)
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0], torch.ones_like(x[0])) and torch.allclose(
        x[1], -torch.ones_like(x[1])
    )
    with pytest.raises(ValueError, match="expected images"):
        prepare_images(torch.zeros(2, 1, 8, 8), 32)


def test_detail_channels_see_noise_and_keep_images_apart():
    stem = DetailChannels()
    flat = torch.zeros(1, 3, 16, 16)
    noisy = flat + 0.2 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = stem(torch.cat([flat, noisy]))
    assert out.shape == (2, 6, 16, 16)
    torch.testing.assert_close(out[:, :3], torch.cat([flat, noisy]))
    assert torch.all(out[0, 3:] == -1.0)  # no detail in a flat image
    assert out[1, 3:].mean() > -0.5
    torch.testing.assert_close(stem(noisy), out[1:])


def test_built_vit_gets_detail_channels_pretrained_does_not():
    assert VisionConfig().use_detail_channels
    assert not VisionConfig(detail_channels=False).use_detail_channels
    assert not VisionConfig(pretrained="some/vit").use_detail_channels
    with pytest.raises(ValueError, match="rewards.vision.detail_channels"):
        VisionConfig(pretrained="some/vit", detail_channels=True)
    with pytest.raises(ValueError, match="divisible by rewards.vision.patch_size"):
        VisionConfig(image_size=30, patch_size=8)


def test_backbones_load_from_local_directories(tmp_path):
    """The same classes load real weights from a path (here: tiny ones saved as safetensors)."""
    vit_dir, bert_dir = tmp_path / "vit", tmp_path / "bert"
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32,
        ),
        add_pooling_layer=False,
    )  # fmt: skip
    vit.save_pretrained(vit_dir)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "right", "eye", ","]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    bert = BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32,
        )
    )  # fmt: skip
    bert.save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    assert (vit_dir / "model.safetensors").is_file() and (bert_dir / "model.safetensors").is_file()

    cfg = tiny_rewards_cfg(
        vision=VisionConfig(pretrained=str(vit_dir)),
        text_encoder=TextEncoderConfig(pretrained=str(bert_dir), max_length=16),
    )
    selector = QualitySelector.from_config(cfg)
    torch.testing.assert_close(
        selector.vit.embeddings.patch_embeddings.projection.weight,
        vit.embeddings.patch_embeddings.projection.weight,
    )
    assert selector.vit.config.num_channels == 3  # pretrained: plain RGB, no detail channels
    policy = AlignmentPolicy.from_config(cfg)
    assert policy.text_encoder.pooler is None  # unused pooler dropped
    assert policy.tokenizer.tokenize("left eye") == ["left", "eye"]
    assert policy.score(images(2), ["left eye", "right eye"]).shape == (2,)


@pytest.mark.parametrize("kind", ["selector", "alignment"])
def test_checkpoint_roundtrip_gives_the_same_scores(tmp_path, tiny_rewards, kind):
    torch.manual_seed(0)
    model = (
        QualitySelector.from_config(tiny_rewards)
        if kind == "selector"
        else AlignmentPolicy.from_config(tiny_rewards)
    )
    with torch.no_grad():  # move away from the initialisation so the test means something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = images(3)
    expected = model.score(x, PROMPTS[:3])
    out = model.save_pretrained(tmp_path / kind, threshold=0.3, training={"steps": 5})
    meta = json.loads((out / META_FILE).read_text())
    assert meta["kind"] == kind and meta["threshold"] == 0.3 and meta["training"] == {"steps": 5}
    loaded = RewardModel.from_pretrained(out)
    assert type(loaded) is type(model) and not loaded.training
    torch.testing.assert_close(loaded.score(x, PROMPTS[:3]), expected)
    # saving again over it replaces it in one piece
    model.save_pretrained(out, threshold=0.4)
    assert json.loads((out / META_FILE).read_text())["threshold"] == 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


def test_loading_the_wrong_kind_or_a_newer_version_fails(tmp_path, tiny_rewards):
    out = QualitySelector.from_config(tiny_rewards).save_pretrained(tmp_path / "sel")
    with pytest.raises(ValueError, match="not an alignment policy"):
        AlignmentPolicy.from_pretrained(out)
    assert isinstance(QualitySelector.from_pretrained(out), QualitySelector)
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="newer"):
        RewardModel.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="not a reward model checkpoint"):
        RewardModel.from_pretrained(tmp_path)


def test_reward_models_score_dict(tmp_path, tiny_rewards):
    torch.manual_seed(0)
    selector, policy = (
        QualitySelector.from_config(tiny_rewards),
        AlignmentPolicy.from_config(tiny_rewards),
    )
    rewards = RewardModels(selector, policy, threshold=0.5, quality_weight=3, alignment_weight=1)
    out = rewards.score(images(), PROMPTS)
    assert set(out) == {"quality", "alignment", "reward", "passed"}
    torch.testing.assert_close(out["reward"], 0.75 * out["quality"] + 0.25 * out["alignment"])
    assert torch.equal(out["passed"], out["quality"] >= 0.5)
    torch.testing.assert_close(out["quality"], selector.score(images()))
    assert isinstance(policy, AlignmentPolicy)
    with pytest.raises(ValueError, match="reward weights"):
        RewardModels(selector, policy, 0.5, quality_weight=0, alignment_weight=0)


def test_config_is_a_frozen_dataclass_with_documented_fields(tiny_rewards):
    for f in dataclasses.fields(tiny_rewards):
        if not dataclasses.is_dataclass(f.type) and f.name not in ("vision", "text_encoder"):
            assert f.metadata.get("help"), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_rewards.lr = 1.0  # type: ignore[misc]
