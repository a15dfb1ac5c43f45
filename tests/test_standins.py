"""The GPU preset (configs/fundus-sd15.yaml) end to end on hub-layout stand-ins.

Every model loads through the preset's ``*.pretrained`` keys, pointed at the folders
``medrl dev make-standins`` writes; only sizes and steps are overridden. The path is the
README's "Using it on your data": finetune (LoRA, text encoder trained) -> generate ->
ratings -> reward models (towers from the ViT and BERT folders) -> RL on a local Ray ->
export -> a fresh diffusers pipeline with the export draws what medrl's sampler drew.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medrl.standins import BERT_DIR, SD_DIR, VIT_DIR, standin_overrides

SIZES = [
    "run.device=cpu",
    "model.resolution=64",
    "model.text_encoder.max_length=32",
    "finetune.steps=4",
    "finetune.batch_size=4",
    "finetune.checkpoint_every=2",
    "finetune.sample_every=0",
    "finetune.warmup_steps=1",
    "finetune.lr=5e-3",
    "finetune.text_encoder_lr=5e-3",
    "finetune.lora.rank=4",
    "finetune.lora.alpha=4",
    "lora.rank=4",
    "lora.alpha=8",
    "sampling.num_steps=3",
    "sampling.batch_size=4",
    "rewards.vision.detail_channels=false",
    "rewards.epochs=1",
    "rewards.stage1_epochs=1",
    "rewards.stage2_epochs=1",
    "rewards.batch_size=8",
    "rewards.pretrain_epochs=1",
    "rl.iterations=2",
    "rl.num_samplers=1",
    "rl.prompts_per_iteration=2",
    "rl.group_size=2",
    "rl.micro_batch=2",
    "rl.sampler_chunk=2",
    "rl.eval_prompts=2",
    "rl.eval_per_prompt=1",
    "rl.lr=1e-2",
]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    from medrl.cli import main

    root = tmp_path_factory.mktemp("hub") / "standins"
    assert main(["dev", "make-standins", str(root)]) == 0
    return root


def test_standins_have_the_hub_layout_and_load_as_real_weights_do(standins, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer, ViTModel

    sd = standins / SD_DIR
    index = json.loads((sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part, files in {
        "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
        "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
        "scheduler": ["scheduler_config.json"],
        "text_encoder": ["config.json", "model.safetensors"],
        "tokenizer": ["tokenizer_config.json", "vocab.json", "merges.txt"],
    }.items():
        assert part in index, part
        for f in files:
            assert (sd / part / f).is_file(), f"{part}/{f}"
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", use_safetensors=True)
    assert list(unet.config.down_block_types[:3]) == ["CrossAttnDownBlock2D"] * 3
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)

    bert = standins / BERT_DIR
    for f in ("config.json", "vocab.txt", "tokenizer_config.json", "model.safetensors"):
        assert (bert / f).is_file(), f
    tok = AutoTokenizer.from_pretrained(bert)
    pieces = tok.tokenize("microaneurysms and haemorrhages")
    assert "[UNK]" not in pieces and len(pieces) < 12  # a biomedical WordPiece vocabulary
    model = AutoModel.from_pretrained(bert, use_safetensors=True)
    assert model.config.hidden_size == unet.config.cross_attention_dim  # as 768 and 768
    vit = standins / VIT_DIR
    assert (vit / "preprocessor_config.json").is_file()
    assert ViTModel.from_pretrained(vit, use_safetensors=True).config.image_size == 64

    from medrl.cli import main  # a second run never writes over them

    capsys.readouterr()
    assert main(["dev", "make-standins", str(standins)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_preset_runs_end_to_end_on_the_standins(
    standins, tmp_path, monkeypatch, capsys, caplog
):
    from safetensors.torch import load_file
    from transformers import AutoModel

    from generators.datasets import ingest_csv
    from generators.finetune import load_run_generator
    from generators.lora import attach_lora, set_adapter_state
    from generators.model import Generator, load_generator
    from generators.phantom_dataset import write_demo_dataset
    from generators.sampling import sample
    from medrl.cli import main
    from medrl.config import load_config

    monkeypatch.setenv("MEDRL_RAY_DASHBOARD", "0")
    data = tmp_path / "data"
    write_demo_dataset(data, count=48, size=64, seed=3)
    ingest_csv(data / "data.csv")
    runs = tmp_path / "runs"
    db = tmp_path / "ratings.db"
    common = [
        "--config",
        "configs/fundus-sd15.yaml",
        *standin_overrides(standins),
        *SIZES,
        f"run.root={runs}",
        "run.name=sd",
        f"data.root={data}",
        f"data.csv={data / 'data.csv'}",
        f"rewards.ratings_db={db}",
    ]
    cfg = load_config("configs/fundus-sd15.yaml", common[2:])
    assert cfg.finetune.mode == "lora" and cfg.finetune.train_text_encoder
    assert cfg.model.dtype == "float16"  # the preset's; on a CPU medrl says what it does

    # 1. fine-tune: LoRA on the SD UNet, BioMedBERT trained with it
    assert main(["finetune", *common]) == 0
    run = runs / "sd"
    gen = load_run_generator(run)
    base_te = load_generator(run / "generator").text_encoder  # the saved, trained one
    shipped_te = AutoModel.from_pretrained(standins / BERT_DIR)
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(base_te.parameters(), shipped_te.parameters(), strict=False)
    )
    assert moved > 0  # the trained text encoder reached generator/

    # 2. generate, 3. ratings (the SIMULATED expert from pixels) of generated images and
    # of a phantom pool, 4. reward models on the ViT and BERT folders
    texts = [
        "colour fundus photograph, left eye, moderate non-proliferative diabetic retinopathy",
        "colour fundus photograph, right eye, no diabetic retinopathy",
    ]
    rated = tmp_path / "rated"  # one images root for both sessions' image paths
    gen_args = ["generate", *common, "--out", str(rated), "--num-per-prompt", "4"]
    for t in texts:
        gen_args += ["--prompt", t]
    caplog.clear()
    assert main(gen_args) == 0
    assert "sampling runs in float32 instead" in caplog.text  # float16 asked, on a CPU
    generated = rated / "generated.csv"
    sim = ["ratings", "simulate", str(rated), "--from-pixels", "--noise", "0", "--out"]
    assert main([*sim, str(generated)]) == 0
    pool = tmp_path / "pool"  # phantoms of graded quality, rated too
    assert main(["ratings", "simulate", str(pool), "--pool", "--count", "32", "--size", "64"]) == 0
    shutil.copytree(pool / "images", rated / "images", dirs_exist_ok=True)
    for csv in (generated, pool / "ratings.csv"):
        assert main(["ratings", "ingest", str(csv), "--db", str(db)]) == 0
    assert main(["rewards", "train", *common, f"rewards.images_root={rated}"]) == 0
    for kind in ("selector", "alignment"):  # towers of the stand-ins' sizes
        spec = json.loads((run / "rewards" / kind / "reward_model.json").read_text())
        vision = spec["architecture"]["vision"]
        assert (vision["hidden_size"], vision["patch_size"], vision["image_size"]) == (32, 8, 64)

    # 5. RL on a local Ray, 6. export
    assert main(["rl", "train", *common]) == 0
    out = capsys.readouterr().out
    assert "RL adapter:" in out
    export = tmp_path / "export"
    assert main(["export", str(run / "rl" / "adapter"), "--out", str(export),
                 "--generator", str(run / "generator")]) == 0  # fmt: skip

    # a fresh diffusers pipeline of the run's generator plus the exported LoRA draws what
    # medrl's sampler draws with the final adapter (the learner's last checkpoint)
    from diffusers import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(
        run / "generator", safety_checker=None, requires_safety_checker=False,
        use_safetensors=True,
    )  # fmt: skip
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")
    fresh.text_encoder.config.use_attention_mask = True
    ours = load_generator(run / "generator")
    attach_lora(ours.unet, cfg.lora)
    latest = (run / "rl" / "checkpoints" / "latest").read_text().strip()
    set_adapter_state(
        ours.unet,
        {
            k.removeprefix("unet."): v
            for k, v in load_file(
                str(
                    run
                    / "rl"
                    / "checkpoints"
                    / latest
                    / "adapter"
                    / "pytorch_lora_weights.safetensors"
                )
            ).items()
        },
    )
    kw = dict(num_steps=3, eta=1.0, guidance_scale=7.5)
    a = sample(Generator(pipe=fresh, resolution=64), texts, [5, 6], **kw).images
    b = sample(ours, texts, [5, 6], **kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    plain = sample(gen, texts, [5, 6], **kw).images
    assert (a - plain).abs().max() > 1e-3  # the adapter changed something
