"""Small synthetic images shared by the eval tests (drawn, never downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter


def fundus_phantom(size: int = 128, vessels: bool = True, seed: int = 0) -> np.ndarray:
    """An orange disc on black, a bright optic disc, and (optionally) dark curved vessels."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(im)
    m = size // 16
    d.ellipse([m, m, size - m, size - m], fill=(200, 90, 40))
    cx, cy = int(size * 0.65), int(size * 0.5)
    r = size // 12
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(245, 200, 120))
    if vessels:
        for k in range(6):
            angle = k * np.pi / 3 + rng.uniform(-0.2, 0.2)
            pts = []
            for t in np.linspace(0, 1, 20):
                rad = r + t * size * 0.38
                a = angle + 0.6 * t * np.sin(3 * t + k)
                pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
            d.line(pts, fill=(110, 25, 15), width=max(1, size // 64))
    im = im.filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(im).astype(np.int16)
    arr = arr + rng.integers(-3, 4, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def phantoms() -> np.ndarray:
    """Eight 64-px phantoms with vessels (different seeds)."""
    return np.stack([fundus_phantom(64, True, seed=s) for s in range(8)])
