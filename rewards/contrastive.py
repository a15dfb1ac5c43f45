"""Contrastive pre-training of the alignment policy's two towers on free image-text pairs.

The ratings say whether an image *matches* its prompt, an exclusive-or of an image
feature and a text feature (which eye; how much retinopathy). Learnt from scratch on a
few hundred ratings, neither tower gets a signal for its half until the fusion already
combines them (docs/rewards.md). The fine-tuning manifest's own (image, report) pairs
cost nothing and teach each tower its half first: CLIP-style symmetric InfoNCE

    u_i = image tower + projection, v_j = text tower + projection (unit vectors)
    image -> text: softmax over the batch's prompts and the hard negatives, target v_i
    text -> image: softmax over the batch's images, target u_i

with in-batch negatives plus **hard negatives** that differ from the true prompt only
in what the ratings check: the same prompt with "left eye" and "right eye" swapped
(and, with ``rewards.pretrain_grade_swap``, the DR grade words replaced by another
grade's). A horizontal flip of the image mirrors the eye, so a flipped image paired with
its eye-swapped prompt is one more true pair (``rewards.pretrain_flip``); the image
minus its flip differs only where the optic disc sits, which is the laterality signal
a tiny ViT otherwise takes a long plateau to find.

With ``rewards.fusion: interaction`` the projections are the policy's own
``image_proj`` / ``text_proj``, so the space this aligns is the one its fusion reads;
with ``concat`` temporary projections are trained and dropped (only the towers keep
what they learnt).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from generators.images import load_image, resize, to_tensor
from rewards.config import RewardsConfig
from rewards.models import AlignmentPolicy
from rewards.towers import pooled_size
from rewards.training_fit import optimizer_step, warmup_cosine

log = logging.getLogger(__name__)

_EYE = re.compile(r"\b(left|right)(\s+eye)\b", re.IGNORECASE)

#: Phrases of the phantom's DR grades 0-4 as its prompts write them (rewards.simulated
#: parses the same ones), longest first so "non-proliferative" wins over "proliferative".
GRADE_PHRASES: tuple[str, ...] = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)


def swap_eye(prompt: str) -> str | None:
    """``prompt`` with "left eye" and "right eye" exchanged; None if it names no eye."""
    if not _EYE.search(prompt):
        return None

    def flip(m: re.Match) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word[0].isupper():
            other = other.capitalize()
        return other + m.group(2)

    return _EYE.sub(flip, prompt)


def swap_grade(prompt: str, rng: np.random.Generator) -> str | None:
    """``prompt`` with its DR grade phrase replaced by another grade's; None if it has none."""
    text = prompt.lower()
    for g in sorted(range(len(GRADE_PHRASES)), key=lambda g: -len(GRADE_PHRASES[g])):
        start = text.find(GRADE_PHRASES[g])
        if start < 0:
            continue
        # "proliferative" also ends the non-proliferative phrases: make sure of the start
        if g == 4 and text[max(0, start - 4) : start] == "non-":
            continue
        others = [h for h in range(len(GRADE_PHRASES)) if min(h, 3) != min(g, 3)]
        new = GRADE_PHRASES[int(rng.choice(others))]
        return prompt[:start] + new + prompt[start + len(GRADE_PHRASES[g]) :]
    return None


