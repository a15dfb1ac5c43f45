"""RewardsConfig composes through medrl's config loader like the other packages' sections."""

from __future__ import annotations

import pytest

from medrl.config import ConfigError, build, describe
from rewards.config import RewardsConfig


def test_builds_from_a_mapping_with_nested_sections():
    cfg = build(
        RewardsConfig,
        {
            "objective": "regression",
            "lr": "3e-4",
            "vision": {"pretrained": "google/vit-base-patch16-224-in21k", "pooling": "cls"},
            "text_encoder": {"max_length": 256},
            "fusion_hidden": [768, 384],
        },
        prefix="rewards",
    )
    assert cfg.objective == "regression" and cfg.lr == 3e-4
    assert cfg.fusion_hidden == (768, 384) and cfg.text_encoder.max_length == 256
    assert not cfg.vision.use_detail_channels


@pytest.mark.parametrize(
    "data, message",
    [
        ({"objective": "ppo"}, "rewards.objective: 'ppo' is not allowed"),
        ({"threshold": 1.5}, "rewards.threshold: 1.5 is out of range"),
        ({"epochs": 0}, "rewards.epochs: 0 is out of range"),
        ({"vision": {"patchsize": 8}}, "unknown key rewards.vision.patchsize"),
        ({"reward": "hinge"}, "rewards.reward: 'hinge' is not allowed"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build(RewardsConfig, data, prefix="rewards")


def test_cross_field_checks_name_the_keys():
    with pytest.raises(ValueError, match="quality_weight"):
        RewardsConfig(quality_weight=0, alignment_weight=0)


def test_every_field_is_documented():
    rows = describe(RewardsConfig, "rewards")
    assert rows and all(help_text for _, _, _, help_text in rows)
    keys = {key for key, *_ in rows}
    assert {
        "rewards.vision.patch_size",
        "rewards.text_encoder.pretrained",
        "rewards.threshold",
    } <= keys
