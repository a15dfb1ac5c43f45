"""An out-of-distribution guard on the reward: images unlike anything the experts rated.

A reward model is only trustworthy on images like the ones it learnt from. RL finds the
others: on the demo, steps large enough to leave the fundus manifold found orange
blotches that a selector trained on phantoms scored "good" (docs/rl.md). The guard
measures how far an image's selector features lie from the rated pool's and takes a
penalty off the reward beyond the pool's own range:

- fit (:func:`fit_ood_guard`): mean ``mu`` and a shrunk covariance of the selector's
  features of every rated image, ``S = (1 - a) C + a tr(C)/d I`` (``a`` = ``shrinkage``:
  the pool has a few hundred images for tens to hundreds of feature dimensions), and the
  ``quantile`` of the pool's own Mahalanobis distances ``d(x) = sqrt((x - mu)^T S^-1
  (x - mu))`` as the edge ``r``;
- use (:meth:`OODGuard.penalty`): ``weight * clip((d(x) - r) / r, 0, 1)``: nothing inside
  the pool's range, the whole ``weight`` at twice its edge.

Saved beside the reward models as ``ood_guard.safetensors`` (mu, precision, edge) and
``ood_guard.json`` (quantile, shrinkage, pool size, feature dimension).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from runfiles import atomic_path, atomic_write_text

WEIGHTS_FILE = "ood_guard.safetensors"
META_FILE = "ood_guard.json"


@dataclass
class OODGuard:
    """Mahalanobis distance of features to a rated pool, and the reward penalty beyond it."""

    mean: torch.Tensor  # (D,)
    precision: torch.Tensor  # (D, D), inverse of the shrunk covariance
    edge: float  # the pool's ``quantile`` distance
    quantile: float
    shrinkage: float
    pool_size: int

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of ``features`` (N, D) to the pool: (N,)."""
        x = features.to(self.mean) - self.mean
        return torch.einsum("nd,de,ne->n", x, self.precision, x).clamp(min=0).sqrt()

    def penalty(self, features: torch.Tensor, weight: float) -> torch.Tensor:
        """``weight * clip((d - edge) / edge, 0, 1)`` per row: 0 inside the pool's range."""
        excess = (self.distance(features) - self.edge) / max(self.edge, 1e-12)
        return weight * excess.clamp(0.0, 1.0)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the guard into ``out_dir`` (each file written to a temporary name first)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean.contiguous(),
            "precision": self.precision.contiguous(),
            "edge": torch.tensor([self.edge], dtype=torch.float64),
        }
        with atomic_path(out / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        meta = {
            "quantile": self.quantile,
            "shrinkage": self.shrinkage,
            "pool_size": self.pool_size,
            "features": int(self.mean.numel()),
            "edge": self.edge,
        }
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
        return out / WEIGHTS_FILE

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> OODGuard | None:
        """The guard saved in ``out_dir``; None when there is none."""
        out = Path(out_dir)
        if not (out / WEIGHTS_FILE).is_file():
            return None
        t = load_file(str(out / WEIGHTS_FILE))
        try:
            meta = json.loads((out / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{out / META_FILE}: unreadable OOD guard metadata ({exc})") from exc
        return cls(
            t["mean"],
            t["precision"],
            float(t["edge"][0]),
            float(meta["quantile"]),
            float(meta["shrinkage"]),
            int(meta["pool_size"]),
        )


def fit_ood_guard(
    features: torch.Tensor, quantile: float = 0.99, shrinkage: float = 0.1
) -> OODGuard:
    """The guard of a pool's features (N, D): mean, shrunk covariance, the quantile edge."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"fit_ood_guard: need (N >= 2, D) features, got {tuple(features.shape)}")
    if not 0.0 < quantile < 1.0 or not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"fit_ood_guard: quantile {quantile} / shrinkage {shrinkage} out of range")
    x = features.detach().to("cpu", torch.float64)
    mean = x.mean(0)
    cov = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    d = cov.shape[0]
    scale = float(torch.trace(cov)) / d or 1.0
    shrunk = (1 - shrinkage) * cov + shrinkage * scale * torch.eye(d, dtype=torch.float64)
    precision = torch.linalg.pinv(shrunk, hermitian=True)
    guard = OODGuard(mean, precision, 0.0, quantile, shrinkage, len(x))
    guard.edge = float(torch.quantile(guard.distance(x), quantile))
    return guard


@torch.no_grad()
def selector_features(selector: torch.nn.Module, images: torch.Tensor, batch_size: int = 64):
    """The selector's features of ``images``, in batches.

    ``images``: anything the selector's ``inputs`` takes (float in [-1, 1]), or a uint8
    (N, 3, H, W) tensor, converted a batch at a time (a large rated pool never exists as
    floats all at once).
    """

    def batch(i: int) -> Any:
        x = images[i : i + batch_size]
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            x = x.float().div(127.5).sub(1.0)
        return x

    was_training = selector.training
    selector.eval()
    try:
        parts = [
            selector.features(selector.inputs(batch(i))["pixel_values"])
            for i in range(0, len(images), batch_size)
        ]
    finally:
        selector.train(was_training)
    return torch.cat(parts).cpu()
