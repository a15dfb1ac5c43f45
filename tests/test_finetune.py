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
from generators.finetune import iter_metrics
from generators.training_common import commit_checkpoint
from medrl.cli import main
from runfiles import read_latest


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
    assert read_latest(run / "checkpoints").name == "step-000004"
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


def _finetuned_reference(run: Path):
    """The fine-tuned model rebuilt from its parts, without ``generator/``'s UNet: the
    base built from the run's config, the trained VAE, the last checkpoint's UNet (full) or
    LoRA, its text encoder when it was trained. And the bare base with the same VAE."""
    from generators.lora import attach_lora, set_adapter_state
    from generators.model import build_generator, load_generator
    from medrl.config import load_config

    cfg = load_config(run / "config.yaml")
    ckpt = read_latest(run / "checkpoints")
    trained_vae = load_generator(run / "generator").vae
    base = build_generator(cfg.model, seed=cfg.run.seed)
    base.pipe.vae = trained_vae
    ref = build_generator(cfg.model, seed=cfg.run.seed)
    ref.pipe.vae = trained_vae
    if cfg.finetune.mode == "lora":
        attach_lora(ref.unet, cfg.finetune.lora)
        set_adapter_state(ref.unet, load_file(str(ckpt / "lora.safetensors")))
    else:
        ref.unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
    te = load_file(str(ckpt / "text_encoder.safetensors"))
    ref.text_encoder.load_state_dict(te)
    return cfg, ref, base, te


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fine_tuning_result_is_where_generate_and_rl_start(disc_dataset, tmp_path, mode, capsys):
    """generator/ holds what fine-tuning learned (LoRA merged, trained text encoder), and an
    RL run with rl.lr=0 exports an adapter that draws exactly the fine-tuned model."""
    from generators.lora import load_adapter_into, save_adapter
    from generators.model import load_generator
    from generators.sampling import sample
    from medrl.config import load_config
    from rewards.pools import load_checkpoint_generator
    from rl.inputs import resolve_inputs
    from rl.loop import run_local

    runs = tmp_path / "runs"
    extra = (
        f"finetune.mode={mode}",
        "finetune.steps=2",
        "finetune.lr=5e-2",  # large steps: fine-tuned and base must differ visibly
        "finetune.lora.rank=2",
        "finetune.lora.alpha=4",
        "lora.rank=3",  # the RL adapter is configured apart
        "finetune.train_text_encoder=true",
        "finetune.text_encoder_lr=5e-2",
    )
    assert main(_args(disc_dataset, runs, mode, *extra)) == 0
    run = runs / mode
    cfg, ref, base, te = _finetuned_reference(run)
    prompts = ["colour fundus photograph left eye", "colour fundus photograph right eye"] * 2
    kw = dict(num_steps=3, eta=1.0, guidance_scale=3.0)
    want = sample(ref, prompts, [0, 1, 2, 3], **kw).images
    bare = sample(base, prompts, [0, 1, 2, 3], **kw).images
    assert (want - bare).abs().max() > 0.05  # what fine-tuning learned shows in the images

    saved = load_generator(run / "generator")
    meta = json.loads((run / "generator" / "medrl_generator.json").read_text())
    assert meta["finetune"] == {"mode": mode, "steps": 2, "text_encoder": True}
    assert not getattr(saved.unet, "peft_config", None)
    got = sample(saved, prompts, [0, 1, 2, 3], **kw).images
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    saved_te = saved.text_encoder.state_dict()
    assert all(torch.equal(saved_te[k], v) for k, v in te.items())
    # the rating pool's view of the last checkpoint is the same model
    again = load_checkpoint_generator(run, read_latest(run / "checkpoints"))
    torch.testing.assert_close(sample(again, prompts, [0, 1, 2, 3], **kw).images, want,
                               rtol=0, atol=2e-4)  # fmt: skip
    if mode == "lora":
        spec = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert spec["rank"] == 2 and spec["alpha"] == 4.0 and spec["merged_into"] == "generator"

    # RL starts from it: lr 0, one iteration, the exported adapter draws the same images
    rl_cfg = load_config(
        run / "config.yaml",
        [
            "rl.lr=0",
            "rl.iterations=1",
            "rl.reward=brightness",
            "rl.prompts_per_iteration=2",
            "rl.group_size=2",
            "rl.micro_batch=2",
            "rl.sampler_chunk=2",
            "rl.eval_prompts=0",
            "rl.gold=none",
            "sampling.num_steps=3",
        ],
    )
    records, learner = run_local(rl_cfg, resolve_inputs(rl_cfg))
    assert records[0]["iteration"] == 0 and records[0]["approx_kl"] == 0
    save_adapter(learner.engine.module, tmp_path / "rl-adapter", formats=("diffusers",))
    assert json.loads((tmp_path / "rl-adapter" / "adapter_config.json").read_text())["rank"] == 3
    fresh = load_generator(run / "generator")
    load_adapter_into(fresh.pipe, tmp_path / "rl-adapter")
    torch.testing.assert_close(sample(fresh, prompts, [0, 1, 2, 3], **kw).images, want,
                               rtol=0, atol=2e-4)  # fmt: skip

    out = tmp_path / "gen"
    args = ["generate", f"run.root={runs}", f"run.name={mode}", "sampling.num_steps=2",
            "--prompt", prompts[0], "--num-per-prompt", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    import pandas as pd

    table = pd.read_parquet(out / "samples.parquet")
    assert len(table) == 2 and table.seed.tolist() == [0, 1] and (table.adapter == "").all()
    for p in table.path:
        assert Image.open(out / p).size == (32, 32)
    if mode == "lora":
        ckpt = read_latest(run / "checkpoints")
        assert (ckpt / "lora.safetensors").is_file() and not (ckpt / "unet.safetensors").exists()
        # switching a run from lora to full is refused with a clear message
        capsys.readouterr()
        assert main(_args(disc_dataset, runs, mode, "finetune.mode=full", "finetune.steps=4")) == 2
        assert "not a full-UNet checkpoint" in capsys.readouterr().err


def test_a_run_whose_adapter_is_not_merged_is_refused_by_rl_and_applied_by_generate(
    disc_dataset, tmp_path, caplog
):
    """Runs fine-tuned in LoRA mode by an older medrl: generator/ is the bare base."""
    from generators.finetune import load_run_generator
    from medrl.config import load_config
    from rl.inputs import resolve_inputs

    runs = tmp_path / "runs"
    assert main(_args(disc_dataset, runs, "old", "finetune.mode=lora", "finetune.steps=2")) == 0
    run = runs / "old"
    config = run / "adapter" / "adapter_config.json"
    spec = json.loads(config.read_text())
    spec.pop("merged_into")
    config.write_text(json.dumps(spec))
    cfg = load_config(run / "config.yaml", ["rl.reward=brightness"])
    with pytest.raises(ValueError, match="rerun `medrl finetune`"):
        resolve_inputs(cfg)
    gen = load_run_generator(run)
    assert "default" in gen.unet.peft_config and "not merged" in caplog.text


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
    assert read_latest(root).name == "step-000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
