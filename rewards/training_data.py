"""The rated (image, prompt) pairs as the two models' training and held-out sets: the
selector sees each rated image once, the alignment policy every rated pair.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from generators.model import build_tokenizer
from rewards.config import RewardsConfig
from rewards.rating_data import image_source, load_images
from rewards.towers import vision_input_size
from rewards.training_fit import Batchable


@dataclasses.dataclass
class RatedSets:
    """The ratings, their targets and split, and the models' sets built from them."""

    image_size: int  # the side the images were loaded at: the ViT's input size
    frame: pd.DataFrame  # the ratings as read
    items: pd.DataFrame  # one row per rated (image, prompt): rewards.rating_data.rating_targets
    train_idx: np.ndarray  # rows of ``items``
    test_idx: np.ndarray
    item_source: list[str]  # per row of ``items``: rewards.rating_data.image_source
    selector: Batchable  # every rated image once
    sel_train: Batchable
    sel_test: Batchable
    ali_train: Batchable
    ali_test: Batchable
    test_prompts: list[str]  # those of ``ali_test``
    sources: dict[str, list[str]]  # selector: per ``sel_test`` image; alignment: per pair


def _per_image(
    items: pd.DataFrame, images: torch.Tensor, test_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Batchable]:
    """Each image's first row, whether it is held out, and the selector's set of the images
    (an image's quality is its mean over the prompts it was rated with)."""
    by_image = items.assign(i=range(len(items))).groupby("image_path", sort=False)["i"]
    first = by_image.first().to_numpy()
    image_quality = torch.tensor(
        items.groupby("image_path", sort=False)["quality"].mean().to_numpy(), dtype=torch.float32
    )
    held_images = set(items["image_path"].iloc[test_idx])
    image_held = np.array([items["image_path"].iloc[i] in held_images for i in first])
    return (
        first,
        image_held,
        Batchable(images[torch.tensor(first, dtype=torch.long)], image_quality),
    )


def rated_sets(
    frame: pd.DataFrame,
    items: pd.DataFrame,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    root: Path,
    cfg: RewardsConfig,
) -> RatedSets:
    """The rated images of ``items`` loaded from ``root`` at the ViT's input size, with their
    prompts tokenized, as the selector's and the alignment policy's sets split at ``test_idx``."""
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
    first, image_held, sel_all = _per_image(items, images, test_idx)
    ali_all = Batchable(images, alignment, tok["input_ids"], tok["attention_mask"])
    return RatedSets(
        image_size=size,
        frame=frame,
        items=items,
        train_idx=train_idx,
        test_idx=test_idx,
        item_source=item_source,
        selector=sel_all,
        sel_train=sel_all.subset(np.flatnonzero(~image_held)),
        sel_test=sel_all.subset(np.flatnonzero(image_held)),
        ali_train=ali_all.subset(train_idx),
        ali_test=ali_all.subset(test_idx),
        test_prompts=items["prompt"].iloc[test_idx].tolist(),
        sources={
            "selector": [item_source[i] for i in first[image_held]],
            "alignment": [item_source[i] for i in test_idx],
        },
    )
