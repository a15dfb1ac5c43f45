"""Rating pools of the generator's own samples, rated by the SIMULATED expert (demo).

:func:`rewards.simulated.write_demo_pool` rates procedural phantoms only, so reward
models trained on it never see images like the ones RL draws. :func:`write_generated_pool`
builds a pool in the same layout (``images/``, ``pool.jsonl``, ``ratings.csv``; usable by
``rewards.training.train_rewards`` unchanged) from three sources:

- ``generated``: samples of several fine-tuning checkpoints of a run
  (``checkpoints/step-*``) and of its final generator, at several guidance scales and
  seeds, rated from their **pixels**;
- ``reconstruction``: real images through the generator's VAE (the decoder's ceiling),
  rated from their pixels;
- ``real``: real phantoms as anchors, rated from their phantom records.

A share ``mismatch_fraction`` of the images is rated a second time with a prompt that
contradicts the one they were drawn for (or, for real images and reconstructions, the
image's own record), as in the phantom pool, so the alignment policy sees the same image
with matching and contradicting text. The ratings are the SIMULATED expert's, not a
clinician's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import runfiles
from generators.phantom import PhantomRecord
from runfiles import require_empty_folder, staged_folder

log = logging.getLogger(__name__)

#: Name of the final generator among the pool's checkpoints.
FINAL = "final"
SOURCES = ("real", "reconstruction", "generated")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The committed fine-tuning checkpoints of a run (``checkpoints/step-*``), oldest first."""
    return runfiles.list_checkpoints(Path(run_dir) / "checkpoints")


def load_checkpoint_generator(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None):
    """The run's generator as it was at a fine-tuning checkpoint (None: the final one).

    The run's ``generator/`` supplies the VAE, tokenizer and scheduler (the VAE is trained
    before the first checkpoint and never changes after); a full-UNet checkpoint
    (``unet.safetensors``) replaces the UNet weights; a LoRA one (``lora.safetensors``) is
    attached, with the checkpoint's ``finetune.lora`` section, to the base UNet (the final
    adapter ``adapter/``, merged into ``generator/``, is subtracted out first);
    ``text_encoder.safetensors`` replaces the text encoder when it was trained. The final
    generator is ``generator/`` itself.
    """
    import yaml
    from safetensors.torch import load_file

    from generators.config import LoraConfig
    from generators.finetune import load_run_generator, unmerged_adapter
    from generators.lora import attach_lora, set_adapter_state, subtract_adapter
    from generators.model import load_generator

    run_dir = Path(run_dir)
    if checkpoint is None:
        return load_run_generator(run_dir)
    gen = load_generator(run_dir / "generator")
    ckpt = Path(checkpoint)
    if (ckpt / "unet.safetensors").is_file():
        gen.unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
    elif (ckpt / "lora.safetensors").is_file():
        config = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
        spec = dict((config.get("finetune") or {}).get("lora") or config.get("lora") or {})
        if (run_dir / "adapter").is_dir() and unmerged_adapter(run_dir) is None:
            subtract_adapter(gen.pipe, run_dir / "adapter")
        if "target_modules" in spec:
            spec["target_modules"] = tuple(spec["target_modules"])
        attach_lora(gen.unet, LoraConfig(**spec))
        set_adapter_state(gen.unet, load_file(str(ckpt / "lora.safetensors")))
    else:
        raise FileNotFoundError(f"{ckpt}: no unet.safetensors or lora.safetensors")
    if (ckpt / "text_encoder.safetensors").is_file():
        # a loaded BertModel has an (unused) pooler the built one that was trained lacks
        result = gen.text_encoder.load_state_dict(
            load_file(str(ckpt / "text_encoder.safetensors")), strict=False
        )
        bad = [k for k in result.missing_keys if not k.startswith("pooler.")]
        bad += list(result.unexpected_keys)
        if bad:
            raise ValueError(f"{ckpt}: text encoder weights do not fit: {', '.join(bad[:5])}")
    return gen


def _records_by_path(root: Path) -> dict[str, PhantomRecord]:
    path = root / "phantom.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out[d["path"]] = PhantomRecord.from_dict(d)
    return out


