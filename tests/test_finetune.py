"""Fine-tuning: checkpoints, resume continuing the step count, VAE stage, LoRA mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from generators.datasets import ingest_csv
from generators.finetune import commit_checkpoint, iter_metrics, latest_checkpoint
from medrl.cli import main


@pytest.fixture(scope="module")
def disc_dataset(tmp_path_factory) -> Path:
    """24 small images of coloured discs with captions, ingested into a manifest."""
    root = tmp_path_factory.mktemp("discs")
    rng = np.random.default_rng(0)
    rows = ["path,Text,modality,split"]
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(24):
        side = "left" if i % 2 else "right"
        cx = 10 if side == "left" else 22
        img = np.zeros((32, 32, 3), np.uint8)
        mask = (xx - cx) ** 2 + (yy - 16) ** 2 < rng.integers(20, 60)
        img[mask] = (200, 90, 40 + i)  # every image unique (ingest refuses cross-split copies)
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append(
            f"{i}.png,colour fundus photograph {side} eye,fundus,{'val' if i >= 20 else 'train'}"
        )
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    ingest_csv(root / "data.csv")
    return root


def _args(root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "finetune",
        f"run.root={runs}",
        f"run.name={name}",
        "run.device=cpu",
        f"data.root={root}",
        "model.resolution=32",
        "finetune.batch_size=4",
        "finetune.vae_steps=3",
        "finetune.vae_batch_size=4",
        "finetune.checkpoint_every=2",
        "finetune.keep_checkpoints=2",
        "finetune.sample_every=0",
        "finetune.log_every=1",
        "finetune.warmup_steps=1",
        "sampling.num_steps=2",
        *extra,
    ]


def test_resume_continues_the_step_count_and_matches_uninterrupted(disc_dataset, tmp_path):
    runs = tmp_path / "runs"
    assert main(_args(disc_dataset, runs, "cut", "finetune.steps=4")) == 0
    run = runs / "cut"
    assert (run / "config.yaml").is_file()
    assert latest_checkpoint(run / "checkpoints").name == "step-000004"
    assert main(_args(disc_dataset, runs, "cut", "finetune.steps=6")) == 0
    unet_steps = [m["step"] for m in iter_metrics(run) if m["stage"] == "unet" and "loss" in m]
    assert unet_steps == [1, 2, 3, 4, 5, 6]  # the rerun went on at 5, nothing repeated
    assert [m for m in iter_metrics(run) if m["stage"] == "vae" and "psnr" in m].__len__() == 1
    # only the newest two checkpoints are kept, and `latest` names the newest
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-000004",
        "step-000006",
    ]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    assert (run / "config.previous.yaml").is_file()  # steps changed between invocations

    assert main(_args(disc_dataset, runs, "whole", "finetune.steps=6")) == 0
    a = load_file(str(run / "checkpoints" / "step-000006" / "unet.safetensors"))
    b = load_file(str(runs / "whole" / "checkpoints" / "step-000006" / "unet.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert (runs / "whole" / "generator" / "model_index.json").is_file()
    assert (runs / "whole" / "samples" / "finetune-grid.png").is_file()


def test_lora_mode_writes_base_and_adapter_and_generate_uses_it(disc_dataset, tmp_path, capsys):
    runs = tmp_path / "runs"
    extra = ("finetune.mode=lora", "finetune.steps=2", "lora.rank=2", "lora.alpha=4")
    assert main(_args(disc_dataset, runs, "lora", *extra)) == 0
    run = runs / "lora"
    ckpt = latest_checkpoint(run / "checkpoints")
    assert (ckpt / "lora.safetensors").is_file() and not (ckpt / "unet.safetensors").exists()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["alpha"] == 4.0
    out = tmp_path / "gen"
    args = [
        "generate",
        f"run.root={runs}",
        "run.name=lora",
        "sampling.num_steps=2",
        "--prompt",
        "colour fundus photograph left eye",
        "--num-per-prompt",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    import pandas as pd

    table = pd.read_parquet(out / "samples.parquet")
    assert len(table) == 2 and table.seed.tolist() == [0, 1]
    assert table.adapter.str.endswith("adapter").all()
    for p in table.path:
        assert Image.open(out / p).size == (32, 32)
    # switching a run from lora to full is refused with a clear message
    capsys.readouterr()
    assert main(_args(disc_dataset, runs, "lora", "finetune.mode=full", "finetune.steps=4")) == 2
    assert "not a full-UNet checkpoint" in capsys.readouterr().err


def test_missing_manifest_says_what_to_run(tmp_path, capsys):
    assert main(["finetune", f"data.root={tmp_path}", f"run.root={tmp_path / 'runs'}"]) == 2
    assert "medrl data ingest" in capsys.readouterr().err


def test_commit_checkpoint_never_leaves_a_half_written_one(tmp_path):
    root = tmp_path / "ck"
    commit_checkpoint(root, "step-000001", lambda d: (d / "w").write_text("1"), keep=2)

    def boom(d):
        (d / "w").write_text("partial")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        commit_checkpoint(root, "step-000002", boom, keep=2)
    assert latest_checkpoint(root).name == "step-000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
