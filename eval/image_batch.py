"""The image batches every eval function accepts, and their conversion to tensors or arrays.

Conventions (see ``generators/images.py``):

- numpy arrays are channel-last ``uint8``: one image (H, W, 3) or a batch (B, H, W, 3);
- a list or tuple of such (H, W, 3) arrays may mix sizes (each image is handled on its own);
- torch tensors are channel-first: ``float`` in [-1, 1] (what the VAE returns), (3, H, W) or
  (B, 3, H, W), or ``uint8`` in [0, 255] (B, 3, H, W) (what torchmetrics' FID passes to a
  custom feature module).

Anything else is a ``ValueError`` that says what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from generators.images import resize, to_tensor, to_uint8

#: What eval functions accept as "images".
ImageBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray]

_EXPECTED = (
    "uint8 numpy (H, W, 3) / (B, H, W, 3), a list of uint8 (H, W, 3) arrays, "
    "a float tensor (B, 3, H, W) in [-1, 1] or a uint8 tensor (B, 3, H, W)"
)


def _describe(images: object) -> str:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return f"{type(images).__name__} {images.dtype} {tuple(images.shape)}"
    if isinstance(images, (list, tuple)):
        first = images[0] if images else None
        return (
            f"{type(images).__name__} of {len(images)} ({_describe(first) if images else 'empty'})"
        )
    return type(images).__name__


def _check_array(img: np.ndarray, what: str) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")


def _tensor_to_float(images: torch.Tensor, what: str) -> torch.Tensor:
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected a tensor (B, 3, H, W), got {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1.0)
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a float or uint8 tensor, got {x.dtype}")
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: the image tensor holds NaN or inf values")
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if lo < -1.001 or hi > 1.001:
        raise ValueError(
            f"{what}: expected float images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
            "(pass uint8 arrays for [0, 255] images)"
        )
    return x.clamp(-1, 1)


def num_images(images: ImageBatch, what: str = "images") -> int:
    """How many images a batch holds (validating its type).

    Raises:
        ValueError: the batch is not one of the accepted forms, or is empty.
    """
    if isinstance(images, np.ndarray):
        n = 1 if images.ndim == 3 else (images.shape[0] if images.ndim == 4 else -1)
    elif isinstance(images, torch.Tensor):
        n = 1 if images.dim() == 3 else (images.shape[0] if images.dim() == 4 else -1)
    elif isinstance(images, (list, tuple)):
        n = len(images)
    else:
        n = -1
    if n < 0:
        raise ValueError(f"{what}: expected {_EXPECTED}; got {_describe(images)}")
    if n == 0:
        raise ValueError(f"{what}: expected at least one image, got none")
    return n


def iter_float_batches(
    images: ImageBatch, batch_size: int, what: str = "images"
) -> Iterator[torch.Tensor]:
    """Yield float (b, 3, H, W) tensors in [-1, 1], in order, at most ``batch_size`` at a time.

    A list of arrays of different sizes is yielded one image at a time (b = 1).

    Raises:
        ValueError: the batch is not one of the accepted forms.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = num_images(images, what)
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        for i in range(0, n, batch_size):
            yield _tensor_to_float(x[i : i + batch_size], what)
        return
    if isinstance(images, np.ndarray):
        x = images[None] if images.ndim == 3 else images
        if x.dtype != np.uint8 or x.shape[-1] != 3:
            raise ValueError(
                f"{what}: expected uint8 (B, H, W, 3) arrays, got {x.dtype} {images.shape}"
            )
        for i in range(0, n, batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))
            yield chunk.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return
    for k, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise ValueError(f"{what}[{k}]: expected a uint8 (H, W, 3) array, got {_describe(img)}")
        _check_array(img, f"{what}[{k}]")
    same = len({img.shape for img in images}) == 1
    step = batch_size if same else 1
    for i in range(0, n, step):
        yield torch.stack([to_tensor(img) for img in images[i : i + step]])


def as_float_batch(images: ImageBatch, what: str = "images") -> torch.Tensor:
    """All images as one float (B, 3, H, W) tensor in [-1, 1] (they must share one size).

    Raises:
        ValueError: not an accepted form, or images of different sizes.
    """
    if isinstance(images, (list, tuple)) and len({getattr(i, "shape", None) for i in images}) > 1:
        sizes = sorted({str(getattr(i, "shape", None)) for i in images})
        raise ValueError(f"{what}: expected images of one size, got sizes {', '.join(sizes[:4])}")
    return torch.cat(list(iter_float_batches(images, 256, what)))


def as_uint8_list(images: ImageBatch, what: str = "images") -> list[np.ndarray]:
    """All images as a list of uint8 (H, W, 3) arrays (sizes may differ).

    Raises:
        ValueError: not an accepted form.
    """
    if isinstance(images, (list, tuple)):
        num_images(images, what)
        for k, img in enumerate(images):
            if not isinstance(img, np.ndarray):
                raise ValueError(f"{what}[{k}]: expected a uint8 (H, W, 3) array")
            _check_array(img, f"{what}[{k}]")
        return list(images)
    if isinstance(images, np.ndarray):
        num_images(images, what)
        x = images[None] if images.ndim == 3 else images
        if x.dtype != np.uint8 or x.shape[-1] != 3:
            raise ValueError(
                f"{what}: expected uint8 (B, H, W, 3) arrays, got {x.dtype} {images.shape}"
            )
        return list(x)
    out: list[np.ndarray] = []
    for batch in iter_float_batches(images, 256, what):
        out.extend(to_uint8(batch))
    return out


def resized_float_batch(images: ImageBatch, size: int, what: str = "images") -> torch.Tensor:
    """All images resized to ``size`` x ``size`` as one float (B, 3, size, size) tensor in [-1, 1].

    Sizes may differ on input; non-square images are squashed (fundus and endoscopy images are
    usually square; crop them first with ``generators.images.center_square`` if not).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return torch.cat([resize(b, size) for b in iter_float_batches(images, 256, what)])
