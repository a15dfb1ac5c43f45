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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from scipy import stats
from tqdm.auto import tqdm

from generators.images import ImageDecodeError, load_image, resize, to_tensor
from generators.model import build_tokenizer, resolve_device
from rewards.config import RewardsConfig
from rewards.contrastive import load_manifest_pairs, pretrain_towers, swap_eye
from rewards.models import WEIGHTS_FILE, AlignmentPolicy, QualitySelector, RewardModel
from rewards.ood import fit_ood_guard, selector_features
from rewards.ratings import latest_per_rater, read_ratings
from rewards.sheet import ASPECT_MAX
from rewards.towers import PolicyOutput, vision_input_size
from runfiles import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Sampled scores are kept this far from 0 and 1 (the Beta log-density is finite there).
SCORE_EPS = 1e-6
REPORT_FILE = "report.json"


# --------------------------------------------------------------------------- losses


def agreement_reward(
    score: torch.Tensor, target: torch.Tensor, kind: str = "absolute"
) -> torch.Tensor:
    """Reward of sampled scores against the rating: 1 - |s - y| or 1 - (s - y)^2, in [0, 1]."""
    if kind == "absolute":
        return 1.0 - (score - target).abs()
    if kind == "squared":
        return 1.0 - (score - target) ** 2
    raise ValueError(f"unknown reward {kind!r}; allowed: 'absolute', 'squared'")


def policy_gradient_loss(
    dist: torch.distributions.Distribution, sample: torch.Tensor, advantage: torch.Tensor
) -> torch.Tensor:
    """REINFORCE surrogate -mean(A.detach() * log pi(s)): its gradient is the estimator."""
    return -(advantage.detach() * dist.log_prob(sample)).mean()