def _as_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1.0)


def _checked_checkpoints(
    run_dir: Path, checkpoints: Sequence[str] | None
) -> tuple[dict[str, Path], list[str]]:
    """The run's checkpoints by name and the names to sample (default: all but the newest).

    Raises:
        FileNotFoundError: the run has no generator, or a named checkpoint is not there.
    """
    if not (run_dir / "generator" / "model_index.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'generator'}: no generator (run `medrl finetune`)")
    available = {p.name: p for p in list_checkpoints(run_dir)}
    if checkpoints is None:
        checkpoints = sorted(available)[:-1]
    unknown = [c for c in checkpoints if c not in available]
    if unknown:
        raise FileNotFoundError(
            f"{run_dir / 'checkpoints'}: no checkpoint(s) {', '.join(unknown)}; "
            f"there are: {', '.join(sorted(available)) or 'none'}"
        )
    return available, list(checkpoints)


@dataclass
class _Plan:
    """What a pool draws: the manifest, each row's phantom record (None where the data are
    not phantoms), each prompt's record, the (prompt, seed) pairs every variant draws, and
    the rows kept as real anchors and as reconstructions."""

    table: Any
    records: list[PhantomRecord | None]
    by_prompt: dict[str, PhantomRecord | None]
    jobs: list[tuple[str, int]]
    real_rows: np.ndarray
    recon_rows: np.ndarray


def _plan_pool(
    manifest: str | os.PathLike,
    rng: np.random.Generator,
    prompts: int,
    seeds_per_prompt: int,
    real: int,
    reconstructions: int,
) -> _Plan:
    """Read the manifest and draw the pool's prompts, seeds and real rows from ``rng``."""
    from generators.datasets import read_manifest

    table = read_manifest(manifest)
    by_path = _records_by_path(Path(table.attrs["medrl"]["root"]))
    records = [by_path.get(r) for r in table["relpath"]]
    by_prompt: dict[str, PhantomRecord | None] = {}
    for text, rec in zip(table["Text"], records, strict=True):
        if by_prompt.get(text) is None:
            by_prompt[text] = rec
    texts = list(by_prompt)
    chosen = [texts[i] for i in rng.permutation(len(texts))[:prompts]]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=seeds_per_prompt)]
    order = rng.permutation(len(table))
    return _Plan(
        table,
        records,
        by_prompt,
        jobs=[(p, s) for p in chosen for s in seeds],
        real_rows=order[: min(real, len(table))],
        recon_rows=order[::-1][: min(reconstructions, len(table))],
    )


def _sample_variants(
    run_dir: Path,
    variants: Sequence[tuple[str, Path | None]],
    plan: _Plan,
    tmp: Path,
    guidance_scales: Sequence[float],
    sampling: dict[str, Any],
    device: torch.device,
) -> tuple[list[dict[str, Any]], Any]:
    """Draw the plan's jobs from each variant (name, checkpoint; None: the final generator,
    which comes last) at each guidance scale into ``tmp/images``; the pool entries and the
    final generator. ``sampling``: ``num_steps``, ``eta``, ``batch_size``."""
    from generators.images import save_png, to_uint8
    from generators.sampling import sample

    jobs = plan.jobs
    entries: list[dict[str, Any]] = []
    final = None
    for name, ckpt in variants:
        gen = load_checkpoint_generator(run_dir, ckpt).to(device)
        gen.unet.eval()
        gen.text_encoder.eval()
        where = str(run_dir / "generator") if ckpt is None else str(ckpt)
        for g in guidance_scales if jobs else ():
            with torch.inference_mode():
                batch = sample(
                    gen,
                    [p for p, _ in jobs],
                    [s for _, s in jobs],
                    guidance_scale=float(g),
                    **sampling,
                )
            for i, ((prompt, s), img) in enumerate(zip(jobs, to_uint8(batch.images), strict=True)):
                rel = f"images/gen-{name}-g{float(g):g}-{i:04d}.png"
                save_png(img, tmp / rel)
                entries.append(
                    {
                        "path": rel,
                        "prompt": prompt,
                        "claims": plan.by_prompt[prompt],
                        "source": "generated",
                        "checkpoint": name,
                        "guidance_scale": float(g),
                        "seed": s,
                        "generator_ckpt": where,
                    }
                )
        if ckpt is None:
            final = gen
        del gen
    return entries, final


