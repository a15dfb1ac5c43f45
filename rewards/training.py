"""Training the selector and the alignment policy from expert ratings.

Two objectives, chosen by ``RewardsConfig.objective``:

**REINFORCE with a learned value baseline** (what the IIT Kanpur report describes,
done correctly). For an image x (and prompt) with normalised expert rating y in [0, 1]
the model is a policy pi(s | x) = Beta(alpha(x), beta(x)) over a score s:

    s_k ~ pi(. | x),  k = 1..K                    (K = num_samples, no gradient)
    r_k = 1 - |s_k - y|        (reward "absolute"; "squared": 1 - (s_k - y)^2)
    A_k = r_k - V(x)           V: the model's own value head, a separate MLP
    loss = -mean_k[A_k.detach() * log pi(s_k | x)]         policy gradient
           - entropy_coef * H[pi(. | x)]                    exploration bonus
           + value_coef * mean_k[(V(x) - r_k)^2]            value regression

The advantage is signed (never an absolute value), the baseline is learned by
regression on the observed rewards (never the policy's own detached output), and since
V does not depend on s, subtracting it leaves the gradient unbiased while lowering its
variance (tests/rewards/test_training.py measures both). Both rewards are maximised in
expectation by a policy concentrated at y, so the score (the policy mean) learns y.

**Regression** (the supervised baseline): the mean score m(x) = alpha / (alpha + beta)
regressed on y with MSE (or BCE with y as a soft target).

Schedule (IIT Kanpur's two stages): the selector trains on all rated images; the
alignment policy trains on all rated (image, prompt) pairs (stage 1), then only on
those whose selector score passes the threshold (stage 2). The report compares both
objectives on held-out ratings (split by image): Spearman and Pearson correlation,
mean absolute error, and the accuracy of the pass/fail decision at the threshold.

This module is the entry point (:func:`train_rewards`); the losses are in
:mod:`rewards.objectives`, the ratings as data in :mod:`rewards.rating_data`, the models'
training and held-out sets in :mod:`rewards.training_data`, fitting one model in
:mod:`rewards.training_fit`, the held-out metrics and the report's table in
:mod:`rewards.training_report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from generators.model import resolve_device
from rewards.config import RewardsConfig
from rewards.contrastive import load_manifest_pairs, pretrain_towers
from rewards.models import WEIGHTS_FILE, AlignmentPolicy, QualitySelector, RewardModel
from rewards.ood import fit_ood_guard, selector_features
from rewards.rating_data import holdout_split, rating_targets
from rewards.ratings import read_ratings
from rewards.training_data import RatedSets, rated_sets
from rewards.training_fit import Batchable, fit
from rewards.training_report import (
    agreement_by_source,
    agreement_metrics,
    eye_swap_detection,
    predict,
)
from runfiles import atomic_path, atomic_write_text
from runfiles.config import to_dict

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


# --------------------------------------------------------------------------- entry point


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _start_from(model: RewardModel, previous: Path, device: torch.device) -> None:
    """Copy the weights of a previous training's ``previous`` (selector/ or alignment/)
    into ``model`` (``rewards.init_from``); a different kind or architecture is an error
    that names the file."""
    try:
        prev = RewardModel.from_pretrained(previous, device)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"rewards.init_from: {exc}") from exc
    if prev.kind != model.kind:
        raise ValueError(f"rewards.init_from: {previous} holds a {prev.kind}, not a {model.kind}")
    try:
        model.load_state_dict(prev.state_dict())
    except RuntimeError as exc:  # other shapes or names: another architecture
        raise ValueError(
            f"rewards.init_from: {previous / WEIGHTS_FILE} does not fit the {model.kind} that "
            f"rewards.* builds now: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    log.info("%s starts from %s", model.kind, previous)


def _held_out(
    pred: np.ndarray, data: Batchable, sources: Sequence[str] | None, threshold: float
) -> dict[str, Any]:
    """:func:`agreement_metrics` of ``pred`` on ``data``, split ``by_source`` when given."""
    metrics = agreement_metrics(pred, data.target.numpy(), threshold)
    if sources is not None:
        metrics["by_source"] = agreement_by_source(pred, data.target.numpy(), sources, threshold)
    return metrics


def _train_selector(
    objective: str,
    cfg: RewardsConfig,
    train: Batchable,
    test: Batchable,
    device: torch.device,
    sources: Sequence[str] | None,
) -> tuple[QualitySelector, dict[str, Any]]:
    """The selector trained with ``objective``, and its held-out agreement and statistics."""
    t0 = time.perf_counter()
    _seed_all(cfg.seed)
    selector = QualitySelector.from_config(cfg).to(device)
    if cfg.init_from:
        _start_from(selector, Path(cfg.init_from) / "selector", device)
    sel_fit = fit(
        selector, train, cfg, objective, cfg.epochs, device=device,
        desc=f"selector ({objective})", seed=cfg.seed,
    )  # fmt: skip
    metrics = _held_out(predict(selector, test, device), test, sources, cfg.threshold)
    log.info("selector (%s): held-out Spearman %s", objective, metrics["spearman"])
    return selector, {**metrics, "train": sel_fit, "seconds": round(time.perf_counter() - t0, 1)}


def _start_alignment(
    policy: AlignmentPolicy,
    cfg: RewardsConfig,
    pretrain_pairs: tuple[torch.Tensor, list[str]] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Start ``policy`` from ``rewards.init_from`` or contrastive pre-training (if either)."""
    if cfg.init_from:  # the towers come trained (and pre-trained, if they were) with it
        _start_from(policy, Path(cfg.init_from) / "alignment", device)
        return {"epochs": 0, "init_from": cfg.init_from}
    if pretrain_pairs is not None and cfg.pretrain_epochs > 0:
        return _pretrain_alignment(policy, pretrain_pairs, cfg, device)
    return {"epochs": 0}


