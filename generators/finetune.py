"""Supervised fine-tuning of the generator on a manifest of image-text pairs.

Two stages, as in the MSDM recipe of the Prompt-to-Polyp study (VAE first, then UNet):

1. **VAE** (only when the config gives no pretrained VAE, i.e. the demo): the
   latent-diffusion autoencoder recipe on a CPU budget (``train_vae``, in
   :mod:`generators.vae_training`): pixel L1, a
   Laplacian-pyramid L1 that keeps edges, a very small KL term and, from
   ``finetune.vae_disc_start`` on, a small PatchGAN discriminator with the LDM adaptive
   weight (docs/generator.md, "The demo VAE"). A randomly initialised decoder cannot express what
   the latents say (its GroupNorm washes most of it out), so nothing downstream could
   learn through it. Afterwards the latent scaling factor is set to 1 / std of the
   training latents, as Stable Diffusion's 0.18215 was chosen.
2. **UNet** (full weights or LoRA; optionally the text encoder too): the noise-prediction
   loss with classifier-free-guidance text dropout.

Every random choice of UNet step ``s`` (which images, noise, timesteps, dropped captions)
comes from a generator seeded with ``(seed, s)``, so a run resumed from a checkpoint
continues exactly as the uninterrupted run would have (the data, step generators and
checkpoint commits both stages share: :mod:`generators.training_common`).

Run directory layout (``runs/<name>/``)::

    checkpoints/vae/            the trained VAE (diffusers format) once stage 1 is done
    checkpoints/step-000500/    weights + optimizer + step + config, committed by rename
    checkpoints/latest          name of the newest committed checkpoint (written last)
    tb/                         TensorBoard: loss, learning rate, sample grids
    metrics.jsonl               one JSON line per logged step
    generator/                  the fine-tuned generator (a diffusers pipeline directory)
    adapter/                    the LoRA adapter when mode is lora (diffusers + kohya)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from generators.config import DataConfig, FinetuneConfig, ModelConfig, SamplingConfig
from generators.feature_align import Alignment, FeatureExpert
from generators.images import make_grid, save_png, to_uint8
from generators.lora import (
    ADAPTER_NAME,
    attach_lora,
    get_adapter_state,
    merge_lora,
    save_adapter_state,
    set_adapter_state,
)
from generators.model import Generator, build_generator, resolve_device
from generators.sampling import sample
from generators.training_common import (
    VAE_DIR,
    VAE_STATE_DIR,
    ImageTextData,
    batch_indices,
    commit_checkpoint,
    denoising_error,
    encode_latents,
    noise_latents,
    step_generator,
)
from generators.vae_training import reconstruction_psnr, train_vae
from runfiles import (
    METRICS_FILE,
    append_metrics,
    read_latest,
    read_metrics,
    staged_folder,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- stage 2: UNet


@dataclass
class FinetuneResult:
    generator_dir: Path
    adapter_dir: Path | None
    steps: int
    resumed_from: int
    final_loss: float

    def __str__(self) -> str:
        extra = f", adapter {self.adapter_dir}" if self.adapter_dir else ""
        return f"{self.generator_dir} (step {self.steps}, resumed from {self.resumed_from}{extra})"


def _trainable(gen: Generator, cfg: FinetuneConfig) -> list[dict]:
    if cfg.mode == "lora":
        unet_params = [p for n, p in gen.unet.named_parameters() if "lora_" in n]
    else:
        gen.unet.requires_grad_(True)
        unet_params = list(gen.unet.parameters())
    groups = [{"params": unet_params, "lr": cfg.lr, "name": "unet"}]
    if cfg.train_text_encoder:
        gen.text_encoder.requires_grad_(True)
        groups.append(
            {
                "params": list(gen.text_encoder.parameters()),
                "lr": cfg.text_encoder_lr,
                "name": "text_encoder",
            }
        )
    else:
        gen.text_encoder.requires_grad_(False)
    return groups


def _save_step(
    tmp: Path, gen: Generator, cfg: FinetuneConfig, opt, sched, step: int, config_dict, align
) -> None:
    if cfg.mode == "lora":
        save_file(get_adapter_state(gen.unet), str(tmp / "lora.safetensors"))
    else:
        save_file(
            {k: v.contiguous() for k, v in gen.unet.state_dict().items()},
            str(tmp / "unet.safetensors"),
        )
    if cfg.train_text_encoder:
        save_file(
            {k: v.contiguous() for k, v in gen.text_encoder.state_dict().items()},
            str(tmp / "text_encoder.safetensors"),
        )
    if align is not None:
        align.save(tmp)
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
        tmp / "state.pt",
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    (tmp / "step.json").write_text(json.dumps({"step": step}))


def _load_step(path: Path, gen: Generator, cfg: FinetuneConfig, opt, sched, align) -> int:
    if cfg.mode == "lora":
        if not (path / "lora.safetensors").is_file():
            raise ValueError(
                f"{path} is not a LoRA checkpoint but finetune.mode is lora; use a new run.name"
            )
        set_adapter_state(gen.unet, load_file(str(path / "lora.safetensors")))
    else:
        if not (path / "unet.safetensors").is_file():
            raise ValueError(
                f"{path} is not a full-UNet checkpoint but finetune.mode is full; use a new run.name"
            )
        gen.unet.load_state_dict(load_file(str(path / "unet.safetensors")))
    if cfg.train_text_encoder:
        gen.text_encoder.load_state_dict(load_file(str(path / "text_encoder.safetensors")))
    if align is not None:
        align.load(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def _sample_grid(gen: Generator, prompts: list[str], sampling: SamplingConfig) -> np.ndarray:
    was_training = gen.unet.training
    gen.unet.eval()
    gen.text_encoder.eval()
    out = sample(
        gen,
        prompts,
        list(range(len(prompts))),
        num_steps=sampling.num_steps,
        eta=max(sampling.eta, 1e-3),
        guidance_scale=sampling.guidance_scale,
        batch_size=sampling.batch_size,
    )
    gen.unet.train(was_training)
    return make_grid(list(to_uint8(out.images)), ncols=min(8, len(prompts)))


def _data_for(data_cfg: DataConfig, model_cfg: ModelConfig, split: str = "train") -> ImageTextData:
    manifest = Path(data_cfg.manifest_path)
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest}: no manifest; run `medrl data ingest {data_cfg.csv_path}` first"
        )
    return ImageTextData.from_manifest(manifest, model_cfg.resolution, split=split)


def finetune(
    run_dir: str | os.PathLike,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    ft: FinetuneConfig,
    sampling: SamplingConfig,
    seed: int = 0,
    device: str = "auto",
    resolved_config: Mapping | None = None,
    data: ImageTextData | None = None,
    expert: FeatureExpert | None = None,
) -> FinetuneResult:
    """Fine-tune (VAE if needed, then UNet) and write the generator into ``run_dir``.

    ``run_dir/generator`` is what fine-tuning learned, in both modes: in LoRA mode the
    adapter (``ft.lora``) is merged into the saved UNet, and a trained text encoder is
    saved with it, so RL, ``medrl generate`` and eval start from the fine-tuned model by
    loading that directory alone. LoRA mode also writes the adapter itself to
    ``run_dir/adapter`` (for the base it was trained on; ``merged_into`` in its
    adapter_config.json says it is already part of ``generator/``).

    Rerunning with the same ``run_dir`` resumes from its latest checkpoint; ``ft.steps``
    is the total, so a finished run with more steps continues where it stopped.

    ``ft.align_weight > 0`` adds Feature-Aligned Diffusion's term towards ``expert``'s
    features (:mod:`generators.feature_align`; the CLI loads ``ft.align_expert``).
    """
    if ft.align_weight > 0 and expert is None:
        raise ValueError(
            f"finetune.align_weight={ft.align_weight} aligns to an expert, but none was given "
            "(set finetune.align_expert to a selector or reward-models directory)"
        )
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    dev = resolve_device(device)
    config_dict = dict(resolved_config or {})
    data = data if data is not None else _data_for(data_cfg, model_cfg)
    log.info(
        "fine-tuning on %d image-text pairs at %d px (%s)", len(data), model_cfg.resolution, dev
    )

    gen = build_generator(model_cfg, seed=seed).to(dev)
    writer = SummaryWriter(str(run_dir / "tb"))
    metrics: list[dict] = []
    _vae_stage(gen, data, ft, seed, dev, writer, metrics, ckpt_root)
    align = Alignment(gen.unet, expert, ft.align_weight, seed) if ft.align_weight > 0 else None
    groups, opt, sched, start = _unet_training_state(gen, ft, ckpt_root, align)
    grid_prompts = sorted(set(data.texts))[:8]
    loss_value = float("nan")
    bar = tqdm(range(start, ft.steps), desc="UNet", initial=start, total=ft.steps, leave=False)
    for step in bar:
        loss = _unet_step(gen, data, ft, seed, step, dev, groups, opt, sched, align)
        done = step + 1
        loss_value = loss.item()
        if done % ft.log_every == 0 or done == ft.steps:
            bar.set_postfix(loss=f"{loss_value:.4f}")
            writer.add_scalar("unet/loss", loss_value, done)
            writer.add_scalar("unet/lr", sched.get_last_lr()[0], done)
            metrics.append({"stage": "unet", "step": done, "loss": loss_value})
        if ft.sample_every and (done % ft.sample_every == 0 or done == ft.steps):
            grid = _sample_grid(gen, grid_prompts, sampling)
            writer.add_image("samples", grid, done, dataformats="HWC")
        if done % ft.checkpoint_every == 0 or done == ft.steps:
            commit_checkpoint(
                ckpt_root,
                f"step-{done:06d}",
                lambda tmp, done=done: _save_step(
                    tmp, gen, ft, opt, sched, done, config_dict, align
                ),
                keep=ft.keep_checkpoints,
            )
        _flush_metrics(run_dir, metrics)
    bar.close()
    writer.close()
    _flush_metrics(run_dir, metrics)
    done = max(ft.steps, start)
    base_dir, adapter_dir = _save_outputs(run_dir, gen, model_cfg, ft, sampling, grid_prompts, done)
    return FinetuneResult(base_dir, adapter_dir, done, start, loss_value)


def _vae_stage(
    gen: Generator,
    data: ImageTextData,
    ft: FinetuneConfig,
    seed: int,
    dev: torch.device,
    writer,
    metrics: list[dict],
    ckpt_root: Path,
) -> None:
    """Stage 1: load the run's trained VAE, or train and save one when the generator has
    no pretrained VAE; then freeze the VAE."""
    vae_dir = ckpt_root / VAE_DIR
    if gen.vae_untrained:
        if vae_dir.is_dir():
            from diffusers import AutoencoderKL

            gen.pipe.vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).to(dev)
            gen.vae_untrained = False
            log.info("VAE: resumed the trained VAE from %s", vae_dir)
        elif ft.vae_steps > 0:
            t0 = time.time()
            vae_state = ckpt_root / VAE_STATE_DIR
            factor = train_vae(gen, data, ft, seed, writer, metrics, ckpt_dir=vae_state)
            psnr = reconstruction_psnr(gen, data.batch(torch.arange(min(len(data), 64)))[0])
            log.info(
                "VAE: %d steps in %.0f s, train PSNR %.1f dB, scaling factor %.3f",
                ft.vae_steps,
                time.time() - t0,
                psnr,
                factor,
            )
            metrics.append(
                {"stage": "vae", "step": ft.vae_steps, "psnr": psnr, "scaling_factor": factor}
            )
            with staged_folder(vae_dir) as tmp:
                gen.vae.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(vae_state, ignore_errors=True)  # the finished VAE supersedes it
        else:
            log.warning(
                "no pretrained VAE and finetune.vae_steps=0: the UNet trains through a random decoder"
            )
    gen.vae.requires_grad_(False).eval()


def _unet_training_state(
    gen: Generator, ft: FinetuneConfig, ckpt_root: Path, align: Alignment | None
) -> tuple[list[dict], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """Stage 2's setup: the LoRA adapter (lora mode), the parameter groups (W_p's with the
    UNet's learning rate when aligning), optimizer and warmup schedule, resumed from the
    latest checkpoint; (groups, opt, sched, start step)."""
    if ft.mode == "lora":
        attach_lora(gen.unet, ft.lora)
    groups = _trainable(gen, ft)
    if align is not None:
        groups.append({"params": list(align.head.parameters()), "lr": ft.lr, "name": "align"})
    opt = torch.optim.AdamW(groups, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, ft.warmup_steps))
    )
    start = 0
    latest = read_latest(ckpt_root)
    if latest is not None:
        start = _load_step(latest, gen, ft, opt, sched, align)
        log.info("resuming from %s at step %d", latest, start)
    gen.unet.train()
    if ft.train_text_encoder:
        gen.text_encoder.train()
    return groups, opt, sched, start


def _unet_step(
    gen: Generator,
    data: ImageTextData,
    ft: FinetuneConfig,
    seed: int,
    step: int,
    dev: torch.device,
    groups: list[dict],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    align: Alignment | None = None,
) -> torch.Tensor:
    """One optimizer step of the noise-prediction loss (captions dropped at
    ``ft.text_dropout``) plus ``align``'s term, every draw from step ``step``'s generator;
    returns the loss."""
    scheduler = gen.scheduler
    g = step_generator(seed, step)
    idx = batch_indices(len(data), ft.batch_size, g)
    x, texts = data.batch(idx)
    drop = torch.rand(len(texts), generator=g) < ft.text_dropout
    texts = ["" if d else t for t, d in zip(texts, drop.tolist(), strict=True)]
    latents = encode_latents(gen.vae, x.to(dev), g)
    noised = noise_latents(scheduler, latents, g)
    if ft.train_text_encoder:
        cond = gen.encode_prompts(texts)
    else:
        with torch.no_grad():
            cond = gen.encode_prompts(texts)
    pred = gen.unet(noised.noisy, noised.t, encoder_hidden_states=cond).sample
    loss = denoising_error(pred, noised).mean()
    if align is not None:
        loss = loss + align.weight * align.loss(scheduler, x.to(dev), noised.t, g)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if ft.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for grp in groups for p in grp["params"]], ft.grad_clip)
    opt.step()
    sched.step()
    return loss


def _save_outputs(
    run_dir: Path,
    gen: Generator,
    model_cfg: ModelConfig,
    ft: FinetuneConfig,
    sampling: SamplingConfig,
    grid_prompts: list[str],
    done: int,
) -> tuple[Path, Path | None]:
    """Write ``generator/`` (LoRA merged), ``adapter/`` (lora mode) and the sample grid;
    returns (generator dir, adapter dir or None)."""
    gen.unet.eval()
    gen.text_encoder.eval()
    adapter_dir = None
    base_dir = run_dir / "generator"
    grid = _sample_grid(gen, grid_prompts, sampling)
    adapter = None
    if ft.mode == "lora":
        adapter = (get_adapter_state(gen.unet), gen.unet.peft_config[ADAPTER_NAME])
        merge_lora(gen.unet)
    gen.save(
        base_dir, finetune={"mode": ft.mode, "steps": done, "text_encoder": ft.train_text_encoder}
    )
    if adapter is not None:  # after generator/: an adapter marked merged is always in it
        adapter_dir = run_dir / "adapter"
        save_adapter_state(
            *adapter,
            adapter_dir,
            extra={"base": _base_name(model_cfg), "merged_into": "generator", "step": done},
        )
    save_png(grid, run_dir / "samples" / "finetune-grid.png")
    return base_dir, adapter_dir


def unmerged_adapter(run_dir: str | os.PathLike) -> Path | None:
    """A fine-tuning adapter at ``run_dir/adapter`` that ``generator/`` does not include yet
    (written before adapters were merged), else None."""
    adapter = Path(run_dir) / "adapter"
    config = adapter / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        merged = json.loads(config.read_text()).get("merged_into")
    except (OSError, ValueError) as e:
        raise ValueError(f"{config}: unreadable adapter config ({e})") from e
    return None if merged else adapter


def require_merged(run_dir: str | os.PathLike) -> None:
    """Raise when ``run_dir/generator`` lacks the run's fine-tuning adapter (an older run)."""
    old = unmerged_adapter(run_dir)
    if old is not None:
        raise ValueError(
            f"{old} is a fine-tuning adapter that {Path(run_dir) / 'generator'} does not "
            "include (written by an older medrl): rerun `medrl finetune` with the run's "
            "config to merge it, so that this command starts from the fine-tuned model"
        )


