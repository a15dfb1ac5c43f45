"""The config base: settings as frozen dataclasses, built from mappings and checked.

Every package declares its settings as frozen dataclasses whose fields are made with
:func:`setting` (a default and one line of help, plus constraints in the metadata):

- ``help``: one line for docs/config.md,
- ``min`` / ``max``: inclusive numeric bounds (NaN and infinities are refused),
- ``choices`` is implied by a ``Literal[...]`` type.

:func:`build` makes a dataclass from a (nested) mapping, coercing and checking every value;
an unknown key, a value of the wrong type or out of range raises :class:`ConfigError`
naming the dotted key and what is allowed. :func:`to_dict` turns one back into plain,
YAML-safe data; :func:`parse_overrides` reads ``key.sub=value`` command-line overrides;
:func:`read_yaml` reads a YAML file, its errors in one line naming the file, line and column.
``medrl.config`` composes the packages' sections into the run config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def yaml_problem(exc: yaml.YAMLError, position: bool = True) -> str:
    """A YAML parse error in one line: ``line L, column C: problem (context)``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = " ".join(f"{problem} ({context})".split() if context else str(problem).split())
    if position and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return text


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path`` (None when it is empty).

    Raises:
        ConfigError: not UTF-8 text, or not YAML, naming the file (and line and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML at {yaml_problem(exc)}") from None


def setting(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - as field's metadata
    """A dataclass field with its default and help (and ``min``/``max`` in ``meta``)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"help": help, **meta})


# --------------------------------------------------------------------------- building


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
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
            raise ConfigError(f"{key}: null is not allowed; expected {type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not {type_name(tp)}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
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


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
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
            problem = yaml_problem(exc, position=False)
            raise ConfigError(f"{key}: cannot read value {raw!r}: {problem}") from None
        parsed.append((key, value))
    return parsed


@dataclasses.dataclass(frozen=True)
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