def _train_alignment(
    objective: str,
    ali_objective: str,
    cfg: RewardsConfig,
    selector: QualitySelector,
    train: Batchable,
    test: Batchable,
    device: torch.device,
    pretrain_pairs: tuple[torch.Tensor, list[str]] | None,
    test_prompts: Sequence[str],
    sources: Sequence[str] | None,
) -> tuple[AlignmentPolicy, dict[str, Any]]:
    """The alignment policy (pre-training, stages 1, 2), its held-out agreement and statistics."""
    t1 = time.perf_counter()
    _seed_all(cfg.seed + 1)
    policy = AlignmentPolicy.from_config(cfg).to(device)
    pretrain = _start_alignment(policy, cfg, pretrain_pairs, device)
    tower_lr = cfg.tower_lr_scale if pretrain["epochs"] or cfg.init_from else 1.0
    stage1 = fit(
        policy, train, cfg, ali_objective, cfg.stage1_epochs, device=device,
        desc=f"alignment stage 1 ({ali_objective})", seed=cfg.seed + 1,
        tower_lr_scale=tower_lr,
    )  # fmt: skip
    passed = np.flatnonzero(predict(selector, train.images_only(), device) >= cfg.threshold)
    log.info(
        "alignment stage 2 (%s): %d of %d training pairs pass the selector (score >= %.2f)",
        objective, len(passed), len(train), cfg.threshold,
    )  # fmt: skip
    stage2 = fit(
        policy, train.subset(passed), cfg, ali_objective, cfg.stage2_epochs, device=device,
        desc=f"alignment stage 2 ({ali_objective})", seed=cfg.seed + 2,
        tower_lr_scale=tower_lr,
    )  # fmt: skip
    ali_pred = predict(policy, test, device)
    metrics = _held_out(ali_pred, test, sources, cfg.threshold)
    test_passed = predict(selector, test.images_only(), device) >= cfg.threshold
    metrics_passed = agreement_metrics(
        ali_pred[test_passed], test.target.numpy()[test_passed], cfg.threshold
    )
    t2 = time.perf_counter()
    return policy, {
        **metrics,
        "objective": ali_objective,
        "fusion": policy.fusion_kind,
        "eye_swap": eye_swap_detection(policy, test, test_prompts, device),
        "pretrain": pretrain,
        "passed_selector": metrics_passed,
        "stage1": stage1,
        "stage2": {**stage2, "passed": int(len(passed)), "of": len(train)},
        "seconds": round(t2 - t1, 1),
    }


def _train_one_objective(
    objective: str,
    cfg: RewardsConfig,
    sel_train: Batchable,
    sel_test: Batchable,
    ali_train: Batchable,
    ali_test: Batchable,
    device: torch.device,
    *,
    alignment_objective: str | None = None,
    pretrain_pairs: tuple[torch.Tensor, list[str]] | None = None,
    test_prompts: Sequence[str] = (),
    sources: dict[str, Sequence[str]] | None = None,
) -> tuple[dict[str, Any], QualitySelector, AlignmentPolicy]:
    """One objective: the selector, then the alignment policy (pre-training, stages 1, 2).

    ``alignment_objective`` (default ``objective``) trains the alignment policy;
    ``pretrain_pairs`` (uint8 images, prompts) are its contrastive pre-training pairs;
    ``test_prompts`` (those of ``ali_test``) give the eye-swap check of the report;
    ``sources`` (``selector``: one per ``sel_test`` image, ``alignment``: one per
    ``ali_test`` pair) split the held-out agreement by where the images came from.
    """
    sel_sources = ali_sources = None
    if sources is not None:
        sel_sources, ali_sources = sources["selector"], sources["alignment"]
    selector, sel_result = _train_selector(objective, cfg, sel_train, sel_test, device, sel_sources)
    policy, ali_result = _train_alignment(
        objective, alignment_objective or objective, cfg, selector, ali_train, ali_test, device,
        pretrain_pairs, test_prompts, ali_sources,
    )  # fmt: skip
    return {"selector": sel_result, "alignment": ali_result}, selector, policy


