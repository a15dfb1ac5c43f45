import math

import numpy as np
import pytest
import torch

from eval.diversity import (
    MIN_SIDE_FIVE_SCALES,
    STANDARD_BETAS,
    compare_diversity,
    diversity_by_prompt,
    ms_ssim_betas,
    ms_ssim_scales,
)


def _noise(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_identical_images_have_ssim_one(phantoms):
    same = np.repeat(phantoms[:1], 4, axis=0)
    r = diversity_by_prompt(same, ["p"] * 4)
    assert r.per_prompt["p"].n_pairs == 6
    assert r.ssim == pytest.approx(1.0, abs=1e-5)
    assert r.ms_ssim == pytest.approx(1.0, abs=1e-5)


def test_different_images_are_less_similar_and_grouped_by_prompt(phantoms):
    noise = _noise(4, 64, 0)
    images = np.concatenate([np.repeat(phantoms[:1], 4, axis=0), noise])
    prompts = ["same"] * 4 + ["noise"] * 4
    r = diversity_by_prompt(images, prompts)
    assert set(r.per_prompt) == {"same", "noise"}
    assert r.per_prompt["noise"].ssim < 0.1 < r.per_prompt["same"].ssim
    assert r.ssim == pytest.approx((r.per_prompt["same"].ssim + r.per_prompt["noise"].ssim) / 2)


def test_ms_ssim_scale_rule():
    assert ms_ssim_scales(256, 256) == 5
    assert ms_ssim_scales(MIN_SIDE_FIVE_SCALES, 300) == 5
    assert ms_ssim_scales(175, 175) == 4
    assert ms_ssim_scales(64, 64) == 3
    assert ms_ssim_scales(32, 32) == 2
    assert ms_ssim_scales(8, 8) == 0
    assert sum(ms_ssim_betas(3)) == pytest.approx(1.0)
    assert ms_ssim_betas(5) == pytest.approx(tuple(b / sum(STANDARD_BETAS) for b in STANDARD_BETAS))


def test_small_images_fewer_scales_or_upsample(phantoms):
    few = diversity_by_prompt(phantoms[:3], None)
    assert few.ms_ssim_scales == 3 and "fewer scales" in few.ms_ssim_mode
    up = diversity_by_prompt(phantoms[:3], None, small_images="upsample")
    assert up.ms_ssim_scales == 5 and "upsampled to 176x176" in up.ms_ssim_mode
    assert 0 < few.ms_ssim <= 1 and 0 < up.ms_ssim <= 1
    assert few.ssim == pytest.approx(up.ssim)  # plain SSIM is unaffected


def test_single_image_prompt_is_reported_not_scored(phantoms):
    r = diversity_by_prompt(phantoms[:3], ["a", "a", "b"])
    assert r.single_image_prompts == ["b"]
    assert math.isnan(r.per_prompt["b"].ssim)
    assert r.ssim == pytest.approx(r.per_prompt["a"].ssim)
    assert any("one image" in line for line in r.lines())


def test_max_pairs_caps_the_pairs(phantoms):
    r = diversity_by_prompt(phantoms, None, max_pairs_per_prompt=5)
    assert r.per_prompt["(all)"].n_pairs == 5


def test_compare_diversity_real_reference(phantoms):
    gen = np.repeat(phantoms[:1], 4, axis=0)  # collapsed generator
    real = torch.from_numpy(phantoms).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    out = compare_diversity(gen, ["p"] * 4, real)
    assert out["generated"].ssim > out["real"].ssim
    assert out["real"].image_size == (64, 64)


def test_bad_input_is_rejected(phantoms):
    with pytest.raises(ValueError, match="one prompt per image"):
        diversity_by_prompt(phantoms[:3], ["a", "b"])
    with pytest.raises(ValueError, match="at least 11 px"):
        diversity_by_prompt(_noise(2, 8, 0))
    with pytest.raises(ValueError, match="small_images"):
        diversity_by_prompt(phantoms[:2], small_images="crop")
    with pytest.raises(ValueError, match="one size"):
        diversity_by_prompt([phantoms[0], _noise(1, 32, 0)[0]])