def _write_reconstructions(
    final: Any, plan: _Plan, tmp: Path, run_dir: Path, batch_size: int
) -> list[dict[str, Any]]:
    """The plan's reconstruction rows through the final generator's VAE into
    ``tmp/images``; their pool entries."""
    from generators.images import load_image, resize, save_png, to_uint8
    from generators.vae_training import vae_reconstruct

    table, rows = plan.table, plan.recon_rows
    if not len(rows):
        return []
    real_images = [load_image(table["path"].iloc[int(i)]) for i in rows]
    x = resize(_as_tensor(real_images), final.resolution)
    with torch.inference_mode():
        recon = to_uint8(vae_reconstruct(final, x, batch_size=batch_size))
    entries = []
    for k, (i, img) in enumerate(zip(rows, recon, strict=True)):
        rel = f"images/recon-{k:04d}.png"
        save_png(img, tmp / rel)
        entries.append(
            {
                "path": rel,
                "prompt": table["Text"].iloc[int(i)],
                "claims": plan.records[int(i)],
                "source": "reconstruction",
                "checkpoint": FINAL,
                "generator_ckpt": f"vae:{run_dir / 'generator'}",
                "of": table["relpath"].iloc[int(i)],
            }
        )
    return entries


def _write_real(plan: _Plan, size: int, tmp: Path) -> list[dict[str, Any]]:
    """The plan's real anchors (resized to ``size`` px) into ``tmp/images``; their pool
    entries, rated from their records."""
    from generators.images import load_image, resize, save_png, to_uint8

    table = plan.table
    entries = []
    for k, i in enumerate(plan.real_rows):
        image = load_image(table["path"].iloc[int(i)])
        if image.shape[0] != size or image.shape[1] != size:
            image = to_uint8(resize(_as_tensor([image]), size))[0]
        rel = f"images/real-{k:04d}.png"
        save_png(image, tmp / rel)
        rec = plan.records[int(i)]
        entries.append(
            {
                "path": rel,
                "prompt": table["Text"].iloc[int(i)],
                "claims": rec,
                "record": rec,
                "source": "real",
                "generator_ckpt": "real",
                "of": table["relpath"].iloc[int(i)],
            }
        )
    return entries


