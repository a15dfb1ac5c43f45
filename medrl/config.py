"""The run configuration: the packages' frozen dataclasses, composed and validated.

Each package owns the dataclasses of its own settings (``generators.config`` and,
as they arrive, ``rewards``, ``rl``, ``eval``); this module composes them into one
:class:`RunConfig`, loads it from a YAML preset with dotted command-line overrides
(``finetune.lr=3e-4``) and checks every value with the config base of the ground floor
(:mod:`runfiles.config`: ``setting`` fields with their help and bounds, ``build``,
``to_dict``, ``parse_overrides``, :class:`ConfigError` naming the dotted key).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from generators.config import (
    DataConfig,
    FinetuneConfig,
    LoraConfig,
    ModelConfig,
    SamplingConfig,
)
from rewards.config import RewardsConfig
from rl.config import RLConfig, TuneConfig
from runfiles import atomic_write_text
from runfiles.config import (  # noqa: F401 - the config API, composed here
    ConfigError,
    RunSection,
    build,
    parse_overrides,
    read_yaml,
    set_dotted,
    to_dict,
    type_name,
)


@dataclass(frozen=True)
class DemoSection:
    """What ``medrl demo`` adds around the packages' steps: the rating pool and rounds."""

    base_steps: int = field(
        default=600,
        metadata={
            "help": "UNet (and text encoder) steps of the shipped base generator's recipe "
            "(`make demo-weights`, medrl.demo_weights); the demo fine-tunes from that base "
            "for finetune.steps",
            "min": 1,
        },
    )
    base_lr: float = field(
        default=1e-3,
        metadata={"help": "learning rate of the base generator's recipe", "min": 0.0},
    )
    generated_pool: bool = field(
        default=True,
        metadata={
            "help": "rate the generator's own samples (fine-tune checkpoints x guidance "
            "scales), VAE reconstructions and real anchors besides the phantom pool "
            "(rewards.pools.write_generated_pool)"
        },
    )
    pool_prompts: int = field(
        default=16, metadata={"help": "prompts the generated pool draws", "min": 1}
    )
    phantom_pool: int = field(
        default=480, metadata={"help": "phantoms of graded quality in the rating pool", "min": 1}
    )
    pretrain_on_manifest: bool = field(
        default=True,
        metadata={
            "help": "pre-train the alignment towers contrastively on the fine-tuning "
            "manifest (data.manifest_path) when rewards.pretrain_manifest is empty"
        },
    )
    rating_rounds: int = field(
        default=2,
        metadata={
            "help": "rounds of rate -> train rewards -> RL; rl.iterations are split "
            "between them, and every round after the first rates the RL adapter's samples "
            "(a blind sheet, `medrl ratings export-round`) and retrains on all rounds",
            "min": 1,
        },
    )
    round_prompts: int = field(
        default=8, metadata={"help": "prompts of each later round's rating sheet", "min": 1}
    )
    round_per_prompt: int = field(
        default=4, metadata={"help": "images per prompt on a round's rating sheet", "min": 1}
    )
    round_epochs_fraction: float = field(
        default=0.25,
        metadata={
            "help": "each later round's reward models continue the previous round's "
            "(rewards.init_from) for this share of rewards.epochs, stage1_epochs and "
            "stage2_epochs; 1: retrain from scratch with the full epochs",
            "min": 0.01,
            "max": 1.0,
        },
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything one medrl run needs; saved as config.yaml in every run directory."""

    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(
        default_factory=LoraConfig,
        metadata={
            "help": "The RL adapter: what `medrl rl train` trains on the fine-tuned generator "
            "and `medrl export` writes. The fine-tuning adapter is `finetune.lora` (LoRA "
            "mode), merged into `runs/<name>/generator` when fine-tuning ends."
        },
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    demo: DemoSection = field(default_factory=DemoSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a preset (or the defaults when ``path`` is None) and apply dotted overrides.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value, naming the key; a
            preset that is not YAML, naming the file, line and column.
        FileNotFoundError: the preset does not exist.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"config preset {path} {what}")
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    return build(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every field: the source of docs/config.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        help_text = f.metadata.get("help", "")
        bounds = []
        if "min" in f.metadata:
            bounds.append(f">= {f.metadata['min']}")
        if "max" in f.metadata:
            bounds.append(f"<= {f.metadata['max']}")
        if bounds:
            help_text += f" ({', '.join(bounds)})"
        default_text = yaml.safe_dump(
            to_dict(default)
            if dataclasses.is_dataclass(default)
            else (list(default) if isinstance(default, tuple) else default),
            default_flow_style=True,
        ).strip()
        default_text = default_text.removesuffix("\n...").removesuffix("...").strip()
        rows.append((key, type_name(tp), default_text, help_text))
    return rows


def write_config_docs(path: str | os.PathLike = "docs/config.md") -> Path:
    """Write the reference of every config key (``medrl config docs``)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `medrl config docs` from the config dataclasses; do not edit by hand.",
        "Presets live in `configs/`; any key can be overridden on the command line with",
        "`key.sub=value` (YAML syntax for the value), e.g.",
        "`medrl finetune --config configs/demo.yaml finetune.steps=200 run.name=try`.",
        "An unknown key, a value of the wrong type or out of range is an error naming the key.",
        "",
    ]
    section = None
    for key, shown_type, default, help_text in describe():
        top = key.split(".")[0]
        if top != section:
            section = top
            intro = next(f for f in dataclasses.fields(RunConfig) if f.name == top)
            intro = intro.metadata.get("help")
            lines += [
                "",
                f"## `{top}`",
                "",
                *([intro, ""] if intro else []),
                "| key | type | default | meaning |",
                "| --- | --- | --- | --- |",
            ]
        cell = help_text.replace("|", "\\|")
        lines.append(f"| `{key}` | {shown_type.replace('|', '/')} | `{default}` | {cell} |")
    return atomic_write_text(path, "\n".join(lines) + "\n")
