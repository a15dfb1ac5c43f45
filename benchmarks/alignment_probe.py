"""Why the demo's alignment policy does not learn: supervised probes of its architecture.

    OMP_NUM_THREADS=1 python benchmarks/alignment_probe.py data/demo-rating-pool   # ~2 min

Builds the alignment policy of ``rewards.*`` (``--config``, default configs/demo.yaml:
the demo ViT and tiny BERT from scratch) and trains it on the demo rating pool with plain
supervised losses, no REINFORCE, holding out every fifth image (all its pairs):

1. ``fused``: the whole policy (ViT + BERT -> concat -> fusion MLP) with a logistic head,
   binary cross-entropy against prompt_faithfulness / 10. Can the architecture fit the
   alignment ratings at all, given the easiest objective?
2. ``laterality``: the ViT alone with a linear head, against the eye of each pool image's
   phantom record (the left/right the expert compares with the prompt). Can the image
   side see the feature at all?
3. ``fused after laterality``: probe 1 starting from the ViT of probe 2. Given an image
   feature that is known to be there, does the fusion learn the interaction?
4. ``laterality (text only)``: the text encoder alone (its masked mean, as the policy
   pools it) with a linear head, against whether the prompt says "left eye". Can the
   text side read the feature?

Prints held-out and training Spearman (probes 1, 3) or accuracy (probes 2, 4) every 5
epochs.
The numbers in docs/rewards.md ("The alignment policy does not learn") come from it, with
the seed's architecture: ``rewards.fusion=concat rewards.alignment_pooling=mean``. The
fixes (interaction fusion, grid pooling, contrastive pre-training) are measured by
benchmarks/alignment.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generators.images import load_image, to_tensor  # noqa: E402
from medrl.config import load_config  # noqa: E402
from rewards.models import AlignmentPolicy  # noqa: E402
from rewards.towers import pool_tokens, pooled_size, prepare_images  # noqa: E402


def _fit(model, params, logits, target, train, test, epochs, lr, metric, tag: str) -> None:
    """AdamW on binary cross-entropy over batches of 32; ``metric`` every 5 epochs."""
    opt = torch.optim.AdamW(params, lr=lr)
    order = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=order)].split(32):
            loss = F.binary_cross_entropy_with_logits(logits(batch), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 4:
            model.eval()
            with torch.no_grad():
                fit, held = metric(logits(train), target[train]), metric(logits(test), target[test])
            print(f"{tag:24s} epoch {epoch + 1:3d}  {metric.__name__} train {fit:.3f}  "
                  f"held-out {held:.3f}")  # fmt: skip


def Spearman(score: torch.Tensor, target: torch.Tensor) -> float:  # noqa: N802 - printed name
    return float(spearmanr(score, target)[0])


def accuracy(score: torch.Tensor, target: torch.Tensor) -> float:
    return float(((score > 0).float() == target).float().mean())


def _fused_probe(model, x, prompts, y, train, test, epochs: int, lr: float, tag: str) -> None:
    head = torch.nn.Linear(model.fusion_hidden[-1], 1)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        tok = model.tokenize([prompts[i] for i in idx.tolist()])
        fused = model.fused_features(x[idx], tok["input_ids"], tok["attention_mask"])
        return head(F.gelu(model.fusion(fused))).squeeze(-1)

    params = [*model.parameters(), *head.parameters()]
    _fit(model, params, logits, y, train, test, epochs, lr, Spearman, tag)


def _laterality_probe(model, x, left, train, test, epochs: int, lr: float) -> None:
    head = torch.nn.Linear(pooled_size(model.vit.config.hidden_size, model.pooling), 1)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        hidden = model.vit(pixel_values=model.stem(x[idx])).last_hidden_state
        return head(pool_tokens(hidden, model.pooling)).squeeze(-1)

    params = [*model.vit.parameters(), *head.parameters()]
    _fit(model, params, logits, left, train, test, epochs, lr, accuracy, "laterality (ViT only)")


def _text_probe(model, prompts, train, test, epochs: int, lr: float) -> None:
    head = torch.nn.Linear(model.text_encoder.config.hidden_size, 1)
    says_left = torch.tensor([" left eye" in p.lower() for p in prompts], dtype=torch.float32)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        tok = model.tokenize([prompts[i] for i in idx.tolist()])
        return head(model.text_features(tok["input_ids"], tok["attention_mask"])).squeeze(-1)

    params = [*model.text_encoder.parameters(), *head.parameters()]
    _fit(model, params, logits, says_left, train, test, epochs, lr, accuracy,
         "laterality (text only)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", type=Path, help="the demo rating pool (data/demo-rating-pool)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the fused probes")
    parser.add_argument(
        "--laterality-epochs", type=int, default=40, help="epochs of the laterality probe"
    )
    parser.add_argument("--text-epochs", type=int, default=10, help="epochs of the text probe")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (rewards.*)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides).rewards

    rows = pd.read_csv(args.pool / "ratings.csv")
    if rows.prompt_faithfulness.isna().any():
        raise ValueError(f"{args.pool / 'ratings.csv'}: rows without prompt_faithfulness")
    records = {}
    for line in (args.pool / "pool.jsonl").read_text().splitlines():
        item = json.loads(line)
        records[item["path"]] = item["record"]
    images = sorted(rows.image_path.unique())
    held_out = set(images[::5])
    size = AlignmentPolicy.from_config(cfg).image_size

    paths, prompts = rows.image_path.tolist(), rows.prompt.tolist()
    x = prepare_images(torch.stack([to_tensor(load_image(args.pool / p)) for p in paths]), size)
    y = torch.tensor(rows.prompt_faithfulness.to_numpy() / 10.0, dtype=torch.float32)
    train = torch.tensor([i for i, p in enumerate(paths) if p not in held_out])
    test = torch.tensor([i for i, p in enumerate(paths) if p in held_out])
    print(f"{len(rows)} rated pairs of {len(images)} images; {len(test)} held-out pairs")

    model = AlignmentPolicy.from_config(cfg)
    _fused_probe(model, x, prompts, y, train, test, args.epochs, args.lr, "fused")

    ximg = prepare_images(torch.stack([to_tensor(load_image(args.pool / p)) for p in images]), size)
    left = torch.tensor([records[p]["laterality"] == "left" for p in images], dtype=torch.float32)
    itrain = torch.tensor([i for i, p in enumerate(images) if p not in held_out])
    itest = torch.tensor([i for i, p in enumerate(images) if p in held_out])
    model = AlignmentPolicy.from_config(cfg)
    _laterality_probe(model, ximg, left, itrain, itest, args.laterality_epochs, args.lr)
    _fused_probe(model, x, prompts, y, train, test, args.epochs, args.lr, "fused after laterality")
    _text_probe(AlignmentPolicy.from_config(cfg), prompts, train, test, args.text_epochs, args.lr)


if __name__ == "__main__":
    main()
