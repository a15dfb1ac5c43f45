"""Sample diversity: mean pairwise SSIM and MS-SSIM among images of the same prompt.

Lower similarity means more diverse samples. The same statistic on real images (grouped by
their prompt or label, or pooled) is the reference: a generator whose same-prompt samples are
much more similar to one another than real images of that description has collapsed.

SSIM and MS-SSIM are torchmetrics' functional implementations (Gaussian window 11, sigma 1.5,
k1 = 0.01, k2 = 0.03) on RGB in [0, 1] (data range 1), averaged over the three channels.

MS-SSIM on small images: the standard five scales (betas 0.0448, 0.2856, 0.3001, 0.2363,
0.1333) need images of at least 176 px (torchmetrics' check). For smaller images
``small_images="fewer_scales"`` (default) keeps the first ``s`` betas that fit and
renormalises them to sum to 1 (64 px -> 3 scales); ``"upsample"`` instead upsamples the
images (bicubic) to 176 px on the shorter side and uses all five. The result records which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from eval.image_batch import (
    ImageBatch,
    as_float_batch,
    iter_float_batches,
    num_images,
    resized_float_batch,
)

#: The five MS-SSIM exponents of Wang et al. (2003).
STANDARD_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 11
#: Shortest side that torchmetrics accepts for all five scales with an 11-px window.
MIN_SIDE_FIVE_SCALES = 176

SmallImages = Literal["fewer_scales", "upsample"]


def ms_ssim_scales(height: int, width: int, kernel_size: int = KERNEL_SIZE) -> int:
    """Most MS-SSIM scales (<= 5) that torchmetrics accepts for an image of this size.

    torchmetrics requires ``side >= 2**s`` and ``side // max(1, s - 1)**2 > kernel_size - 1``.
    Returns 0 when even plain SSIM does not fit (side < kernel_size).
    """
    side = min(height, width)
    for s in range(len(STANDARD_BETAS), 0, -1):
        if side >= 2**s and side // max(1, s - 1) ** 2 > kernel_size - 1:
            return s
    return 0


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """The first ``scales`` standard betas, renormalised to sum to 1."""
    if not 1 <= scales <= len(STANDARD_BETAS):
        raise ValueError(f"scales: expected 1..{len(STANDARD_BETAS)}, got {scales}")
    head = STANDARD_BETAS[:scales]
    total = sum(head)
    return tuple(float(b / total) for b in head)


def _to_unit(images: ImageBatch, size: int | None, what: str) -> torch.Tensor:
    x = resized_float_batch(images, size, what) if size else as_float_batch(images, what)
    return x.add(1).div(2).clamp(0, 1)


def _pairs(n: int, max_pairs: int | None, rng: np.random.Generator) -> np.ndarray:
    i, j = np.triu_indices(n, k=1)
    pairs = np.stack([i, j], axis=1)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
    return pairs


def _ssim_pairs(x: torch.Tensor, pairs: np.ndarray, betas: tuple[float, ...] | None) -> np.ndarray:
    out = []
    for k in range(0, len(pairs), 32):
        p = torch.as_tensor(pairs[k : k + 32])
        a, b = x[p[:, 0]], x[p[:, 1]]
        if betas is None:
            v = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
        else:
            v = multiscale_structural_similarity_index_measure(
                a, b, data_range=1.0, reduction="none", betas=betas, normalize="relu"
            )
        out.append(v.reshape(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@dataclass(frozen=True)
class GroupDiversity:
    """Pairwise similarity within one prompt's images."""

    n_images: int
    n_pairs: int
    ssim: float
    ms_ssim: float


@dataclass
class DiversityResult:
    """Per-prompt and overall mean pairwise SSIM / MS-SSIM (lower = more diverse).

    ``ssim`` and ``ms_ssim`` are the unweighted means over prompts that have at least two
    images; ``single_image_prompts`` lists the others (they have no pairs).
    """

    per_prompt: dict[str, GroupDiversity]
    ssim: float
    ms_ssim: float
    ms_ssim_scales: int
    ms_ssim_betas: tuple[float, ...]
    ms_ssim_mode: str
    image_size: tuple[int, int]
    single_image_prompts: list[str] = field(default_factory=list)

    def lines(self, label: str = "") -> list[str]:
        """Human-readable summary lines."""
        head = f"{label}: " if label else ""
        out = [
            f"{head}mean pairwise SSIM {self.ssim:.4f}, MS-SSIM {self.ms_ssim:.4f} "
            f"over {len(self.per_prompt) - len(self.single_image_prompts)} prompt(s), "
            f"images {self.image_size[0]}x{self.image_size[1]} (lower = more diverse)",
            f"{head}MS-SSIM with {self.ms_ssim_scales} scale(s) ({self.ms_ssim_mode})",
        ]
        if self.single_image_prompts:
            out.append(f"{head}{len(self.single_image_prompts)} prompt(s) with one image: no pairs")
        return out