def _write_images(
    run_dir: Path,
    variants: Sequence[tuple[str, Path | None]],
    plan: _Plan,
    tmp: Path,
    guidance_scales: Sequence[float],
    sampling: dict[str, Any],
    device: torch.device,
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    """Every image of the pool into ``tmp/images``: samples, then reconstructions and real
    anchors (the seconds each part took into ``timings``); their pool entries."""
    t0 = time.perf_counter()
    entries, final = _sample_variants(
        run_dir, variants, plan, tmp, guidance_scales, sampling, device
    )
    timings["generated_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = final.resolution
    entries += _write_reconstructions(final, plan, tmp, run_dir, sampling["batch_size"])
    del final
    entries += _write_real(plan, size, tmp)
    timings["reconstruction_real_s"] = time.perf_counter() - t0
    return entries


def _pool_lines(
    entries: list[dict[str, Any]], rng: np.random.Generator, mismatch_fraction: float
) -> list[str]:
    """``pool.jsonl``'s lines: each entry with its own prompt and, for a share
    ``mismatch_fraction`` of those with claims, again with a contradicting one."""
    from rewards.simulated import mismatched_prompt

    lines = []
    for e in entries:
        claims, rec = e.pop("claims"), e.pop("record", None)
        shown = [(e["prompt"], "none")]
        if claims is not None and rng.random() < mismatch_fraction:
            shown.append(mismatched_prompt(claims, rng))
        for prompt, kind in shown:
            line = {**e, "prompt": prompt, "mismatch": kind}
            if rec is not None:
                line["record"] = rec.to_dict()
            lines.append(json.dumps(line))
    return lines


def _write_ratings(
    tmp: Path,
    entries: list[dict[str, Any]],
    rng: np.random.Generator,
    mismatch_fraction: float,
    raters: int,
    noise: float,
    seed: int,
    timings: dict[str, float],
) -> int:
    """Write ``pool.jsonl`` and the simulated experts' ``ratings.csv`` into ``tmp`` (the
    rating time into ``timings``); the number of rated (image, prompt) pairs."""
    from rewards.simulated import POOL_FILE, simulate_ratings

    lines = _pool_lines(entries, rng, mismatch_fraction)
    (tmp / POOL_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    # records only where given (the real anchors); everything else from its pixels
    simulate_ratings(tmp, tmp / "ratings.csv", raters=raters, noise=noise, seed=seed)
    timings["rating_s"] = time.perf_counter() - t0
    return len(lines)


def write_generated_pool(
    run_dir: str | os.PathLike,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoints: Sequence[str] | None = None,
    guidance_scales: Sequence[float] = (1.0, 5.0),
    prompts: int = 16,
    seeds_per_prompt: int = 2,
    reconstructions: int = 64,
    real: int = 96,
    mismatch_fraction: float = 0.5,
    num_steps: int = 10,
    eta: float = 1.0,
    batch_size: int = 8,
    raters: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """A rating pool of the run's own samples, VAE reconstructions and real anchors.

    Args:
        run_dir: the fine-tuned run (``generator/``, ``checkpoints/step-*``).
        manifest: the data manifest (prompts, real images; phantom records from the
            ``phantom.jsonl`` beside the data, where the data are phantoms).
        out: the pool folder (must not exist or be empty); written to a temporary
            sibling and renamed into place.
        checkpoints: fine-tuning checkpoint names to sample besides the final generator
            (default: all but the newest, which the final generator is).
        guidance_scales: every generator variant samples at each of them.
        prompts: distinct prompts drawn from the manifest; each gets
            ``seeds_per_prompt`` seeds, the same for every variant and guidance scale.
        reconstructions, real: how many real images go through the VAE, and how many
            are anchors as they are.
        mismatch_fraction: the share of images rated again with a contradicting prompt.
        raters, noise, seed: the simulated experts (as in ``simulate_ratings``).

    Images: ``prompts * seeds_per_prompt * len(guidance_scales) * (checkpoints + 1)``
    generated, plus ``reconstructions`` and ``real``. Returns the ratings CSV path.
    """
    from generators.model import resolve_device

    if not 0.0 <= mismatch_fraction <= 1.0 or prompts < 0 or seeds_per_prompt < 1:
        raise ValueError(
            f"write_generated_pool: bad parameters prompts={prompts} "
            f"seeds_per_prompt={seeds_per_prompt} mismatch_fraction={mismatch_fraction}"
        )
    run_dir = Path(run_dir)
    available, checkpoints = _checked_checkpoints(run_dir, checkpoints)
    out = require_empty_folder(out)
    rng = np.random.default_rng([seed, 4242])
    plan = _plan_pool(manifest, rng, prompts, seeds_per_prompt, real, reconstructions)
    variants = [*((name, available[name]) for name in checkpoints), (FINAL, None)]
    sampling = {"num_steps": num_steps, "eta": eta, "batch_size": batch_size}
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    with staged_folder(out) as tmp:
        entries = _write_images(
            run_dir, variants, plan, tmp, guidance_scales, sampling, dev, timings
        )
        pairs = _write_ratings(tmp, entries, rng, mismatch_fraction, raters, noise, seed, timings)
        counts = {s: sum(e["source"] == s for e in entries) for s in SOURCES}
        (tmp / "pool.json").write_text(
            json.dumps({"images": counts, "pairs": pairs, "timings": timings}, indent=1)
        )
    log.info(
        "generated rating pool %s: %s images, %d rated pairs (%s)",
        out,
        counts,
        pairs,
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )
    return out / "ratings.csv"