# rewards.* keys that do not shape the contrastively pre-trained towers (the cache key
# leaves them out; a key missing here only makes the cache miss more often)
_NOT_PRETRAIN = frozenset(
    {
        "ratings_db", "objective", "alignment_objective", "compare_objectives", "reward",
        "regression_loss", "lr", "epochs", "stage1_epochs", "stage2_epochs", "batch_size",
        "num_samples", "entropy_coef", "value_coef", "grad_clip", "threshold",
        "quality_weight", "alignment_weight", "holdout_fraction", "ood_weight",
        "ood_quantile", "tower_lr_scale", "pretrain_cache", "init_from", "service_replicas",
        "service_num_gpus", "service_batch_size", "score_timeout_s",
        "service_start_timeout_s",
    }
)  # fmt: skip


def pretrain_key(cfg: RewardsConfig, pairs: tuple[torch.Tensor, list[str]]) -> str:
    """Hash of the pre-training pairs (pixels, prompts) and the settings that shape them."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_PRETRAIN}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(list(pairs[1])).encode())
    h.update(pairs[0].contiguous().numpy().tobytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:32]


def _pretrain_alignment(
    policy: AlignmentPolicy,
    pairs: tuple[torch.Tensor, list[str]],
    cfg: RewardsConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Contrastive pre-training of ``policy``'s towers, or its result from
    ``rewards.pretrain_cache`` when the same pairs and settings were pre-trained before."""
    path = None
    if cfg.pretrain_cache:
        path = Path(cfg.pretrain_cache) / f"alignment-{pretrain_key(cfg, pairs)}.safetensors"
    if path is not None and path.is_file():
        load_model(policy, path, strict=True, device=str(device))
        with safe_open(path, "pt") as fh:
            stats_ = json.loads((fh.metadata() or {}).get("pretrain", "{}"))
        stats_["cached"] = str(path)
        log.info("contrastive pre-training: loaded from %s", path)
    else:
        stats_ = pretrain_towers(policy, *pairs, cfg, device=device, seed=cfg.seed + 1)
        if path is not None:
            with atomic_path(path) as tmp:
                save_model(policy, tmp, metadata={"pretrain": json.dumps(stats_)})
        log.info("contrastive pre-training: %s", stats_)
    stats_["manifest"] = cfg.pretrain_manifest
    # stage 1 starts from the same random state whether the towers were trained or loaded
    _seed_all(cfg.seed + 2)
    return stats_


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _rated_sets(ratings: Path, root: Path, cfg: RewardsConfig) -> RatedSets:
    """The ratings read, turned into targets, split by image and loaded as the models' sets."""
    frame = read_ratings(ratings)
    items = rating_targets(frame)
    train_idx, test_idx = holdout_split(
        items["image_path"].tolist(), cfg.holdout_fraction, cfg.seed
    )
    if len(train_idx) == 0:
        raise ValueError(f"{ratings}: no ratings left to train on after the hold-out split")
    log.info(
        "%d ratings of %d (image, prompt) pairs by %d rater(s): %d train, %d held out",
        len(frame), len(items), frame["rater_id"].nunique(), len(train_idx), len(test_idx),
    )  # fmt: skip
    return rated_sets(frame, items, train_idx, test_idx, root, cfg)


def _pretrain_pairs(cfg: RewardsConfig, size: int) -> tuple[torch.Tensor, list[str]] | None:
    """The manifest's training-split pairs for contrastive pre-training, if it is on."""
    if not (cfg.pretrain_manifest and cfg.pretrain_epochs > 0):
        return None
    # the training split only: the held-out images stay unseen by every model
    pairs = load_manifest_pairs(cfg.pretrain_manifest, size, split="train")
    log.info(
        "contrastive pre-training of the alignment towers on %d pairs of %s",
        len(pairs[1]), cfg.pretrain_manifest,
    )  # fmt: skip
    return pairs