def reinforce_loss(
    out: PolicyOutput,
    target: torch.Tensor,
    *,
    num_samples: int = 4,
    entropy_coef: float = 1e-3,
    value_coef: float = 0.5,
    reward: str = "absolute",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy gradient with the learned value baseline, entropy bonus and value loss.

    ``out`` holds (B,) alpha, beta and value; ``target`` (B,) ratings in [0, 1].
    Returns the loss and its parts (floats) for logging.
    """
    dist = out.distribution()
    with torch.no_grad():
        sample = dist.sample((num_samples,)).clamp(SCORE_EPS, 1.0 - SCORE_EPS)  # (K, B)
        r = agreement_reward(sample, target.expand_as(sample), reward)
    value = out.value.unsqueeze(0).expand_as(r)  # V(x) does not depend on the sample
    advantage = r - value.detach()
    pg = policy_gradient_loss(dist, sample, advantage)
    entropy = dist.entropy().mean()
    value_loss = F.mse_loss(value, r)
    loss = pg - entropy_coef * entropy + value_coef * value_loss
    return loss, {
        "loss": float(loss.detach()),
        "reward": float(r.mean()),
        "advantage_std": float(advantage.std()) if advantage.numel() > 1 else 0.0,
        "entropy": float(entropy.detach()),
        "value_loss": float(value_loss.detach()),
    }


def ranking_loss(
    out: PolicyOutput, target: torch.Tensor, pair_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE of the mean score against the rating plus a pairwise ranking loss.

    For every two pairs of the batch with different ratings y_i > y_j the logistic loss
    softplus(-(l_i - l_j)) of the score logits l = log(alpha / beta) (the logit of the
    mean) pushes the better-rated pair's score above the other's; the BCE term keeps the
    scores on the rating scale.
    """
    mean = out.mean.clamp(SCORE_EPS, 1 - SCORE_EPS)
    bce = F.binary_cross_entropy(mean, target)
    logit = out.alpha.log() - out.beta.log()
    better = (target[:, None] - target[None, :]) > 1e-6  # (i, j): y_i > y_j
    if better.any():
        diff = logit[:, None] - logit[None, :]
        rank = F.softplus(-diff[better]).mean()
    else:
        rank = logit.sum() * 0.0
    loss = bce + pair_weight * rank
    return loss, {"loss": float(loss.detach()), "bce": float(bce.detach()),
                  "rank": float(rank.detach())}  # fmt: skip


def regression_loss(
    out: PolicyOutput, target: torch.Tensor, kind: str = "mse"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised baseline: MSE (or BCE) between the mean score and the rating."""
    mean = out.mean
    if kind == "mse":
        loss = F.mse_loss(mean, target)
    elif kind == "bce":
        loss = F.binary_cross_entropy(mean.clamp(SCORE_EPS, 1 - SCORE_EPS), target)
    else:
        raise ValueError(f"unknown regression loss {kind!r}; allowed: 'mse', 'bce'")
    return loss, {"loss": float(loss.detach())}


# --------------------------------------------------------------------------- data


def rating_targets(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per rated (image_path, prompt): the targets in [0, 1] and rater counts.

    Each rater's latest rating counts once; several raters are averaged. ``quality`` is
    the normalised rating (r - 1) / 2; ``alignment`` is prompt_faithfulness / 10 where a
    rating gives it, else the normalised rating (a CS787 CSV has only the one rating).
    """
    if frame.empty:
        raise ValueError("no ratings to train on")
    latest = latest_per_rater(frame)
    faithful = latest["prompt_faithfulness"] / ASPECT_MAX
    latest = latest.assign(
        quality=latest["rating_norm"],
        alignment=faithful.fillna(latest["rating_norm"]),
        from_faithfulness=faithful.notna(),
    )
    grouped = latest.groupby(["image_path", "prompt"], sort=False)
    out = grouped.agg(
        quality=("quality", "mean"),
        alignment=("alignment", "mean"),
        raters=("rater_id", "nunique"),
        from_faithfulness=("from_faithfulness", "sum"),
    )
    return out.reset_index()


def image_source(generator_ckpt: str) -> str:
    """Where a rated image came from, by its ``generator_ckpt``: ``phantom`` (empty or
    ``phantom``), ``real``, ``reconstruction`` (``vae:...``) or ``generated`` (a generator
    checkpoint or adapter)."""
    ckpt = str(generator_ckpt or "").strip()
    if ckpt in ("", "phantom"):
        return "phantom"
    if ckpt == "real":
        return "real"
    return "reconstruction" if ckpt.startswith("vae:") else "generated"


def agreement_by_source(
    pred: np.ndarray, target: np.ndarray, sources: Sequence[str], threshold: float
) -> dict[str, dict[str, Any]]:
    """:func:`agreement_metrics` of each image source apart (where it has held-out items)."""
    sources = np.asarray(sources)
    return {
        src: agreement_metrics(pred[sources == src], target[sources == src], threshold)
        for src in sorted(set(sources.tolist()))
    }


def holdout_split(
    image_paths: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out), split by image so one image never lands in both.

    An image is held out when a hash of (``seed``, its path) falls below ``fraction``, so
    its side never depends on the other images: a retraining on more ratings (the next
    rating round, ``rewards.init_from``) keeps every held-out image held out. With two or
    more images and ``fraction`` > 0, each side gets at least one.
    """
    unique = sorted(set(image_paths))
    if not unique:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}\0{p}".encode()).digest()[:8], "big") / 2**64
            for p in unique
        ]
    )
    is_held_u = u < fraction
    if fraction > 0 and len(unique) > 1:
        if not is_held_u.any():
            is_held_u[np.argmin(u)] = True
        if is_held_u.all():
            is_held_u[np.argmax(u)] = False
    held = {p for p, h in zip(unique, is_held_u, strict=True) if h}
    is_held = np.array([p in held for p in image_paths], dtype=bool)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def resolve_image(root: Path, image_path: str) -> Path:
    """An image_path from the ratings, resolved against ``root`` (absolute paths kept)."""
    path = Path(image_path)
    return path if path.is_absolute() else root / path


def load_images(root: Path, image_paths: Sequence[str], size: int) -> torch.Tensor:
    """All images as uint8 (N, 3, size, size); every missing or broken file named at once."""
    out = torch.empty((len(image_paths), 3, size, size), dtype=torch.uint8)
    problems: list[str] = []
    for i, rel in enumerate(
        tqdm(image_paths, desc="loading rated images", unit="img", mininterval=1.0)
    ):
        try:
            x = resize(to_tensor(load_image(resolve_image(root, rel))), size)
        except (FileNotFoundError, ImageDecodeError) as exc:
            problems.append(f"{rel}: {exc}")
            continue
        out[i] = x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{len(problems)} rated image(s) cannot be read under images root {root}:\n  {shown}{more}"
        )
    return out


def _pixels(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images_u8.to(device).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------- fitting


@dataclasses.dataclass
class Batchable:
    """Inputs of one model for N items, indexable by a tensor of positions."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    target: torch.Tensor  # float (N,)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.target)

    def inputs(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        x = {"pixel_values": _pixels(self.images[idx], device)}
        if self.input_ids is not None and self.attention_mask is not None:
            x["input_ids"] = self.input_ids[idx].to(device)
            x["attention_mask"] = self.attention_mask[idx].to(device)
        return x

    def images_only(self) -> Batchable:
        """The same items without prompts (what the selector takes)."""
        return Batchable(self.images, self.target)

    def subset(self, idx: np.ndarray) -> Batchable:
        t = torch.as_tensor(idx, dtype=torch.long)
        return Batchable(
            self.images[t],
            self.target[t],
            None if self.input_ids is None else self.input_ids[t],
            None if self.attention_mask is None else self.attention_mask[t],
        )


def fit(
    model: RewardModel,
    data: Batchable,
    cfg: RewardsConfig,
    objective: str,
    epochs: int,
    *,
    device: torch.device,
    desc: str,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    tower_lr_scale: float = 1.0,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` for ``epochs`` with ``objective``; returns statistics.

    ``on_epoch(epoch, mean losses)`` is called after every epoch (logging, evaluation).
    ``tower_lr_scale`` scales the learning rate of the backbones (ViT, text encoder),
    e.g. to keep what contrastive pre-training taught them.
    """
    if len(data) == 0 or epochs == 0:
        return {"epochs": 0, "steps": 0, "items": len(data)}
    model.train()
    towers = [*model.vit.parameters()]
    if isinstance(model, AlignmentPolicy):
        towers += [*model.text_encoder.parameters()]
    tower_ids = {id(p) for p in towers}
    heads = [p for p in model.parameters() if id(p) not in tower_ids]
    opt = torch.optim.AdamW(
        [{"params": heads}, {"params": towers, "lr": cfg.lr * tower_lr_scale}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    total = epochs * math.ceil(len(data) / cfg.batch_size)
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:  # linear warm-up over 5% of the steps, cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    order_rng = np.random.default_rng([seed, 3])
    target = data.target.to(device)
    steps, history = 0, []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", mininterval=1.0)
    for _ in bar:
        sums: dict[str, float] = {}
        batches = 0
        order = torch.as_tensor(order_rng.permutation(len(data)))
        for start in range(0, len(data), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            out = model(**data.inputs(idx, device))
            if objective == "reinforce":
                loss, parts = reinforce_loss(
                    out,
                    target[idx.to(device)],
                    num_samples=cfg.num_samples,
                    entropy_coef=cfg.entropy_coef,
                    value_coef=cfg.value_coef,
                    reward=cfg.reward,
                )
            elif objective == "regression":
                loss, parts = regression_loss(out, target[idx.to(device)], cfg.regression_loss)
            elif objective == "ranking":
                loss, parts = ranking_loss(out, target[idx.to(device)])
            else:
                raise ValueError(
                    f"unknown objective {objective!r}; allowed: reinforce, regression, ranking"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            steps += 1
            batches += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        epoch_stats = {k: v / max(batches, 1) for k, v in sums.items()}
        history.append(epoch_stats)
        if on_epoch is not None:
            on_epoch(len(history), epoch_stats)
            model.train()
        bar.set_postfix({k: f"{v:.3f}" for k, v in epoch_stats.items() if k in ("loss", "reward")})
    model.eval()
    return {"epochs": epochs, "steps": steps, "items": len(data), "last_epoch": history[-1]}


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
        pixels = _pixels(data.images[torch.as_tensor(idx)], device)
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
    ali_objective = alignment_objective or objective
    t0 = time.perf_counter()
    _seed_all(cfg.seed)
    selector = QualitySelector.from_config(cfg).to(device)
    if cfg.init_from:
        _start_from(selector, Path(cfg.init_from) / "selector", device)
    sel_fit = fit(
        selector, sel_train, cfg, objective, cfg.epochs, device=device,
        desc=f"selector ({objective})", seed=cfg.seed,
    )  # fmt: skip
    sel_pred = predict(selector, sel_test, device)
    sel_metrics = agreement_metrics(sel_pred, sel_test.target.numpy(), cfg.threshold)
    if sources is not None:
        sel_metrics["by_source"] = agreement_by_source(
            sel_pred, sel_test.target.numpy(), sources["selector"], cfg.threshold
        )
    log.info("selector (%s): held-out Spearman %s", objective, sel_metrics["spearman"])
    t1 = time.perf_counter()

    _seed_all(cfg.seed + 1)
    policy = AlignmentPolicy.from_config(cfg).to(device)
    pretrain: dict[str, Any] = {"epochs": 0}
    if cfg.init_from:  # the towers come trained (and pre-trained, if they were) with it
        _start_from(policy, Path(cfg.init_from) / "alignment", device)
        pretrain = {"epochs": 0, "init_from": cfg.init_from}
    elif pretrain_pairs is not None and cfg.pretrain_epochs > 0:
        pretrain = _pretrain_alignment(policy, pretrain_pairs, cfg, device)
    tower_lr = cfg.tower_lr_scale if pretrain["epochs"] or cfg.init_from else 1.0
    stage1 = fit(
        policy, ali_train, cfg, ali_objective, cfg.stage1_epochs, device=device,
        desc=f"alignment stage 1 ({ali_objective})", seed=cfg.seed + 1,
        tower_lr_scale=tower_lr,
    )  # fmt: skip
    passed = np.flatnonzero(predict(selector, ali_train.images_only(), device) >= cfg.threshold)
    log.info(
        "alignment stage 2 (%s): %d of %d training pairs pass the selector (score >= %.2f)",
        objective, len(passed), len(ali_train), cfg.threshold,
    )  # fmt: skip
    stage2 = fit(
        policy, ali_train.subset(passed), cfg, ali_objective, cfg.stage2_epochs, device=device,
        desc=f"alignment stage 2 ({ali_objective})", seed=cfg.seed + 2,
        tower_lr_scale=tower_lr,
    )  # fmt: skip
    ali_pred = predict(policy, ali_test, device)
    ali_metrics = agreement_metrics(ali_pred, ali_test.target.numpy(), cfg.threshold)
    if sources is not None:
        ali_metrics["by_source"] = agreement_by_source(
            ali_pred, ali_test.target.numpy(), sources["alignment"], cfg.threshold
        )
    test_passed = predict(selector, ali_test.images_only(), device) >= cfg.threshold
    ali_metrics_passed = agreement_metrics(
        ali_pred[test_passed], ali_test.target.numpy()[test_passed], cfg.threshold
    )
    t2 = time.perf_counter()
    result = {
        "selector": {**sel_metrics, "train": sel_fit, "seconds": round(t1 - t0, 1)},
        "alignment": {
            **ali_metrics,
            "objective": ali_objective,
            "fusion": policy.fusion_kind,
            "eye_swap": eye_swap_detection(policy, ali_test, test_prompts, device),
            "pretrain": pretrain,
            "passed_selector": ali_metrics_passed,
            "stage1": stage1,
            "stage2": {**stage2, "passed": int(len(passed)), "of": len(ali_train)},
            "seconds": round(t2 - t1, 1),
        },
    }
    return result, selector, policy


# rewards.* keys that do not shape the contrastively pre-trained towers (the cache key
# leaves them out; a key missing here only makes the cache miss more often)
_NOT_PRETRAIN = frozenset(
    {
        "ratings_db", "objective", "alignment_objective", "compare_objectives", "reward",
        "regression_loss", "lr", "epochs", "stage1_epochs", "stage2_epochs", "batch_size",
        "num_samples", "entropy_coef", "value_coef", "grad_clip", "threshold",
        "quality_weight", "alignment_weight", "holdout_fraction", "ood_weight",
        "ood_quantile", "tower_lr_scale", "pretrain_cache", "init_from", "service_replicas",
        "service_num_gpus", "service_batch_size",
    }
)  # fmt: skip


def pretrain_key(cfg: RewardsConfig, pairs: tuple[torch.Tensor, list[str]]) -> str:
    """Hash of the pre-training pairs (pixels, prompts) and the settings that shape them."""
    settings = {k: v for k, v in _config_dict(cfg).items() if k not in _NOT_PRETRAIN}
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
    frame = read_ratings(ratings_path)
    items = rating_targets(frame)
    train_idx, test_idx = holdout_split(
        items["image_path"].tolist(), cfg.holdout_fraction, cfg.seed
    )
    if len(train_idx) == 0:
        raise ValueError(f"{ratings_path}: no ratings left to train on after the hold-out split")
    log.info(
        "%d ratings of %d (image, prompt) pairs by %d rater(s): %d train, %d held out",
        len(frame), len(items), frame["rater_id"].nunique(), len(train_idx), len(test_idx),
    )  # fmt: skip

    ckpt_of = frame.drop_duplicates("image_path").set_index("image_path")["generator_ckpt"]
    item_source = [image_source(ckpt_of.get(p, "")) for p in items["image_path"]]
    size = vision_input_size(cfg.vision)
    images = load_images(root, items["image_path"].tolist(), size)
    alignment = torch.tensor(items["alignment"].to_numpy(), dtype=torch.float32)
    tok = build_tokenizer(cfg.text_encoder)(
        items["prompt"].tolist(),
        padding=True,
        truncation=True,
        max_length=cfg.text_encoder.max_length,
        return_tensors="pt",
    )
    # the selector sees each image once (its mean quality over the prompts it was rated with)
    by_image = items.assign(i=range(len(items))).groupby("image_path", sort=False)["i"]
    first = by_image.first().to_numpy()
    image_quality = torch.tensor(
        items.groupby("image_path", sort=False)["quality"].mean().to_numpy(), dtype=torch.float32
    )
    held_images = set(items["image_path"].iloc[test_idx])
    image_held = np.array([items["image_path"].iloc[i] in held_images for i in first])
    sel_all = Batchable(images[torch.tensor(first, dtype=torch.long)], image_quality)
    sel_train, sel_test = (
        sel_all.subset(np.flatnonzero(~image_held)),
        sel_all.subset(np.flatnonzero(image_held)),
    )
    ali_all = Batchable(images, alignment, tok["input_ids"], tok["attention_mask"])
    ali_train, ali_test = ali_all.subset(train_idx), ali_all.subset(test_idx)

    pretrain_pairs = None
    if cfg.pretrain_manifest and cfg.pretrain_epochs > 0:
        # the training split only: the held-out images stay unseen by every model
        pretrain_pairs = load_manifest_pairs(cfg.pretrain_manifest, size, split="train")
        log.info(
            "contrastive pre-training of the alignment towers on %d pairs of %s",
            len(pretrain_pairs[1]), cfg.pretrain_manifest,
        )  # fmt: skip
    test_prompts = items["prompt"].iloc[test_idx].tolist()
    sources = {
        "selector": [item_source[i] for i in first[image_held]],
        "alignment": [item_source[i] for i in test_idx],
    }
    ali_objective = cfg.objective if cfg.alignment_objective == "same" else cfg.alignment_objective

    objectives = [cfg.objective]
    if cfg.compare_objectives:
        objectives.append("regression" if cfg.objective == "reinforce" else "reinforce")
    out = Path(out_dir)
    results: dict[str, Any] = {}
    checkpoints: dict[str, dict[str, str]] = {}
    config_dict = _config_dict(cfg)
    for objective in objectives:
        result, selector, policy = _train_one_objective(
            objective, cfg, sel_train, sel_test, ali_train, ali_test, dev,
            alignment_objective=ali_objective if objective == cfg.objective else None,
            pretrain_pairs=pretrain_pairs, test_prompts=test_prompts, sources=sources,
        )  # fmt: skip
        results[objective] = result
        where = out if objective == cfg.objective else out / f"compare-{objective}"
        common = {
            "objective": objective,
            "threshold": cfg.threshold,
            "reward_weights": {"quality": cfg.quality_weight, "alignment": cfg.alignment_weight},
            "rewards_config": config_dict,
            "ratings": str(ratings_path),
        }
        selector.save_pretrained(where / "selector", training=result["selector"], **common)
        policy.save_pretrained(where / "alignment", training=result["alignment"], **common)
        checkpoints[objective] = {
            "selector": str(where / "selector"),
            "alignment": str(where / "alignment"),
        }
        if objective == cfg.objective:  # the guard of the reward the RL will use
            guard = fit_ood_guard(selector_features(selector, sel_all.images), cfg.ood_quantile)
            guard.save(out)
            ood = {"pool_size": guard.pool_size, "quantile": guard.quantile, "edge": guard.edge}

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
        "images": int(len(sel_all)),
        "train_pairs": int(len(train_idx)),
        "heldout_pairs": int(len(test_idx)),
        "train_images": int(len(sel_train)),
        "heldout_images": int(len(sel_test)),
        "alignment_target_from_faithfulness": int((items["from_faithfulness"] > 0).sum()),
        "threshold": cfg.threshold,
        "sources": {
            k: int(v) for k, v in pd.Series(item_source).value_counts().sort_index().items()
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
    report["seconds"] = round(time.perf_counter() - started, 1)
    _write_json_atomic(out / REPORT_FILE, report)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _config_dict(cfg: RewardsConfig) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


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
