"""Utility of synthetic images: do they train a classifier that works on real images?

- :func:`utility_report` trains the same small CNN three times — on real images, on
  synthetic images, on real + synthetic — and reports each one's accuracy on held-out REAL
  images (MediSyn's train-on-synthetic / augment-with-synthetic protocol).
- :func:`generation_accuracy` classifies generated images with a given expert classifier and
  reports how often it recovers the label the image was generated for (the feature-aligned
  diffusion study's "generation accuracy").

The CNN is deliberately tiny (two conv blocks, 32 x 32 input, a few epochs on CPU): it
measures whether class information is present, not the best achievable accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.image_batch import ImageBatch, iter_float_batches, num_images, resized_float_batch
from generators.images import resize

#: Side (px) every image is resized to before the classifiers see it.
UTILITY_SIZE = 32


class TinyCNN(nn.Module):
    """conv(3->16) -> pool -> conv(16->32) -> pool -> global mean -> linear. Input [-1, 1].

    Any input size is resized to ``input_size`` first.
    """

    def __init__(self, num_classes: int, input_size: int = 32) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        self.input_size = input_size
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of float images (B, 3, H, W) in [-1, 1]."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = resize(x, self.input_size)
        return self.head(self.features(x).mean(dim=(2, 3)))


def _labels(labels: Sequence[int] | np.ndarray | torch.Tensor, n: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels))
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(
            f"{what}: expected one integer label per image ({n}), got {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer class labels, got {y.dtype}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{what}: expected labels >= 0, got {int(y.min())}")
    return y.long()


def train_classifier(
    images: ImageBatch,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 8,
    input_size: int = 32,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> TinyCNN:
    """Train a :class:`TinyCNN` (Adam, cross-entropy) and return it in eval mode.

    Deterministic for a seed; the global torch RNG is left untouched.

    Raises:
        ValueError: label count or type mismatch, fewer than 2 classes, bad hyperparameters.
    """
    n = num_images(images, "images")
    y = _labels(labels, n, "labels")
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if k < 2 or int(y.max()) >= k:
        raise ValueError(
            f"num_classes: expected >= 2 and > every label, got {k} (max {int(y.max())})"
        )
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"expected epochs, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    x = resized_float_batch(images, input_size, "images")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCNN(k, input_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def generation_accuracy(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: ImageBatch,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    batch_size: int = 64,
    input_size: int | None = None,
) -> float:
    """Fraction of images the classifier assigns to the label they were generated for.

    Args:
        classifier: maps float (B, 3, H, W) in [-1, 1] to logits or probabilities (B, C)
            (an ``nn.Module`` is put in eval mode); it does its own normalisation.
        images: the generated images.
        labels: the class each image was generated for (integers).
        input_size: resize images to this square size first (``None``: as given).

    Raises:
        ValueError: label count/type mismatch, or classifier output not (B, C).
    """
    n = num_images(images, "images")
    y = _labels(labels, n, "labels")
    if isinstance(classifier, nn.Module):
        classifier.eval()
    correct, seen = 0, 0
    for batch in iter_float_batches(images, batch_size, "images"):
        if input_size is not None:
            batch = resize(batch, input_size)
        out = classifier(batch)
        if out.dim() != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"classifier: expected (B, C) outputs, got {tuple(out.shape)}")
        pred = out.argmax(dim=1).cpu()
        correct += int((pred == y[seen : seen + batch.shape[0]]).sum())
        seen += batch.shape[0]
    return correct / n


@dataclass(frozen=True)
class UtilityResult:
    """Accuracy on held-out real images of classifiers trained on each source."""

    real: float
    synthetic: float
    real_plus_synthetic: float
    chance: float
    n_real_train: int
    n_synthetic: int
    n_test: int

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        return [
            f"accuracy on {self.n_test} held-out real images (chance {self.chance:.3f}): "
            f"trained on real {self.real:.3f} ({self.n_real_train}), synthetic "
            f"{self.synthetic:.3f} ({self.n_synthetic}), real + synthetic "
            f"{self.real_plus_synthetic:.3f}",
        ]


def utility_report(
    real_train: ImageBatch,
    real_train_labels: Sequence[int] | np.ndarray | torch.Tensor,
    synthetic: ImageBatch,
    synthetic_labels: Sequence[int] | np.ndarray | torch.Tensor,
    real_test: ImageBatch,
    real_test_labels: Sequence[int] | np.ndarray | torch.Tensor,
    epochs: int = 8,
    input_size: int = UTILITY_SIZE,
    seed: int = 0,
) -> UtilityResult:
    """Train on real, synthetic, and real + synthetic; test each on held-out real images.

    The three classifiers share architecture, epochs and seed. ``chance`` is the accuracy of
    always predicting the most frequent test label.
    """
    xr = resized_float_batch(real_train, input_size, "real_train")
    xs = resized_float_batch(synthetic, input_size, "synthetic")
    xt = resized_float_batch(real_test, input_size, "real_test")
    yr = _labels(real_train_labels, xr.shape[0], "real_train_labels")
    ys = _labels(synthetic_labels, xs.shape[0], "synthetic_labels")
    yt = _labels(real_test_labels, xt.shape[0], "real_test_labels")
    k = int(max(yr.max(), ys.max(), yt.max())) + 1

    def fit_and_score(x: torch.Tensor, y: torch.Tensor) -> float:
        model = train_classifier(x, y, k, epochs, input_size, seed=seed)
        return generation_accuracy(model, xt, yt)

    both_x, both_y = torch.cat([xr, xs]), torch.cat([yr, ys])
    chance = float(torch.bincount(yt, minlength=k).max()) / len(yt)
    return UtilityResult(
        real=fit_and_score(xr, yr),
        synthetic=fit_and_score(xs, ys),
        real_plus_synthetic=fit_and_score(both_x, both_y),
        chance=chance,
        n_real_train=xr.shape[0],
        n_synthetic=xs.shape[0],
        n_test=xt.shape[0],
    )