def load_run_generator(run_dir: str | os.PathLike) -> Generator:
    """The fine-tuned generator of a run: ``run_dir/generator`` (LoRA merged into it).

    A run fine-tuned in LoRA mode before the merge existed has the bare base in
    ``generator/`` and the adapter beside it: that adapter is applied, with a warning.
    """
    from generators.lora import load_adapter_into
    from generators.model import load_generator

    gen = load_generator(Path(run_dir) / "generator")
    old = unmerged_adapter(run_dir)
    if old is not None:
        log.warning(
            "%s is not merged into %s/generator (an older medrl); applying it. Rerun "
            "`medrl finetune` with the same config to merge it", old, run_dir,
        )  # fmt: skip
        load_adapter_into(gen.pipe, old)
    return gen


def _base_name(model_cfg: ModelConfig) -> str:
    """The UNet the fine-tuning adapter was trained on (a hub id or path; 'built' if none)."""
    return str(model_cfg.unet.pretrained or "built from model.unet (random init)")


def _flush_metrics(run_dir: Path, metrics: list[dict]) -> None:
    append_metrics(run_dir / METRICS_FILE, metrics)
    metrics.clear()


def iter_metrics(run_dir: str | os.PathLike) -> Iterator[dict]:
    """The run's metrics.jsonl records (runfiles.read_metrics)."""
    yield from read_metrics(Path(run_dir) / METRICS_FILE)
