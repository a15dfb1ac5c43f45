"""The cluster sizing (benchmarks/memory_plan.py) and the GPU check's CPU smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
#: this session's environment without the process-group variables an earlier test's
#: one-rank group left behind (a child would try to bind the same MASTER_PORT)
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in DIST_VARS}


@pytest.fixture(scope="module")
def sd15_plan():
    import diffusers
    import memory_plan

    from medrl.config import load_config

    diffusers.utils.logging.set_verbosity_error()
    cfg = load_config("configs/fundus-sd15.yaml")
    return cfg, memory_plan.plan(cfg)


def test_memory_plan_counts_the_published_architectures(sd15_plan):
    cfg, p = sd15_plan
    # SD 1.5's UNet and VAE and a BERT-base encoder, as their model cards give them
    assert p["params"]["unet"] == pytest.approx(859.52e6, rel=1e-3)
    assert p["params"]["vae"] == pytest.approx(83.65e6, rel=1e-3)
    assert p["params"]["text_encoder"] == pytest.approx(109.5e6, rel=1e-2)
    assert p["resolution"] == 512 and p["latent"] == 64
    # LoRA grows with the rank: twice the rank, twice the parameters
    import memory_plan

    from generators.config import LoraConfig

    unet = memory_plan._meta_models(cfg)[0]
    r8, r16 = (memory_plan.lora_count(unet, LoraConfig(rank=r)) for r in (8, 16))
    assert r16 == 2 * r8 and p["lora_rl"] == 4 * r8  # the preset's rank 32
    act = p["activations_per_image"]
    for dtype in ("float32", "bfloat16"):
        assert act[(dtype, True)]["fused"] < act[(dtype, False)]["fused"] / 2  # checkpointing
        assert act[(dtype, False)]["math"] > act[(dtype, False)]["fused"]
    assert act[("bfloat16", False)]["fused"] < act[("float32", False)]["fused"]
    # per-GPU figures follow the micro-batch and the weights' dtype
    bigger = memory_plan.plan(replace(cfg, rl=replace(cfg.rl, micro_batch=cfg.rl.micro_batch * 2)))
    assert bigger["learner"][("float32", False)] > p["learner"][("float32", False)]
    assert p["sampler"]["bfloat16"] < p["sampler"]["float32"]
    text = memory_plan.table(p)
    assert "sampler actors per GPU" in text and "24 GB" in text and "80 GB" in text


def test_memory_plan_formula_agrees_with_real_memory_on_the_standins():
    """In a fresh process: the resident-memory growth of one in a long test session says
    more about the allocator's free lists than about the forward."""
    code = (
        "import sys; sys.path[:0] = ['benchmarks', '.']; import diffusers; "
        "diffusers.utils.logging.set_verbosity_error(); import memory_plan; "
        "print('RATIO', memory_plan.check())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**CLEAN_ENV, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = float(out.stdout.split("RATIO")[-1])
    assert 0.7 <= ratio <= 1.4, out.stdout


def test_gpu_check_runs_on_cpu_with_cpu_smoke():
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**CLEAN_ENV, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["smoke"] is True and result["device"] == "cpu"
    assert result["sampler_images_per_s"] > 0 and result["learner_samples_per_s"] > 0
    rate = 1 / (1 / result["sampler_images_per_s"] + 1 / result["learner_samples_per_s"])
    assert result["end_to_end_samples_per_s"] == pytest.approx(rate, rel=1e-3)
    assert result["learner_updates"] >= 1 and result["target_samples_per_s"] == 2.2
