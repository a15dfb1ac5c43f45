"""The run configuration: the packages' frozen dataclasses, composed and validated.

Each package owns the dataclasses of its own settings (``generators.config`` and,
as they arrive, ``rewards``, ``rl``, ``eval``); this module composes them into one
:class:`RunConfig`, loads it from a YAML preset with dotted command-line overrides
(``finetune.lr=3e-4``) and checks every value. A field declares its constraints
in ``dataclasses.field(metadata=...)``:

- ``help``: one line for docs/config.md,
- ``min`` / ``max``: inclusive numeric bounds,
- ``choices`` is implied by a ``Literal[...]`` type.

An unknown key, a value of the wrong type or out of range raises
:class:`ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RunSection:
    """Where a run lives and how it is seeded."""

    name: str = field(
        default="demo", metadata={"help": "run name: runs/<name>/; the same name resumes"}
    )
    root: str = field(default="runs", metadata={"help": "directory holding run directories"})
    seed: int = field(
        default=0, metadata={"help": "global seed (data order, noise, init)", "min": 0}
    )
    device: str = field(
        default="auto",
        metadata={"help": "torch device for single-process commands: auto, cpu, cuda, cuda:N"},
    )

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in {".", ".."}:
            raise ConfigError(
                f"run.name: {self.name!r} is not a valid run name (no '/', not empty)"
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


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed; expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in a dataclass


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if not isinstance(v, (int, float)):
            return
        if not math.isfinite(v):  # NaN passes every comparison below; inf is no setting
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = " and ".join(
                s
                for s in (
                    f">= {lo}" if lo is not None else "",
                    f"<= {hi}" if hi is not None else "",
                )
                if s
            )
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: {bounds}")


def build(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, validating every key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; allowed keys{' under ' + prefix if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        coerced = _coerce(value, hints[name], key)
        _check_range(coerced, fields[name].metadata, key)
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own cross-field check (ConfigError or not)
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}.{exc}") from None
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars or lists."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot read value {raw!r}: {exc}") from None
        parsed.append((key, value))
    return parsed


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a preset (or the defaults when ``path`` is None) and apply dotted overrides.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value, naming the key.
        FileNotFoundError: the preset does not exist.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config preset {path} does not exist")
        with path.open() as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
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
        rows.append((key, _type_name(tp), default_text, help_text))
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
    for key, type_name, default, help_text in describe():
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
        lines.append(f"| `{key}` | {type_name.replace('|', '/')} | `{default}` | {cell} |")
    return atomic_write_text(path, "\n".join(lines) + "\n")
