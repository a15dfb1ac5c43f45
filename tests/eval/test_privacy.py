import numpy as np
import pytest

from eval.features import FallbackFeatures
from eval.privacy import nearest_neighbours, privacy_report
from tests.eval.conftest import fundus_phantom


def test_nearest_neighbours_by_hand():
    ref = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    q = np.array([[3.0, 3.0], [9.0, 1.0]])
    d, i = nearest_neighbours(q, ref)
    np.testing.assert_allclose(d[:, 0], [1.0, np.sqrt(2)])
    np.testing.assert_array_equal(i[:, 0], [1, 2])
    d2, i2 = nearest_neighbours(q, ref, k=2)
    np.testing.assert_allclose(d2[0], [1.0, np.sqrt(18)])
    dc, ic = nearest_neighbours(np.array([[1.0, 0.1]]), ref[1:], "cosine")
    assert ic[0, 0] == 1 and dc[0, 0] == pytest.approx(1 - 1 / np.sqrt(1.01))


@pytest.fixture(scope="module")
def planted():
    """Training phantoms; generated = a noisy copy of train[3] + genuinely different images."""
    train = np.stack([fundus_phantom(64, seed=s) for s in range(12)])
    holdout = np.stack([fundus_phantom(64, seed=s) for s in range(100, 120)])
    rng = np.random.default_rng(0)
    copy = np.clip(train[3].astype(int) + rng.integers(-2, 3, train[3].shape), 0, 255)
    # different images: no vessels, a paler fundus (not samples of the training distribution)
    new = np.stack([fundus_phantom(64, vessels=False, seed=s) for s in range(200, 205)])
    new = np.clip(new.astype(int) + 30, 0, 255).astype(np.uint8)
    generated = np.concatenate([copy[None].astype(np.uint8), new])
    ext = FallbackFeatures()
    return {
        "train": train,
        "holdout": holdout,
        "generated": generated,
        "f_train": ext(train),
        "f_holdout": ext(holdout),
        "f_generated": ext(generated),
    }


def test_planted_near_copy_is_flagged_and_new_images_are_not(planted):
    p = planted
    r = privacy_report(
        p["f_generated"],
        p["f_train"],
        p["f_holdout"],
        generated_images=p["generated"],
        train_images=p["train"],
        holdout_images=p["holdout"],
        feature_name="fallback",
    )
    assert [c.generated_index for c in r.near_copies] == [0]
    copy = r.near_copies[0]
    assert copy.train_index == 3
    assert copy.ssim > 0.95 and len(copy.reasons) == 2
    assert r.generated_ssim_max[1:].max() < 0.95
    assert r.generated_dcr[0] < r.feature_threshold < r.generated_dcr[1:].min()
    assert r.feature_threshold == pytest.approx(np.percentile(r.holdout_dcr, 1.0))
    s = r.summary()
    assert s["n_near_copies"] == 1 and "holdout_ssim_max_median" in s
    assert s["fraction_below_threshold"] == pytest.approx(1 / 6)
    assert s["expected_fraction_if_novel"] == pytest.approx(0.01)
    assert any("near copies: 1 of 6" in line for line in r.lines())


def test_rules_are_skipped_when_inputs_are_missing(planted):
    p = planted
    r = privacy_report(p["f_generated"], p["f_train"])  # no holdout, no images
    assert r.near_copies == [] and len(r.skipped_rules) == 2
    r2 = privacy_report(
        p["f_generated"], p["f_train"], generated_images=p["generated"], train_images=p["train"]
    )
    assert [c.generated_index for c in r2.near_copies] == [0]
    assert len(r2.skipped_rules) == 1
    assert r2.near_copies[0].reasons[0].startswith("SSIM")


def test_bad_input_is_rejected(planted):
    p = planted
    with pytest.raises(ValueError, match="same feature dimension"):
        nearest_neighbours(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbours(np.zeros((2, 3)), np.zeros((2, 3)), "l1")
    with pytest.raises(ValueError, match="percentile"):
        privacy_report(p["f_generated"], p["f_train"], percentile=0)
    with pytest.raises(ValueError, match="give both or neither"):
        privacy_report(p["f_generated"], p["f_train"], generated_images=p["generated"])
    with pytest.raises(ValueError, match="one image per feature row"):
        privacy_report(
            p["f_generated"],
            p["f_train"],
            generated_images=p["generated"][:2],
            train_images=p["train"],
        )


def test_memorising_generator_exceeds_the_expected_fraction(planted):
    p = planted
    rng = np.random.default_rng(1)
    copies = np.clip(p["train"][:6].astype(int) + rng.integers(-2, 3, (6, 64, 64, 3)), 0, 255)
    f_copies = FallbackFeatures()(copies.astype(np.uint8))
    s = privacy_report(f_copies, p["f_train"], p["f_holdout"]).summary()
    assert s["fraction_below_threshold"] == 1.0 > 10 * s["expected_fraction_if_novel"]
    assert s["dcr_median_ratio"] < 0.5
