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


@pytest.fixture(scope="session")
def rl_generator_dir(tmp_path_factory):
    """The RL and cluster tests' tiny generator (tests/rl/conftest.py builds it), once."""
    from tests.rl.conftest import build_rl_generator

    return build_rl_generator(tmp_path_factory.mktemp("rlgen"))


@pytest.fixture(scope="session")
def tiny_selector_dir(tmp_path_factory):
    """A tiny random quality selector, the feature-alignment tests' expert, once."""
    from tests.rl.conftest import build_tiny_selector

    return build_tiny_selector(tmp_path_factory.mktemp("selector"))


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    """Ray's driver connection closed before the interpreter finalizes (a module fixture
    or a failed test may leave it up; Ray's own atexit hook would run during shutdown)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's exit status, skipping interpreter finalization.

    Once every test has run and pytest has reported, the process holds native threads of
    Ray's core worker, greenlet (Playwright), torch and tensorboard's writer; on CI (stop
    21) all 395 tests passed and the process then died with SIGSEGV while Python
    finalized them, which failed `make test` though nothing under test had. Nothing of
    the tests' own runs after this point, so the process exits here. Set
    MEDRL_TEST_FINALIZE=1 to finalize normally (to chase such a crash, with
    PYTHONFAULTHANDLER=1).
    """
    if os.environ.get("MEDRL_TEST_FINALIZE") == "1" or not _EXIT_STATUS:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
