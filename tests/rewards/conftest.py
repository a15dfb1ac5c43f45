"""Tiny reward-model configs and a small simulated rating pool shared by the rewards tests."""

from __future__ import annotations

import pytest
import torch

from generators.config import TextEncoderConfig
from rewards.config import RewardsConfig, VisionConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the models are tiny and the CPU is shared (2 threads thrash)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_rewards_cfg(**changes) -> RewardsConfig:
    """A reward config small enough for unit tests (32 px, one-layer ViT and BERT)."""
    base = dict(
        vision=VisionConfig(
            image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
            intermediate_size=32,
        ),
        text_encoder=TextEncoderConfig(
            hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=48
        ),
        selector_hidden=(16,),
        fusion_hidden=(16, 8),
        value_hidden=8,
        epochs=2,
        stage2_epochs=1,
        batch_size=8,
        num_samples=4,
    )  # fmt: skip
    base.update(changes)
    return RewardsConfig(**base)


@pytest.fixture()
def tiny_rewards():
    return tiny_rewards_cfg()


@pytest.fixture(scope="session")
def rating_pool(tmp_path_factory):
    """A 24-image phantom pool at 32 px rated by two simulated experts (with rater noise)."""
    from rewards.simulated import write_demo_pool

    out = tmp_path_factory.mktemp("pool") / "pool"
    csv = write_demo_pool(out, count=24, size=32, seed=3, raters=2, noise=0.2)
    return out, csv
