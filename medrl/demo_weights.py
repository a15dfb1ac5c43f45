"""The demo's base generator: the recipe that makes the weights shipped in the repository.

    make demo-weights                       # = python -m medrl.demo_weights (~20 CPU min)
    python -m medrl.demo_weights --out /tmp/base demo.base_steps=1200   # a variant
    python -m medrl.demo_weights --out /tmp/base --keep-run   # keep /tmp/.base.run (4 checkpoints)

Users of Stable Diffusion start from a pretrained pipeline (VAE, UNet, text encoder) and
fine-tune it on their data; the demo does the same with ``generators/assets/demo-base``,
which ``configs/demo.yaml`` names as ``model.*.pretrained`` (its 20 CPU minutes cannot
hold the ~20 minutes of training a base from scratch). This recipe is the only way those
weights are made: it writes the procedural phantom dataset of the preset (``data.*``) if
it is not there and runs ``medrl finetune`` on it with the preset's models built from
their configs (never the shipped weights): the VAE for ``finetune.vae_steps``, then the
UNet and the text encoder for ``demo.base_steps`` at ``demo.base_lr``, seed ``run.seed``.
It measures the VAE on the held-out phantoms as ``benchmarks/vae_ceiling.py`` does and
writes the diffusers pipeline folder with ``card.json``: the command, the config, seed,
steps, time, the measured quality and the sha256 of every weight file. The training run
lives beside the destination (an interrupted recipe resumes) and the folder is renamed
into place when complete (nothing half-written).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrl.config import RunConfig, load_config, to_dict
from runfiles import staged_folder

log = logging.getLogger(__name__)

CARD = "card.json"
DEFAULT_OUT = Path("generators") / "assets" / "demo-base"


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def measure_reconstructions(gen: Any, x: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
    """The SIMULATED expert's view of a VAE: originals ``x`` against their reconstructions.

    ``fair_kept``: of the originals rated fair-or-better (quality >= 2, from the pixels),
    the share whose reconstruction is still fair-or-better; ``sharpness_*``: the expert's
    sharpness measure (below ``poor_line`` every image is "poor"); ``psnr`` in dB.
    """
    from generators.images import to_uint8
    from generators.vae_training import reconstruction_psnr, vae_reconstruct
    from rewards.simulated import MEASURE_LEVELS, SimulatedExpert, measure_at_analysis_size

    recon = vae_reconstruct(gen, x)
    expert = SimulatedExpert()

    def sharpness(images: torch.Tensor) -> np.ndarray:
        return np.array([measure_at_analysis_size(im)["sharpness"] for im in to_uint8(images)])

    def quality(images: torch.Tensor) -> np.ndarray:
        return np.array(
            [expert.rate(p, image=im)[0] for p, im in zip(prompts, to_uint8(images), strict=True)]
        )

    s_real, s_recon = sharpness(x), sharpness(recon)
    q_real, q_recon = quality(x), quality(recon)
    fair = q_real >= 2
    return {
        "n": len(x),
        "psnr": round(float(reconstruction_psnr(gen, x)), 2),
        "sharpness_real": float(s_real.mean()),
        "sharpness_recon": float(s_recon.mean()),
        "sharpness_recon_median": float(np.median(s_recon)),
        "sharpness_recon_max": float(s_recon.max()),
        "poor_line": MEASURE_LEVELS["sharpness"][1],
        "fair_real": int(fair.sum()),
        "fair_recon": int((q_recon >= 2).sum()),
        "fair_kept": float((q_recon[fair] >= 2).mean()) if fair.any() else None,
        "reconstructions": recon,
    }


def _dataset(cfg: RunConfig) -> Path:
    from generators.datasets import ingest_csv
    from generators.phantom_dataset import write_demo_dataset

    d = cfg.data
    if not Path(d.csv_path).is_file():
        write_demo_dataset(d.root, count=d.demo_count, size=d.demo_size, seed=d.demo_seed,
                           val_fraction=d.val_fraction)  # fmt: skip
    if not Path(d.manifest_path).is_file():
        ingest_csv(d.csv_path, root=d.root, out=d.manifest_path)
    return Path(d.manifest_path)


def from_scratch(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every part of the generator built from its config (no ``pretrained``)."""
    m = cfg.model
    model = dataclasses.replace(
        m,
        unet=dataclasses.replace(m.unet, pretrained=None, subfolder=None),
        vae=dataclasses.replace(m.vae, pretrained=None, subfolder=None),
        text_encoder=dataclasses.replace(
            m.text_encoder,
            pretrained=None,
            subfolder=None,
            tokenizer=None,
            tokenizer_subfolder=None,
        ),  # fmt: skip
        scheduler=dataclasses.replace(m.scheduler, pretrained=None, subfolder=None),
    )
    return dataclasses.replace(cfg, model=model)


