from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medrl.cli import main
from medrl.config import ConfigError, describe, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None, ["finetune.lr=3e-4", "model.unet.block_out_channels=[16,32]", "run.name=x"]
    )
    assert cfg.finetune.lr == pytest.approx(3e-4)
    assert cfg.model.unet.block_out_channels == (16, 32)
    assert cfg.run.name == "x"
    # ints are accepted where floats are expected, not the other way round
    assert load_config(None, ["finetune.lr=1"]).finetune.lr == 1.0


@pytest.mark.parametrize(
    "override, words",
    [
        ("finetune.lrr=1", ["finetune.lrr", "allowed keys", "lr"]),
        ("bogus.x=1", ["bogus", "allowed keys", "finetune"]),
        ("finetune.steps=abc", ["finetune.steps", "integer", "abc"]),
        ("finetune.steps=1.5", ["finetune.steps", "integer"]),
        ("finetune.text_dropout=1.5", ["finetune.text_dropout", "out of range", "<= 1.0"]),
        ("sampling.num_steps=0", ["sampling.num_steps", "out of range", ">= 1"]),
        ("finetune.mode=half", ["finetune.mode", "'full'", "'lora'"]),
        ("finetune.train_text_encoder=maybe", ["finetune.train_text_encoder", "true or false"]),
        ("model.unet.block_out_channels=7", ["model.unet.block_out_channels", "list"]),
        ("model.unet.block_out_channels=[4,32]", ["model.unet.block_out_channels", ">= 8"]),
        ("run.name=a/b", ["run.name"]),
        ("finetune.steps", ["key.sub=value"]),
        # NaN passes every min/max comparison; it used to be accepted (issue 13)
        ("rl.lr=nan", ["rl.lr", "not a finite number"]),
        ("rl.lr=.nan", ["rl.lr", "not a finite number"]),
        ("rewards.threshold=nan", ["rewards.threshold", "not a finite number"]),
        ("rl.clip_range=.inf", ["rl.clip_range", "not a finite number"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_no_float_setting_takes_nan_or_infinity():
    """Every float setting, bounded or not, refuses NaN and +-inf, naming its key."""
    keys = [key for key, tp, _, _ in describe() if tp == "float"]
    assert "rl.lr" in keys and "rewards.threshold" in keys
    for key in keys:
        for value in (".nan", ".inf", "-.inf"):
            with pytest.raises(ConfigError, match=f"^{key}: .* is not a finite number"):
                load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")))
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    out = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(out) == cfg
    assert yaml.safe_load(out.read_text()) == to_dict(cfg)


def test_preset_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="finetune.stepz"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors(capsys):
    assert main(["config", "show", "finetune.steps=-1"]) == 2
    assert "finetune.steps" in capsys.readouterr().err


def test_every_field_is_documented():
    rows = describe()
    missing = [key for key, _, _, help_text in rows if not help_text]
    assert not missing, f"fields without help text: {missing}"
    doc = (ROOT / "docs" / "config.md").read_text()
    undocumented = [key for key, *_ in rows if f"`{key}`" not in doc]
    assert not undocumented, f"docs/config.md lacks {undocumented}: run `medrl config docs`"
