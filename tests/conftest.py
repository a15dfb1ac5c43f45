"""Shared fixtures: tiny models built from config, the phantom dataset, run directories."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cfg():
    """The demo preset's model at its defaults (64 px, tiny random parts)."""
    from medrl.config import load_config

    return load_config(None)


@pytest.fixture()
def tiny_gen(tiny_cfg):
    from generators.model import build_generator

    return build_generator(tiny_cfg.model, seed=0)
