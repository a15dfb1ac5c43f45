"""``medrl finetune finetune.align_weight=...``: Feature-Aligned Diffusion as a fine-tuning
variant (generators/feature_align.py; the expert is handed in by medrl.runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generators.training_common import ImageTextData, encode_latents, noise_latents
from medrl.cli import main
from runfiles import read_latest
from tests.test_finetune import _args, disc_dataset  # noqa: F401 (the fixture)


def _held_out_alignment(unet, vae, gen, align, data: ImageTextData) -> float:
    """Mean L_align of ``align`` on the held-out images at fixed latent and pixel noise."""
    x, texts = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        cond = gen.encode_prompts(texts)
        losses = []
        for s in range(4):
            g = torch.Generator().manual_seed(700 + s)
            noised = noise_latents(gen.scheduler, encode_latents(vae, x, g), g)
            unet(noised.noisy, noised.t, encoder_hidden_states=cond)
            losses.append(align.loss(gen.scheduler, x, noised.t, g)[0])
    align.down.remove()
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_finetune_with_alignment_aligns_on_held_out_images(
    disc_dataset,  # noqa: F811
    tiny_selector_dir,
    tmp_path,
):
    """Six steps with finetune.align_weight=1 lower L_align on the held-out images by more
    than MARGIN (the base UNet with W_p's initial draw against the fine-tuned UNet with the
    last checkpoint's W_p, fixed noise; measured 0.019 -> -0.872; with the term's weight
    zeroed in the step, 0.019 -> 0.051); the checkpoint holds a trained W_p, and a run
    resumed at step 4 ends where an uninterrupted one does (W_p and its optimizer state
    resume)."""
    MARGIN = 0.3
    from generators.feature_align import Alignment
    from generators.model import build_generator, load_generator
    from medrl.config import load_config
    from rewards.scorers import load_selector

    runs = tmp_path / "runs"
    extra = ("finetune.align_weight=1", f"finetune.align_expert={tiny_selector_dir}")
    assert main(_args(disc_dataset, runs, "fad", "finetune.steps=4", *extra)) == 0
    assert main(_args(disc_dataset, runs, "fad", "finetune.steps=6", *extra)) == 0  # resumed
    assert main(_args(disc_dataset, runs, "whole", "finetune.steps=6", *extra)) == 0
    run = runs / "fad"
    ckpt = read_latest(run / "checkpoints")
    for name in (Alignment.FILE, "unet.safetensors"):
        resumed = load_file(str(ckpt / name))
        whole = load_file(str(runs / "whole" / "checkpoints" / ckpt.name / name))
        for k in whole:
            torch.testing.assert_close(resumed[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)
    cfg = load_config(run / "config.yaml")
    expert = load_selector(tiny_selector_dir, "test")
    tuned = load_generator(run / "generator")
    base = build_generator(cfg.model, seed=cfg.run.seed)
    held_out = ImageTextData.from_manifest(disc_dataset / "manifest.parquet", 32, split="val")
    before = _held_out_alignment(
        base.unet, tuned.vae, tuned, Alignment(base.unet, expert, 1.0, cfg.run.seed), held_out
    )
    align = Alignment(tuned.unet, expert, 1.0, cfg.run.seed)
    initial = align.head.weight.detach().clone()
    align.load(ckpt)
    assert not torch.allclose(align.head.weight, initial)  # W_p trained in the run's optimizer
    after = _held_out_alignment(tuned.unet, tuned.vae, tuned, align, held_out)
    assert after < before - MARGIN, (before, after)


def test_align_weight_zero_is_todays_finetune_and_a_missing_expert_is_named(
    disc_dataset,  # noqa: F811
    tmp_path,
    capsys,
):
    """finetune.align_weight=0 never loads the expert (a missing one is no error), writes
    no W_p and the same generator bytes as a run that never names one; align_weight > 0
    without a selector is an error naming finetune.align_expert."""
    runs = tmp_path / "runs"
    assert main(_args(disc_dataset, runs, "plain", "finetune.steps=2")) == 0
    nowhere = f"finetune.align_expert={tmp_path / 'nowhere'}"
    assert main(_args(disc_dataset, runs, "zero", "finetune.steps=2", nowhere)) == 0
    assert not list((runs / "zero" / "checkpoints").glob("step-*/align_head.safetensors"))
    unet = Path("generator") / "unet" / "diffusion_pytorch_model.safetensors"
    assert (runs / "plain" / unet).read_bytes() == (runs / "zero" / unet).read_bytes()
    capsys.readouterr()
    args = _args(disc_dataset, runs, "missing", "finetune.steps=2", "finetune.align_weight=1")
    assert main(args) == 2
    assert "finetune.align_expert" in capsys.readouterr().err
