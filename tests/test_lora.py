"""LoRA through peft: attach, get/set state, export (diffusers + kohya) and reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from generators.config import LoraConfig
from generators.lora import (
    attach_lora,
    get_adapter_state,
    load_adapter_into,
    save_adapter,
    set_adapter_state,
)
from generators.model import build_generator, load_generator
from generators.sampling import sample

PROMPTS = ["colour fundus photograph, left eye", "colour fundus photograph, right eye"]
SPEC = LoraConfig(rank=4, alpha=16.0)  # alpha != rank: a lost alpha changes the outputs


def _randomise_lora(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture()
def base_dir(tiny_cfg, tmp_path):
    gen = build_generator(tiny_cfg.model, seed=1)
    return gen.save(tmp_path / "generator")


def test_fresh_adapter_changes_nothing_and_only_lora_trains(base_dir):
    gen = load_generator(base_dir)
    before = sample(gen, PROMPTS, [1, 2], num_steps=3)
    attach_lora(gen.unet, SPEC)
    after = sample(gen, PROMPTS, [1, 2], num_steps=3)
    torch.testing.assert_close(after.images, before.images, rtol=0, atol=1e-5)
    trainable = [n for n, p in gen.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} >= {"to_q", "to_k", "to_v"}


def test_get_set_state_is_exact_and_checked(base_dir):
    src, dst = load_generator(base_dir), load_generator(base_dir)
    attach_lora(src.unet, SPEC)
    attach_lora(dst.unet, SPEC)
    _randomise_lora(src.unet)
    state = get_adapter_state(src.unet)
    assert all(("lora_A" in k or "lora_B" in k) for k in state)
    set_adapter_state(dst.unet, state)
    a = sample(src, PROMPTS, [1, 2], num_steps=3)
    b = sample(dst, PROMPTS, [1, 2], num_steps=3)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)

    # a bad state is refused before anything is written
    before = get_adapter_state(dst.unet)
    broken = dict(state)
    key = next(iter(broken))
    broken[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(dst.unet, broken)
    partial = dict(state)
    partial.pop(key)
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(dst.unet, partial)
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    with pytest.raises(ValueError, match="non-finite"):
        set_adapter_state(dst.unet, nan_state)
    after = get_adapter_state(dst.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_and_reload_with_load_lora_weights(base_dir, tmp_path, fmt):
    gen = load_generator(base_dir)
    plain = sample(gen, PROMPTS, [1, 2], num_steps=4)
    attach_lora(gen.unet, SPEC)
    _randomise_lora(gen.unet, seed=3)
    ref = sample(gen, PROMPTS, [1, 2], num_steps=4)
    assert (ref.images - plain.images).abs().max() > 1e-2  # the adapter matters

    files = save_adapter(gen.unet, tmp_path / "adapter")
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["alpha"] == 16.0
    with safe_open(str(files[1]), "pt") as f:
        alphas = [f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")]
        assert alphas and all(a == 16.0 for a in alphas)
        assert all(k.startswith("lora_unet_") for k in f.keys())

    fresh = load_generator(base_dir)
    weights = files[0] if fmt == "diffusers" else files[1]
    load_adapter_into(fresh.pipe, weights)
    out = sample(fresh, PROMPTS, [1, 2], num_steps=4)
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)


def test_diffusers_pipeline_call_matches_after_reload(base_dir, tmp_path):
    """diffusers' own StableDiffusionPipeline.__call__ sees the same adapter."""
    gen = load_generator(base_dir)
    attach_lora(gen.unet, SPEC)
    _randomise_lora(gen.unet, seed=5)
    save_adapter(gen.unet, tmp_path / "adapter", formats=("diffusers",))
    fresh = load_generator(base_dir)
    load_adapter_into(fresh.pipe, tmp_path / "adapter")
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=64, width=64, output_type="pt")
    a = gen.pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    b = fresh.pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_export_command_rewrites_both_formats(base_dir, tmp_path):
    from medrl.cli import main

    gen = load_generator(base_dir)
    attach_lora(gen.unet, SPEC)
    _randomise_lora(gen.unet, seed=7)
    save_adapter(gen.unet, tmp_path / "adapter", formats=("diffusers",))
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "exp")]) == 0
    direct = save_adapter(gen.unet, tmp_path / "direct", formats=("kohya",))[0]
    with (
        safe_open(str(direct), "pt") as a,
        safe_open(str(tmp_path / "exp" / "lora_kohya.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k))


def test_an_adapter_whose_keys_do_not_match_is_refused_whole(base_dir, tmp_path, capsys):
    """32 renamed keys: diffusers alone loads the rest and says nothing; medrl refuses,
    names the first missing and unexpected keys, and leaves the UNet without the adapter
    (generate and export refuse it too)."""
    from safetensors.torch import load_file, save_file

    from medrl.cli import main

    gen = load_generator(base_dir)
    attach_lora(gen.unet, SPEC)
    _randomise_lora(gen.unet, seed=11)
    save_adapter(gen.unet, tmp_path / "adapter", formats=("diffusers",))
    weights = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    renamed = {}
    for i, (k, v) in enumerate(sorted(state.items())):
        renamed[k.replace("unet.", "unet.renamed_", 1) if i < 32 else k] = v
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(renamed, str(bad / "pytorch_lora_weights.safetensors"), metadata=metadata)
    (bad / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text()
    )

    fresh = load_generator(base_dir)
    plain = sample(fresh, PROMPTS, [1, 2], num_steps=3)
    with pytest.raises(ValueError, match=r"32 unexpected \(first: renamed_"):
        load_adapter_into(fresh.pipe, bad)
    assert not getattr(fresh.unet, "peft_config", None)  # nothing stays loaded
    torch.testing.assert_close(sample(fresh, PROMPTS, [1, 2], num_steps=3).images, plain.images)
    load_adapter_into(fresh.pipe, tmp_path / "adapter")  # the intact one still loads

    run_args = [f"run.root={tmp_path / 'runs'}", "run.name=x", "sampling.num_steps=2"]
    gen_args = ["generate", *run_args, "--generator", str(base_dir), "--prompt", PROMPTS[0]]
    assert main([*gen_args, "--adapter", str(bad)]) == 2
    assert "keys do not match" in capsys.readouterr().err
    # export: a file missing one factor is refused; with --generator, a renamed module too
    half = dict(state)
    half.pop(next(k for k in sorted(half) if k.endswith("lora_B.weight")))
    (tmp_path / "half").mkdir()
    save_file(half, str(tmp_path / "half" / "pytorch_lora_weights.safetensors"), metadata=metadata)
    (tmp_path / "half" / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text()
    )
    assert main(["export", str(tmp_path / "half"), "--out", str(tmp_path / "e1")]) == 2
    assert "lora_B.weight" in capsys.readouterr().err and not (tmp_path / "e1").exists()
    assert (
        main(["export", str(bad), "--out", str(tmp_path / "e2"), "--generator", str(base_dir)]) == 2
    )
    assert "unexpected" in capsys.readouterr().err and not (tmp_path / "e2").exists()
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "e3"),
                 "--generator", str(base_dir)]) == 0  # fmt: skip