def make_demo_base(
    cfg: RunConfig, out: str | os.PathLike, command: str = "", keep_run: bool = False
) -> dict[str, Any]:
    """Train the preset's generator from scratch on its phantom dataset; write it with its card.

    ``keep_run``: keep the training run (``.<out>.run`` beside ``out``, with a checkpoint at
    every quarter of ``demo.base_steps``) for ``benchmarks/eye_probe.py checkpoints``.
    Returns the card.
    """
    from generators.finetune import finetune
    from generators.images import make_grid, save_png, to_uint8
    from generators.model import load_generator
    from generators.training_common import ImageTextData

    cfg = from_scratch(cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = _dataset(cfg)
    ft = dataclasses.replace(
        cfg.finetune, steps=cfg.demo.base_steps, lr=cfg.demo.base_lr, sample_every=0,
        checkpoint_every=max(1, cfg.demo.base_steps // 4),
        keep_checkpoints=5 if keep_run else cfg.finetune.keep_checkpoints,
    )  # fmt: skip
    run_dir = out.parent / f".{out.name}.run"  # kept until the weights are in place: resumable
    t0 = time.perf_counter()
    result = finetune(run_dir, cfg.model, cfg.data, ft, cfg.sampling,
                      seed=cfg.run.seed, device="cpu")  # fmt: skip
    seconds = time.perf_counter() - t0
    gen = load_generator(result.generator_dir)
    val = ImageTextData.from_manifest(manifest, cfg.model.resolution, split="val")
    x, prompts = val.batch(torch.arange(len(val)))
    measured = measure_reconstructions(gen, x, prompts)
    recon = measured.pop("reconstructions")

    with staged_folder(out) as tmp:  # the previous weights stay until the new ones are in place
        shutil.copytree(result.generator_dir, tmp, dirs_exist_ok=True)
        k = min(len(x), 8)
        save_png(make_grid(list(to_uint8(x[:k])) + list(to_uint8(recon[:k])), ncols=k),
                 tmp / "vae-heldout-originals-over-reconstructions.png")  # fmt: skip
        tree = to_dict(cfg)
        weights = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*.safetensors"))
        card = {
            "what": "the medrl demo's base generator (a diffusers pipeline folder: VAE, UNet, "
            "text encoder, tokenizer), trained from scratch on the procedural fundus phantom; "
            "not a model of real fundus photographs",
            "command": command or "python -m medrl.demo_weights",
            "seed": cfg.run.seed,
            "vae_steps": ft.vae_steps,
            "steps": ft.steps,
            "lr": ft.lr,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "scaling_factor": float(gen.vae.config.scaling_factor),
            "final_loss": result.final_loss,
            "data": {k: v for k, v in tree["data"].items() if k.startswith("demo_")}
            | {"val_fraction": cfg.data.val_fraction},
            "model": tree["model"],
            "finetune": {k: v for k, v in tree["finetune"].items() if k.startswith("vae_")}
            | {
                "mode": ft.mode,
                "batch_size": ft.batch_size,
                "train_text_encoder": ft.train_text_encoder,
            },  # fmt: skip
            "vae_heldout": measured,
            "sha256": {name: sha256(tmp / name) for name in weights},
            "torch": torch.__version__,
        }
        (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
        os.chmod(tmp, 0o755)
    if not keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return card


def check_card(folder: str | os.PathLike) -> dict[str, Any]:
    """The card of a shipped base folder, after checking its weights' sha256 against it."""
    folder = Path(folder)
    card_path = folder / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path}: no card (make the weights with `make demo-weights`)")
    card = json.loads(card_path.read_text())
    for name, expected in card["sha256"].items():
        got = sha256(folder / name)
        if got != expected:
            raise ValueError(f"{folder / name}: sha256 {got} differs from its card's {expected}")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides (demo.base_*, finetune.vae_*, data.*)"
    )
    parser.add_argument(
        "--keep-run",
        action="store_true",
        help="keep the training run and its quarterly checkpoints beside --out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(args.config, args.overrides)
    command = " ".join(
        ["python -m medrl.demo_weights", *(argv if argv is not None else sys.argv[1:])]
    )
    card = make_demo_base(cfg, args.out, command=command, keep_run=args.keep_run)
    h = card["vae_heldout"]
    print(
        f"{args.out}: VAE {card['vae_steps']} + UNet {card['steps']} steps in "
        f"{card['seconds']:.0f} s (final loss {card['final_loss']:.4f}); VAE on {h['n']} "
        f"held-out phantoms: PSNR {h['psnr']:.1f} dB, sharpness {h['sharpness_recon']:.4f} "
        f"(originals {h['sharpness_real']:.4f}, 'poor' line {h['poor_line']}), fair-or-better "
        f"kept {h['fair_kept']:.0%} of {h['fair_real']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