def diversity_by_prompt(
    images: ImageBatch,
    prompts: Sequence[str] | None = None,
    size: int | None = None,
    max_pairs_per_prompt: int | None = None,
    small_images: SmallImages = "fewer_scales",
    seed: int = 0,
) -> DiversityResult:
    """Mean pairwise SSIM and MS-SSIM among the images of each prompt.

    Args:
        images: the images (one size, or give ``size``).
        prompts: one prompt (or label) per image; ``None`` pools all images into one group.
        size: resize every image to ``size`` x ``size`` first (needed when sizes differ).
        max_pairs_per_prompt: cap on pairs per prompt (a random subset, seeded); ``None`` all.
        small_images: what MS-SSIM does below 176 px (see the module docstring).
        seed: seed of the pair subsampling.

    Raises:
        ValueError: bad images, prompts of the wrong length, images smaller than the
            11-px SSIM window, or an unknown ``small_images``.
    """
    n = num_images(images, "images")
    if prompts is None:
        prompts = ["(all)"] * n
    if isinstance(prompts, str) or len(prompts) != n:
        got = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"prompts: expected one prompt per image ({n}), got {got}")
    if small_images not in ("fewer_scales", "upsample"):
        raise ValueError(
            f"small_images: expected 'fewer_scales' or 'upsample', got {small_images!r}"
        )
    x = _to_unit(images, size, "images")
    h, w = x.shape[-2:]
    if min(h, w) < KERNEL_SIZE:
        raise ValueError(
            f"images: expected at least {KERNEL_SIZE} px per side for SSIM, got {h}x{w}"
        )
    x_ms = x
    scales = ms_ssim_scales(h, w)
    mode = "standard five scales"
    if scales < len(STANDARD_BETAS):
        if small_images == "upsample":
            f = MIN_SIDE_FIVE_SCALES / min(h, w)
            new = (math.ceil(h * f), math.ceil(w * f))
            x_ms = F.interpolate(x, size=new, mode="bicubic", align_corners=False).clamp(0, 1)
            scales, mode = len(STANDARD_BETAS), f"upsampled to {new[0]}x{new[1]}, five scales"
        else:
            mode = f"fewer scales: {scales} of 5 for {h}x{w} images, betas renormalised"
    betas = ms_ssim_betas(scales)

    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for k, p in enumerate(prompts):
        groups.setdefault(str(p), []).append(k)
    per_prompt: dict[str, GroupDiversity] = {}
    single: list[str] = []
    for prompt, idx in groups.items():
        if len(idx) < 2:
            single.append(prompt)
            per_prompt[prompt] = GroupDiversity(len(idx), 0, math.nan, math.nan)
            continue
        pairs = np.asarray(idx)[_pairs(len(idx), max_pairs_per_prompt, rng)]
        ssim = _ssim_pairs(x, pairs, None)
        ms = _ssim_pairs(x_ms, pairs, betas)
        per_prompt[prompt] = GroupDiversity(
            len(idx), len(pairs), float(ssim.mean()), float(ms.mean())
        )
    scored = [g for g in per_prompt.values() if g.n_pairs > 0]
    return DiversityResult(
        per_prompt=per_prompt,
        ssim=float(np.mean([g.ssim for g in scored])) if scored else math.nan,
        ms_ssim=float(np.mean([g.ms_ssim for g in scored])) if scored else math.nan,
        ms_ssim_scales=scales,
        ms_ssim_betas=betas,
        ms_ssim_mode=mode,
        image_size=(int(h), int(w)),
        single_image_prompts=single,
    )


def compare_diversity(
    generated: ImageBatch,
    generated_prompts: Sequence[str],
    real: ImageBatch,
    real_prompts: Sequence[str] | None = None,
    size: int | None = None,
    max_pairs_per_prompt: int | None = 200,
    small_images: SmallImages = "fewer_scales",
    seed: int = 0,
) -> dict[str, DiversityResult]:
    """The diversity statistic on generated images and, for reference, on real images.

    Both sets are brought to the same size (``size``, or the generated images' size) so the
    two numbers use the same MS-SSIM scales. ``real_prompts=None`` pools the real images.

    Returns:
        ``{"generated": DiversityResult, "real": DiversityResult}``.
    """
    if size is None:  # the generated images' size (their first image's shorter side)
        first = next(iter_float_batches(generated, 1, "generated"))
        size = int(min(first.shape[-2:]))
    gen = diversity_by_prompt(
        generated, generated_prompts, size, max_pairs_per_prompt, small_images, seed
    )
    ref = diversity_by_prompt(real, real_prompts, size, max_pairs_per_prompt, small_images, seed)
    return {"generated": gen, "real": ref}
