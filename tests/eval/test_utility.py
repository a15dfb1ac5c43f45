import numpy as np
import pytest
import torch

from eval.utility import TinyCNN, generation_accuracy, train_classifier, utility_report


def _colour_task(n, seed, size=16):
    """Class 0 reddish, class 1 bluish, with heavy noise: separable, not trivially."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels[:, None] == 0, [150, 60, 60], [60, 60, 150])
    imgs = base[:, None, None, :] + rng.normal(0, 40, (n, size, size, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8), labels


def test_classifier_beats_chance_on_a_separable_task():
    x, y = _colour_task(96, 0)
    xt, yt = _colour_task(64, 1)
    model = train_classifier(x, y, epochs=4, input_size=16)
    assert isinstance(model, TinyCNN) and not model.training
    assert generation_accuracy(model, xt, yt) > 0.9
    again = train_classifier(x, y, epochs=4, input_size=16)  # deterministic for a seed
    torch.testing.assert_close(model.head.weight, again.head.weight)


def test_utility_report_real_synthetic_and_both():
    real, yr = _colour_task(64, 0)
    synth, ys = _colour_task(64, 2)
    bad_synth = synth.copy()  # labels shuffled: synthetic data without class information
    test, yt = _colour_task(64, 3)
    r = utility_report(real, yr, synth, ys, test, yt, epochs=4, input_size=16)
    assert r.real > 0.9 and r.synthetic > 0.9 and r.real_plus_synthetic > 0.9
    assert 0.5 <= r.chance < 0.7 and r.n_test == 64
    shuffled = np.random.default_rng(9).permutation(ys)
    r_bad = utility_report(real, yr, bad_synth, shuffled, test, yt, epochs=4, input_size=16)
    assert r_bad.synthetic < r.synthetic
    assert "held-out real" in r.lines()[0]


def test_generation_accuracy_with_a_hand_made_expert():
    def expert(x):  # logits: red minus blue mean, for classes (red, blue)
        d = x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))
        return torch.stack([d, -d], dim=1)

    x, y = _colour_task(20, 4)
    assert generation_accuracy(expert, x, y, batch_size=7) == pytest.approx(1.0)
    assert generation_accuracy(expert, x, 1 - y, input_size=8) == pytest.approx(0.0)


def test_bad_input_is_rejected():
    x, y = _colour_task(8, 0)
    with pytest.raises(ValueError, match="one integer label per image"):
        train_classifier(x, y[:5])
    with pytest.raises(ValueError, match="integer class labels"):
        generation_accuracy(lambda t: torch.zeros(len(t), 2), x, y.astype(float))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        generation_accuracy(lambda t: torch.zeros(len(t)), x, y)
    with pytest.raises(ValueError, match="num_classes"):
        train_classifier(x, np.zeros(8, int))
