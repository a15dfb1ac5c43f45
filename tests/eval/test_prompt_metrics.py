import math

import numpy as np
import pytest

from eval.distances import frechet_distance
from eval.prompt_metrics import (
    agreement,
    fidelity,
    group_by_prompt,
    mean_pairwise_distance,
    prompt_metrics,
)


def _gauss(n, d, shift, seed):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fidelity_formula_and_closer_set_scores_higher():
    real = _gauss(60, 4, 0.0, 0)
    close, far = _gauss(30, 4, 0.1, 1), _gauss(30, 4, 2.0, 2)
    assert fidelity(close, real) == pytest.approx(1000 / (1 + frechet_distance(close, real)))
    assert fidelity(close, real) > fidelity(far, real)
    assert fidelity(real, real) == pytest.approx(1000.0)


def test_mean_pairwise_distance_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # unit vectors at 0, 90, 180 degrees: L2 distances sqrt2, 2, sqrt2
    assert mean_pairwise_distance(x) == pytest.approx((2 * np.sqrt(2) + 2) / 3)
    assert mean_pairwise_distance(3 * x, "l2") == pytest.approx(3 * (2 * np.sqrt(2) + 2) / 3)
    assert mean_pairwise_distance(x, "cosine") == pytest.approx((1 + 2 + 1) / 3)
    with pytest.raises(ValueError, match="distance"):
        mean_pairwise_distance(x, "manhattan")


def test_agreement_by_hand():
    group = {
        "a polyp": np.array([[1.0, 0.0], [1.0, 0.0]]),
        "one polyp": np.array([[1.0, 1.0]]),  # cos 45 deg with both
        "a single polyp": np.array([[0.0, 2.0]]),
    }
    c = 1 / np.sqrt(2)
    # pairs: (a, one) = c, (a, single) = 0, (one, single) = c
    assert agreement(group) == pytest.approx((c + 0 + c) / 3)
    with pytest.raises(ValueError, match=">= 2 prompts"):
        agreement({"only": np.ones((2, 2))})


def test_every_prompt_is_scored_with_a_global_reference():
    real = _gauss(80, 6, 0.0, 0)
    gen = {f"prompt {k}": _gauss(10, 6, 0.3 * k, k + 1) for k in range(5)}
    groups = {"g0": ["prompt 0", "prompt 1"], "g1": ["prompt 2", "prompt 3", "prompt 4"]}
    r = prompt_metrics(gen, real, groups, feature_name="toy", comparable=False)
    assert set(r.fd) == set(gen) == set(r.fidelity_per_prompt) == set(r.diversity_per_prompt)
    assert r.fidelity_per_prompt["prompt 0"] > r.fidelity_per_prompt["prompt 4"]
    assert r.fidelity == pytest.approx(1000 / (1 + np.mean(list(r.fd.values()))))
    assert r.fidelity_mean == pytest.approx(np.mean(list(r.fidelity_per_prompt.values())))
    assert r.fbd == pytest.approx(frechet_distance(np.concatenate(list(gen.values())), real))
    assert r.agreement == pytest.approx(np.mean(list(r.agreement_per_group.values())))
    assert r.diversity == pytest.approx(np.mean([mean_pairwise_distance(f) for f in gen.values()]))
    lines = r.lines()
    assert len(lines) == 4 and all("toy" in s and "NOT comparable" in s for s in lines)


def test_per_prompt_references_and_no_groups():
    real = {"a": _gauss(12, 3, 0.0, 0), "b": _gauss(12, 3, 5.0, 1)}
    gen = {"a": _gauss(8, 3, 0.0, 2), "b": _gauss(8, 3, 0.0, 3)}
    r = prompt_metrics(gen, real)
    assert r.fidelity_per_prompt["a"] > r.fidelity_per_prompt["b"]  # b's real images differ
    assert math.isnan(r.agreement) and "same prompt" in r.reference


def test_group_by_prompt():
    feats = np.arange(12.0).reshape(6, 2)
    g = group_by_prompt(feats, ["x", "y", "x", "y", "x", "z"])
    assert list(g) == ["x", "y", "z"]
    np.testing.assert_array_equal(g["x"], feats[[0, 2, 4]])
    with pytest.raises(ValueError, match="one prompt per feature row"):
        group_by_prompt(feats, ["x"])


def test_bad_input_names_the_prompt():
    real = _gauss(20, 3, 0, 0)
    with pytest.raises(ValueError, match="'lonely'"):
        prompt_metrics({"ok": _gauss(4, 3, 0, 1), "lonely": _gauss(1, 3, 0, 2)}, real)
    with pytest.raises(ValueError, match="no reference features"):
        prompt_metrics({"a": _gauss(4, 3, 0, 1)}, {"b": real})
    with pytest.raises(ValueError, match="not generated"):
        prompt_metrics({"a": _gauss(4, 3, 0, 1)}, real, {"g": ["a", "missing"]})
    with pytest.raises(ValueError, match="feature dimension"):
        prompt_metrics({"a": _gauss(4, 5, 0, 1)}, real)
    with pytest.raises(ValueError, match="at least one prompt"):
        prompt_metrics({}, real)
