"""How well the reward models agree with held-out expert ratings: predictions, the
agreement metrics (Spearman, Pearson, MAE, pass/fail accuracy), the eye-swap detection
probe, and the report's table as text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from rewards.contrastive import swap_eye
from rewards.models import AlignmentPolicy, RewardModel
from rewards.rating_data import pixels_on
from rewards.training_fit import Batchable

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(
    model: RewardModel, data: Batchable, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Scores (the policy means) for every item, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        out.append(model(**data.inputs(idx, device)).mean.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def agreement_metrics(pred: np.ndarray, target: np.ndarray, threshold: float) -> dict[str, Any]:
    """Spearman, Pearson, MAE and pass/fail accuracy (score >= threshold vs rating >= threshold)."""
    pred, target = np.asarray(pred, float), np.asarray(target, float)

    def corr(fn: Callable) -> float | None:
        if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(target) == 0:
            return None
        value = float(fn(pred, target)[0])
        return value if math.isfinite(value) else None

    return {
        "n": int(len(pred)),
        "spearman": corr(stats.spearmanr),
        "pearson": corr(stats.pearsonr),
        "mae": float(np.abs(pred - target).mean()) if len(pred) else None,
        "pass_accuracy": float(((pred >= threshold) == (target >= threshold)).mean())
        if len(pred)
        else None,
    }


@torch.no_grad()
def eye_swap_detection(
    policy: AlignmentPolicy,
    data: Batchable,
    prompts: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, Any]:
    """How the policy scores held-out images with their prompt's eye swapped.

    Over the pairs of ``data`` rated fully faithful (target 1) whose prompt names an eye:
    ``lower`` is the share where the swapped prompt scores below the true one,
    ``below_half`` where it scores below 0.5, ``detected`` where either holds.
    """
    keep = [
        i
        for i, p in enumerate(prompts)
        if i < len(data) and float(data.target[i]) >= 1.0 - 1e-6 and swap_eye(p) is not None
    ]
    if not keep:
        return {"n": 0, "lower": None, "below_half": None, "detected": None}
    policy.eval()
    true_s, swap_s = [], []
    for start in range(0, len(keep), batch_size):
        idx = keep[start : start + batch_size]
        pixels = pixels_on(data.images[torch.as_tensor(idx)], device)
        true_s.append(policy(pixels, **policy.tokenize([prompts[i] for i in idx])).mean.cpu())
        swapped = [swap_eye(prompts[i]) for i in idx]
        swap_s.append(policy(pixels, **policy.tokenize(swapped)).mean.cpu())
    true, swap = torch.cat(true_s).numpy(), torch.cat(swap_s).numpy()
    lower, below = swap < true, swap < 0.5
    return {
        "n": len(keep),
        "lower": float(lower.mean()),
        "below_half": float(below.mean()),
        "detected": float((lower | below).mean()),
        "mean_true": float(true.mean()),
        "mean_swapped": float(swap.mean()),
    }


def format_report(report: dict[str, Any]) -> str:
    """The held-out table of a :func:`train_rewards` report, as text."""

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"{report['ratings']} ratings, {report['pairs']} (image, prompt) pairs, "
        f"{report['images']} images; held out: {report['heldout_images']} images / "
        f"{report['heldout_pairs']} pairs; threshold {report['threshold']}",
        f"{'objective':<11} {'model':<10} {'spearman':>8} {'pearson':>8} {'MAE':>6} {'pass acc':>8} {'s':>6}",
    ]
    for objective, result in report["results"].items():
        for model in ("selector", "alignment"):
            m = result[model]
            lines.append(
                f"{objective:<11} {model:<10} {num(m['spearman']):>8} {num(m['pearson']):>8} "
                f"{num(m['mae']):>6} {num(m['pass_accuracy']):>8} {m['seconds']:>6}"
            )
    for objective, result in report["results"].items():
        ali = result["alignment"]
        pre = ali.get("pretrain") or {}
        if pre.get("epochs"):
            last = pre.get("last_epoch", {})
            lines.append(
                f"{objective}: alignment towers pre-trained contrastively on {pre['pairs']} "
                f"pairs of {pre.get('manifest')} for {pre['epochs']} epochs "
                f"({pre.get('seconds')} s; last epoch loss {num(last.get('loss'))}, "
                f"eye accuracy {num(last.get('eye_accuracy'))})"
                + (f"; loaded from {pre['cached']}" if pre.get("cached") else "")
            )
        if pre.get("init_from"):
            lines.append(
                f"{objective}: selector and alignment policy continued from {pre['init_from']} "
                f"(rewards.init_from; selector {result['selector']['train'].get('epochs')}, "
                f"alignment {ali['stage1'].get('epochs')} + {ali['stage2'].get('epochs')} epochs)"
            )
        swap = ali.get("eye_swap") or {}
        if swap.get("n"):
            lines.append(
                f"{objective}: alignment ({ali.get('fusion')} fusion, {ali.get('objective')}) "
                f"scores the eye-swapped prompt lower on {num(swap['lower'])} and below 0.5 on "
                f"{num(swap['below_half'])} of {swap['n']} held-out faithful pairs "
                f"(detected {num(swap['detected'])})"
            )
    main = report["results"].get(report["objective"], {})
    for model in ("selector", "alignment"):
        by_source = (main.get(model) or {}).get("by_source") or {}
        if len(by_source) > 1:  # one source: the table above already says it
            lines.append(
                f"{report['objective']}: {model} held-out Spearman by image source: "
                + ", ".join(
                    f"{src} {num(m['spearman'], '.2f')} (n={m['n']})"
                    for src, m in by_source.items()
                )
            )
    guard = report.get("ood_guard")
    if guard:
        lines.append(
            f"OOD guard: fitted on the selector features of {guard['pool_size']} rated images, "
            f"edge {guard['edge']:.2f} (the pool's {guard['quantile']:g} quantile distance)"
        )
    ratio = report.get("reinforce_over_regression")
    if ratio:
        lines.append(
            "REINFORCE / regression Spearman: "
            + ", ".join(f"{k} {num(v, '.2f')}" for k, v in ratio.items())
        )
    return "\n".join(lines)


def agreement_by_source(
    pred: np.ndarray, target: np.ndarray, sources: Sequence[str], threshold: float
) -> dict[str, dict[str, Any]]:
    """:func:`agreement_metrics` of each image source apart (where it has held-out items)."""
    sources = np.asarray(sources)
    return {
        src: agreement_metrics(pred[sources == src], target[sources == src], threshold)
        for src in sorted(set(sources.tolist()))
    }
