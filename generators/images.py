"""Image I/O and transforms, written with PIL, pydicom and torch (no torchvision here).

Conventions used across medrl:
- an *array image* is ``numpy.uint8`` of shape (H, W, 3), RGB;
- a *tensor image* is ``torch.float32`` of shape (3, H, W) or (B, 3, H, W) in [-1, 1]
  (what the VAE takes and returns).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from runfiles import atomic_path

#: File suffixes the data tools decode.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm")


class ImageDecodeError(ValueError):
    """The file exists but is not an image we can decode; the message names it."""


def _dicom_to_array(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise ImageDecodeError(f"{path}: reading DICOM needs pydicom") from exc
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageDecodeError(f"{path}: not a decodable DICOM image ({exc})") from exc
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):  # multi-frame: first frame
        pixels = pixels[0]
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = np.zeros_like(pixels) if hi <= lo else (pixels - lo) / (hi - lo) * 255.0
    arr = scaled.round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file (PNG/JPEG/TIFF/BMP/WebP or DICOM) as RGB uint8 (H, W, 3).

    Raises:
        FileNotFoundError: no such file.
        ImageDecodeError: the file does not decode as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if path.suffix.lower() == ".dcm":
        return _dicom_to_array(path)
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for broken files
        raise ImageDecodeError(f"{path}: not a decodable image ({exc})") from exc


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) or (B, H, W, 3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) or (C, H, W) float images to size x size (antialiased bicubic)."""
    batched = images.dim() == 4
    x = images if batched else images.unsqueeze(0)
    if x.shape[-2:] != (size, size):
        down = x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=down, align_corners=False)
        x = x.clamp(-1, 1)
    return x if batched else x[0]


def center_square(image: np.ndarray) -> np.ndarray:
    """Crop the largest centred square (fundus photographs are often wider than tall)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def make_grid(
    images: Sequence[np.ndarray], ncols: int = 8, labels: Sequence[str] | None = None, pad: int = 2
) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into one array, optional one-line label under each."""
    if not images:
        raise ValueError("make_grid: no images")
    h, w = images[0].shape[:2]
    ncols = max(1, min(ncols, len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    label_h = 12 if labels else 0
    grid = np.full(
        (nrows * (h + pad + label_h) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8
    )
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad + label_h), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    if labels:
        pil = Image.fromarray(grid)
        draw = ImageDraw.Draw(pil)
        for i, text in enumerate(labels):
            r, c = divmod(i, ncols)
            y, x = pad + r * (h + pad + label_h) + h, pad + c * (w + pad)
            draw.text((x + 1, y), str(text)[: max(4, w // 6)], fill=(0, 0, 0))
        grid = np.asarray(pil)
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W, 3) array as PNG atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
