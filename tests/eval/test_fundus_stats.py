import numpy as np
import pytest
from scipy import ndimage
from skimage import data, transform

from eval.fundus_stats import (
    STAT_NAMES,
    compare_fundus_stats,
    fov_mask,
    fundus_statistics,
    image_statistics,
)
from tests.eval.conftest import fundus_phantom


def _blur(img, sigma):
    out = [ndimage.gaussian_filter(img[..., c].astype(float), sigma) for c in range(3)]
    return np.clip(np.stack(out, -1).round(), 0, 255).astype(np.uint8)


def test_fov_mask_finds_the_disc():
    img = fundus_phantom(128)
    mask = fov_mask(img)
    # PIL draws the disc over [8, 120] inclusive: diameter 113 px, area pi * 56.5^2
    assert mask.sum() == pytest.approx(np.pi * 56.5**2, rel=0.05)
    assert not mask[0, 0] and mask[64, 64]
    assert fov_mask(np.zeros((32, 32, 3), np.uint8)).all()  # no FOV found: whole image


def test_vessels_raise_vessel_visibility_and_sharpness():
    with_v = image_statistics(fundus_phantom(128, vessels=True))
    without = image_statistics(fundus_phantom(128, vessels=False))
    assert with_v["vessel_visibility"] > 2 * without["vessel_visibility"]
    assert with_v["sharpness"] > without["sharpness"]
    assert with_v["contrast"] > without["contrast"]


def test_real_retina_beats_its_blurred_copy():
    retina = (transform.resize(data.retina(), (192, 192), anti_aliasing=True) * 255).astype(
        np.uint8
    )
    sharp, blurred = image_statistics(retina), image_statistics(_blur(retina, 4))
    assert sharp["vessel_visibility"] > 10 * blurred["vessel_visibility"]
    assert sharp["sharpness"] > 10 * blurred["sharpness"]
    assert sharp["snr"] < blurred["snr"]  # blurring removes fine-scale fluctuation


def test_noise_lowers_snr_and_vignetting_lowers_uniformity():
    img = fundus_phantom(128, vessels=False)
    rng = np.random.default_rng(0)
    noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    base = image_statistics(img)
    assert image_statistics(noisy)["snr"] < base["snr"] / 2
    yy, xx = np.mgrid[:128, :128]
    falloff = 1.0 - 0.8 * ((xx - 20) / 128.0).clip(0, 1)  # dark towards the right
    vignetted = (img * falloff[..., None]).astype(np.uint8)
    assert image_statistics(vignetted)["illumination_uniformity"] < base["illumination_uniformity"]
    assert base["illumination_uniformity"] > 0.85  # an evenly lit disc is close to 1


def test_statistics_of_a_set_and_the_comparison_table(phantoms):
    stats = fundus_statistics(phantoms[:3], size=48)
    assert stats.n == 3 and set(stats.values) == set(STAT_NAMES)
    flat = np.stack([fundus_phantom(64, vessels=False, seed=s) for s in range(3)])
    table = compare_fundus_stats(real=phantoms[:3], generated=flat)
    assert table.size == 64 and table.n_real == 3 and table.n_generated == 3
    rows = {r.stat: r for r in table.rows}
    assert rows["vessel_visibility"].ratio < 0.6  # the generator lost the vessels
    assert rows["fov_fraction"].ratio == pytest.approx(1.0, abs=0.05)
    assert rows["snr"].ratio == pytest.approx(rows["snr"].generated_mean / rows["snr"].real_mean)
    md = table.to_markdown()
    assert "| vessel_visibility |" in md and "generated / real" in md


def test_mixed_sizes_are_brought_to_one_resolution(phantoms):
    big = fundus_phantom(96)
    table = compare_fundus_stats(real=[big, phantoms[0]], generated=phantoms[:2])
    assert table.size == 64


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        image_statistics(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="16 px"):
        image_statistics(np.full((8, 8, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="size"):
        fundus_statistics(fundus_phantom(32)[None], size=8)
    with pytest.raises(ValueError, match="threshold"):
        fov_mask(fundus_phantom(32), threshold=1.5)