def load_manifest_pairs(
    manifest: str | os.PathLike, size: int, split: str | None = None
) -> tuple[torch.Tensor, list[str]]:
    """uint8 (N, 3, size, size) images and their prompts (``Text``) from a manifest."""
    from generators.datasets import read_manifest

    frame = read_manifest(manifest)
    if split is not None:
        frame = frame[frame["split"] == split]
    if frame.empty:
        raise ValueError(f"{manifest}: no image-text pairs to pre-train on")
    images = torch.empty((len(frame), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(
        tqdm(frame["path"].tolist(), desc="loading pre-training pairs", mininterval=1.0)
    ):
        x = resize(to_tensor(load_image(Path(path))), size)
        images[i] = x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return images, [str(t) for t in frame["Text"].tolist()]


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    hard: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE of unit vectors ``image`` (B, d) and ``text`` (B, d), pair i = i.

    ``hard`` (H, d): extra text candidates for the image -> text direction (negatives
    for every image).
    """
    logits = image @ text.T / temperature  # (B, B)
    target = torch.arange(len(image), device=image.device)
    i2t = logits if hard is None else torch.cat([logits, image @ hard.T / temperature], dim=1)
    loss = 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(logits.T, target))
    return loss, {"infonce": float(loss.detach())}


class _Projections(nn.Module):
    """The towers' projections to the shared space: the policy's own, or temporary ones."""

    def __init__(self, model: AlignmentPolicy, dim: int):
        super().__init__()
        self.own = model.fusion_kind == "interaction"
        if not self.own:
            self.image = nn.Linear(pooled_size(model.vit.config.hidden_size, model.pooling), dim)
            self.text = nn.Linear(model.text_encoder.config.hidden_size, dim)

    def forward(
        self, model: AlignmentPolicy, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.own:
            return model.project_image(image), model.project_text(text)
        return F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1)


def _batch_texts(
    prompts: Sequence[str], flip: bool, grade_swap: bool, rng: np.random.Generator
) -> tuple[list[str], list[int], list[str], list[int]]:
    """The batch's texts and, per image, where its eye-swapped prompt is; grade negatives.

    With ``flip`` the batch holds every image twice (as is, then mirrored) and the
    mirrored copy's true prompt is the eye-swapped one, so the eye negatives of one
    orientation are the positives of the other. Returns (texts, eye_of, hard, hard_of):
    ``texts[i]`` is image i's true prompt, ``texts[eye_of[i]]`` its eye-swapped one
    (-1: the prompt names no eye) and ``hard`` extra negatives of images ``hard_of``.
    """
    n = len(prompts)
    swapped = [swap_eye(p) for p in prompts]
    if flip:
        texts = [
            *prompts,
            *[s if s is not None else p for s, p in zip(swapped, prompts, strict=True)],
        ]
        eye_of = [n + i if swapped[i] is not None else -1 for i in range(n)]
        eye_of += [i if swapped[i] is not None else -1 for i in range(n)]
        hard: list[str] = []
        hard_of: list[int] = []
    else:
        texts = list(prompts)
        hard = [s for s in swapped if s is not None]
        hard_of = [i for i, s in enumerate(swapped) if s is not None]
        eye_of = [-1] * n
        for k, i in enumerate(hard_of):
            eye_of[i] = len(texts) + k  # the hard negatives follow the texts
    if grade_swap:
        for i, text in enumerate(texts):
            wrong = swap_grade(text, rng)
            if wrong is not None:
                hard.append(wrong)
                hard_of.append(i)
    return texts, eye_of, hard, hard_of


def _eye_pair_loss(
    u: torch.Tensor, v: torch.Tensor, t: torch.Tensor, eye: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, float] | None:
    """Two-way cross-entropy of each image's true prompt ``v`` against its eye-swapped one
    (``t[eye]``; -1: none) and the share where the true one is closer; None if none has one."""
    has = eye >= 0
    if not has.any():
        return None
    rows = has.nonzero().squeeze(-1)
    true = (u[rows] * v[rows]).sum(-1)
    wrong = (u[rows] * t[eye[rows]]).sum(-1)
    pair = F.cross_entropy(
        torch.stack([true, wrong], 1) / temperature,
        torch.zeros(len(rows), dtype=torch.long, device=u.device),
    )
    return pair, float((true > wrong).float().mean())


def _pretrain_loss(
    model: AlignmentPolicy,
    proj: _Projections,
    x: torch.Tensor,
    prompts: Sequence[str],
    cfg: RewardsConfig,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch of images ``x`` (in [-1, 1]) and their prompts, and its parts."""
    if cfg.pretrain_flip:
        x = torch.cat([x, x.flip(-1)])
    texts, eye_of, hard, hard_of = _batch_texts(
        prompts, cfg.pretrain_flip, cfg.pretrain_grade_swap, rng
    )
    tok = model.tokenize(texts + hard)
    t_all = model.text_features(tok["input_ids"], tok["attention_mask"])
    u, t = proj(model, model.image_features(x), t_all)
    v, h = t[: len(texts)], t[len(texts) :]
    loss, parts = contrastive_loss(u, v, h if hard else None, cfg.pretrain_temperature)
    eye = torch.as_tensor(eye_of, device=x.device)
    eye_pair = _eye_pair_loss(u, v, t, eye, cfg.pretrain_temperature)
    if eye_pair is not None:
        loss = loss + cfg.pretrain_hard_weight * eye_pair[0]
        parts["eye_accuracy"] = eye_pair[1]
    parts["loss"] = float(loss.detach())
    return loss, parts


def pretrain_towers(
    model: AlignmentPolicy,
    images: torch.Tensor,
    prompts: Sequence[str],
    cfg: RewardsConfig,
    *,
    device: torch.device,
    seed: int = 0,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Contrastive pre-training of ``model``'s towers (and projections) on image-text pairs.

    ``images``: uint8 (N, 3, S, S) at the model's input size; ``prompts``: N texts.
    Besides the InfoNCE, ``rewards.pretrain_hard_weight`` times a two-way cross-entropy
    (true prompt vs its eye-swapped one) per image. Returns statistics: epochs, steps,
    pairs, seconds and the first and last epoch's mean loss and eye accuracy (true
    prompt closer than the eye-swapped one).
    """
    epochs = cfg.pretrain_epochs if epochs is None else epochs
    if epochs <= 0 or len(images) < 2:
        return {"epochs": 0, "pairs": len(images)}
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    t0 = time.perf_counter()
    proj = _Projections(model, cfg.fusion_dim).to(device)
    params = [*model.vit.parameters(), *model.text_encoder.parameters(), *proj.parameters()]
    if proj.own:
        params += [*model.image_proj.parameters(), *model.text_proj.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.pretrain_batch_size, len(images))
    per_epoch = max(1, len(images) // batch)  # full batches only: InfoNCE needs negatives
    sched = warmup_cosine(opt, epochs * per_epoch)
    rng = np.random.default_rng([seed, 11])
    history: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(epochs), desc="contrastive pre-training", unit="epoch", mininterval=1.0)
    for _ in bar:
        order = rng.permutation(len(images))
        sums: dict[str, float] = {}
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            x = images[torch.as_tensor(idx)].to(device).float().div(127.5).sub(1.0)
            loss, parts = _pretrain_loss(model, proj, x, [prompts[i] for i in idx], cfg, rng)
            optimizer_step(loss, opt, sched, params, cfg.grad_clip)
            for k, val in parts.items():
                sums[k] = sums.get(k, 0.0) + val
        history.append({k: val / per_epoch for k, val in sums.items()})
        bar.set_postfix({k: f"{val:.3f}" for k, val in history[-1].items()})
    model.eval()
    return {
        "epochs": epochs,
        "steps": epochs * per_epoch,
        "pairs": len(images),
        "first_epoch": history[0],
        "last_epoch": history[-1],
        "seconds": round(time.perf_counter() - t0, 1),
    }


@torch.no_grad()
def eye_match_accuracy(
    model: AlignmentPolicy, images: torch.Tensor, prompts: Sequence[str], device: torch.device
) -> float | None:
    """Share of (image, true prompt) pairs whose projections are closer than the eye swap.

    Reads the shared space of the interaction fusion (None for ``concat``).
    """
    if model.fusion_kind != "interaction":
        return None
    keep = [i for i, p in enumerate(prompts) if swap_eye(p) is not None]
    if not keep:
        return None
    model.eval()
    x = images[torch.as_tensor(keep)].to(device).float().div(127.5).sub(1.0)
    u = model.project_image(model.image_features(x))
    true = model.tokenize([prompts[i] for i in keep])
    wrong = model.tokenize([swap_eye(prompts[i]) for i in keep])
    v = model.project_text(model.text_features(true["input_ids"], true["attention_mask"]))
    w = model.project_text(model.text_features(wrong["input_ids"], wrong["attention_mask"]))
    return float(((u * v).sum(-1) > (u * w).sum(-1)).float().mean())
