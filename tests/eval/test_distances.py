import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from torchmetrics.image.kid import poly_mmd

from eval.distances import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    kernel_inception_distance,
    polynomial_mmd,
    trace_sqrt_product,
)


def test_frechet_distance_from_diagonal_statistics_by_hand():
    # FD = ||mu1 - mu2||^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))
    #    = (1 + 4) + (2 + 8 - 2*4) + (8 + 2 - 2*4) = 5 + 2 + 2 = 9
    fd = frechet_distance_from_statistics(
        np.array([1.0, 0.0]), np.diag([2.0, 8.0]), np.array([0.0, 2.0]), np.diag([8.0, 2.0])
    )
    assert fd == pytest.approx(9.0)


def test_frechet_distance_of_diagonal_gaussian_samples():
    # Rows built so each set has exactly diagonal sample covariance: +-sigma pairs per axis.
    def set_with(mu, var):
        d = len(mu)
        n = 2 * d
        x = np.tile(np.asarray(mu, float), (n, 1))
        for k in range(d):
            # 2 rows differ only in dim k: sample variance over 2d rows = 2 s^2 / (2d - 1)
            s = np.sqrt(var[k] * (n - 1) / 2)
            x[2 * k, k] += s
            x[2 * k + 1, k] -= s
        return x

    mu1, v1 = [0.0, 1.0, 2.0], [1.0, 4.0, 9.0]
    mu2, v2 = [1.0, 1.0, 0.0], [4.0, 4.0, 1.0]
    a, b = set_with(mu1, v1), set_with(mu2, v2)
    np.testing.assert_allclose(feature_statistics(a)[1], np.diag(v1), atol=1e-12)
    expected = sum((x - y) ** 2 for x, y in zip(mu1, mu2, strict=True)) + sum(
        s1 + s2 - 2 * np.sqrt(s1 * s2) for s1, s2 in zip(v1, v2, strict=True)
    )
    # = (1 + 0 + 4) + ((1+4-4) + (4+4-8) + (9+1-6)) = 5 + 1 + 0 + 4 = 10
    assert expected == pytest.approx(10.0)
    assert frechet_distance(a, b) == pytest.approx(10.0)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(10.0)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(0).normal(size=(50, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    few = np.random.default_rng(1).normal(size=(5, 64))  # low-rank path
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)


def test_low_rank_path_equals_full_covariance_path():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) + 0.5
    full = frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))
    # The (D, D) path takes square roots of rounding-level eigenvalues of the rank-deficient
    # covariances (~1e-8 each); the low-rank path is exact.
    assert frechet_distance(a, b) == pytest.approx(full, rel=1e-6)


def test_trace_sqrt_product_commuting_case():
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert trace_sqrt_product(s1, s2) == pytest.approx(3.0 + 2.0)


def test_agrees_with_torchmetrics_compute_fid():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 1.0
    ma, sa = feature_statistics(a)
    mb, sb = feature_statistics(b)
    ref = _compute_fid(*(torch.from_numpy(v) for v in (ma, sa, mb, sb)))
    assert frechet_distance(a, b) == pytest.approx(float(ref), rel=1e-6)


class _Identity(nn.Module):
    num_features = 6

    def forward(self, x):
        return x


def test_agrees_with_torchmetrics_fid_metric_on_features():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.normal(size=(120, 6)))
    b = torch.from_numpy(rng.normal(size=(80, 6)) * 1.5 + 0.3)
    metric = FrechetInceptionDistance(feature=_Identity())
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_fid_grows_with_shift():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(100, 4))
    near = frechet_distance(a, rng.normal(size=(100, 4)) + 0.1)
    far = frechet_distance(a, rng.normal(size=(100, 4)) + 2.0)
    assert near < far
    assert far == pytest.approx(4 * 4.0, rel=0.2)  # ||shift||^2 = 4 * 2^2


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros(5), np.zeros((5, 2)), "2-D"),
        (np.zeros((1, 2)), np.zeros((5, 2)), "at least 2 rows"),
        (np.zeros((5, 3)), np.zeros((5, 2)), "same feature dimension"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros((5, 2)), "finite"),
        ("features", np.zeros((5, 2)), "2-D array"),
    ],
)
def test_frechet_distance_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


def test_frechet_from_statistics_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected mu"):
        frechet_distance_from_statistics(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_kid_identical_is_zero_and_shifted_is_positive():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(200, 16))
    same = kernel_inception_distance(a, rng.normal(size=(200, 16)), subsets=20, subset_size=100)
    shifted = kernel_inception_distance(a, a + 1.0, subsets=20, subset_size=100)
    assert abs(same.mean) < 0.02
    assert shifted.mean > 0.5 and shifted.mean > 20 * abs(same.mean)
    assert same.std >= 0 and same.subset_size == 100
    # A set against itself: the unbiased estimate is exactly (2/m)(mean k(x,y), x != y, minus
    # mean k(x,x)), a -O(1/m) bias that vanishes with m.
    m = 200
    k = (a @ a.T / a.shape[1] + 1.0) ** 3
    off = (k.sum() - np.trace(k)) / (m * (m - 1))
    itself = kernel_inception_distance(a, a, subsets=2, subset_size=m)
    assert itself.mean == pytest.approx(2 / m * (off - np.trace(k) / m), rel=1e-9)
    assert abs(itself.mean) < 0.1 * shifted.mean


def test_kid_matches_torchmetrics_poly_mmd_on_full_sets():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.5
    ref = float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b)))
    assert polynomial_mmd(a, b) == pytest.approx(ref, rel=1e-9)
    # subset_size = N draws permutations of the whole sets: MMD is permutation-invariant
    kid = kernel_inception_distance(a, b, subsets=3, subset_size=40)
    assert kid.mean == pytest.approx(ref, rel=1e-9)
    assert kid.std == pytest.approx(0.0, abs=1e-9)


def test_kid_rejects_bad_subset_size():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(a, a, subset_size=11)
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(a, a, subsets=0)


def test_inception_score_by_hand():
    k = 4
    one_hot = np.eye(k)[np.arange(40) % k]  # confident and evenly spread: IS = K
    assert inception_score(one_hot, splits=1).mean == pytest.approx(k)
    uniform = np.full((10, k), 1 / k)  # no confidence: IS = 1
    assert inception_score(uniform, splits=2).mean == pytest.approx(1.0)
    logits = np.log(one_hot * 0.9 + 0.1 / k)
    r = inception_score(logits, splits=4)  # auto-detected as logits
    assert 1.0 < r.mean < k and r.splits == 4


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.eye(3), splits=5)
    with pytest.raises(ValueError, match="not probabilities"):
        inception_score(np.full((4, 3), 0.5), splits=2, from_logits=False)
    with pytest.raises(ValueError, match="2 classes"):
        inception_score(np.ones((4, 1)))