def _save_models(
    where: Path,
    selector: QualitySelector,
    policy: AlignmentPolicy,
    result: dict[str, Any],
    objective: str,
    cfg: RewardsConfig,
    ratings: Path,
) -> dict[str, str]:
    """Save one objective's models under ``where``; returns their folders."""
    common = {
        "objective": objective,
        "threshold": cfg.threshold,
        "reward_weights": {"quality": cfg.quality_weight, "alignment": cfg.alignment_weight},
        "rewards_config": to_dict(cfg),
        "ratings": str(ratings),
    }
    selector.save_pretrained(where / "selector", training=result["selector"], **common)
    policy.save_pretrained(where / "alignment", training=result["alignment"], **common)
    return {"selector": str(where / "selector"), "alignment": str(where / "alignment")}


def _report(
    cfg: RewardsConfig,
    data: RatedSets,
    ali_objective: str,
    pretrain_pairs: tuple[torch.Tensor, list[str]] | None,
    ood: dict[str, Any],
    results: dict[str, Any],
    checkpoints: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """The report of a training (without its ``seconds``)."""
    frame, items = data.frame, data.items
    report: dict[str, Any] = {
        "objective": cfg.objective,
        "alignment_objective": ali_objective,
        "fusion": cfg.fusion,
        "pretrain": {
            "manifest": cfg.pretrain_manifest or None,
            "epochs": cfg.pretrain_epochs if pretrain_pairs is not None else 0,
            "pairs": 0 if pretrain_pairs is None else len(pretrain_pairs[1]),
        },
        "ratings": int(len(frame)),
        "raters": sorted(frame["rater_id"].unique().tolist()),
        "pairs": int(len(items)),
        "images": int(len(data.selector)),
        "train_pairs": int(len(data.train_idx)),
        "heldout_pairs": int(len(data.test_idx)),
        "train_images": int(len(data.sel_train)),
        "heldout_images": int(len(data.sel_test)),
        "alignment_target_from_faithfulness": int((items["from_faithfulness"] > 0).sum()),
        "threshold": cfg.threshold,
        "sources": {
            k: int(v) for k, v in pd.Series(data.item_source).value_counts().sort_index().items()
        },
        "ood_guard": ood,
        "results": results,
        "checkpoints": checkpoints,
    }
    if "reinforce" in results and "regression" in results:
        report["reinforce_over_regression"] = {
            model: _ratio(
                results["reinforce"][model]["spearman"], results["regression"][model]["spearman"]
            )
            for model in ("selector", "alignment")
        }
    return report


def train_rewards(
    ratings: str | os.PathLike,
    images_root: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    cfg: RewardsConfig,
    *,
    device: str = "auto",
) -> dict[str, Any]:
    """Train the selector and the alignment policy from ratings; report on held-out ratings.

    Args:
        ratings: the SQLite store, a ratings CSV or an exported Parquet.
        images_root: folder the ratings' image paths are relative to (None or "": the
            folder holding ``ratings``).
        out_dir: gets ``selector/`` and ``alignment/`` (the ``cfg.objective`` models),
            ``compare-<other objective>/`` when ``cfg.compare_objectives``, and
            ``report.json``.
        cfg: the rewards config.
        device: torch device (``auto``: CUDA when available).

    Returns:
        The report (also in ``out_dir/report.json``).
    """
    started = time.perf_counter()
    ratings_path = Path(ratings)
    root = Path(images_root) if images_root else ratings_path.parent
    dev = resolve_device(device)
    data = _rated_sets(ratings_path, root, cfg)
    pretrain_pairs = _pretrain_pairs(cfg, data.image_size)
    ali_objective = cfg.objective if cfg.alignment_objective == "same" else cfg.alignment_objective

    objectives = [cfg.objective]
    if cfg.compare_objectives:
        objectives.append("regression" if cfg.objective == "reinforce" else "reinforce")
    out = Path(out_dir)
    results: dict[str, Any] = {}
    checkpoints: dict[str, dict[str, str]] = {}
    for objective in objectives:
        result, selector, policy = _train_one_objective(
            objective, cfg, data.sel_train, data.sel_test, data.ali_train, data.ali_test, dev,
            alignment_objective=ali_objective if objective == cfg.objective else None,
            pretrain_pairs=pretrain_pairs, test_prompts=data.test_prompts, sources=data.sources,
        )  # fmt: skip
        results[objective] = result
        where = out if objective == cfg.objective else out / f"compare-{objective}"
        checkpoints[objective] = _save_models(
            where, selector, policy, result, objective, cfg, ratings_path
        )
        if objective == cfg.objective:  # the guard of the reward the RL will use
            guard = fit_ood_guard(
                selector_features(selector, data.selector.images), cfg.ood_quantile
            )
            guard.save(out)
            ood = {"pool_size": guard.pool_size, "quantile": guard.quantile, "edge": guard.edge}

    report = _report(cfg, data, ali_objective, pretrain_pairs, ood, results, checkpoints)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _write_json_atomic(out / REPORT_FILE, report)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b
