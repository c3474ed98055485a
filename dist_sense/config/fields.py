"""Documented dataclasses from JSON and `key=value` overrides: the machinery under config.py.

Generic over the schema: reading a JSON object, setting dotted overrides, building nested
dataclasses with type coercion (unknown keys and bad values raise `ConfigError` naming
them), `Section`, the base that validates a section whenever one is constructed, the range
checks the sections' `_check` methods use, and each field's docstring.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


def field_docs(cls) -> dict[str, str]:
    """Field name -> its docstring, read from the source (for `--help` listings)."""
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # one line, however it was wrapped
    return docs


def read_json(path: Path) -> dict:
    """The JSON object in `path`; ConfigError naming the file if it is missing or not an object."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def _split_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (for example kmeans.k=10)")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as a path
    return key.strip(), value


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_override(data: dict, item: str) -> None:
    """Set `section.key=value` (the value parsed as JSON where it is JSON, else a string) in `data`."""
    key, value = _split_override(item)
    _set_dotted(data, key, value)


class Section:
    """Base of a config dataclass: constructing one (directly, from JSON, by `dataclasses.replace`)
    coerces each field to its annotated type and runs `_check`, so an invalid one never exists.
    `_key` is the section's dotted key ("kmeans"; "" for the root), named in the errors."""

    _key = ""

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Coerce the fields, then `_check`; ConfigError naming the dotted key. Also what a
        container section calls on its sections, so one changed in place is checked again."""
        prefix = self._key + "." if self._key else ""
        for name, kind in _scalar_hints(type(self)).items():
            setattr(self, name, _coerce(getattr(self, name), kind, prefix + name))
        self._check()

    def _check(self) -> None:
        """Range and cross-field checks of this section (none by default)."""


@functools.lru_cache(maxsize=None)
def _scalar_hints(cls) -> dict:
    """Field name -> annotated type, for the fields that are not themselves sections."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}


class TrainingSection(Section):
    """A section of a DeepSpeed training stage (distill, finetune): its global batch split over ranks.

    Needs the fields global_batch_size and micro_batch_size."""

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches each rank runs per optimizer step on `world_size` ranks:
        global_batch_size / (micro_batch_size x world_size); ConfigError naming the keys unless it divides."""
        micro, total, key = self.micro_batch_size, self.global_batch_size, self._key
        if world_size < 1:
            raise ConfigError(f"world size {world_size}: must be >= 1 to split {key}.global_batch_size={total}")
        if total % (micro * world_size):
            raise ConfigError(
                f"{key}.global_batch_size={total} is not a multiple of {key}.micro_batch_size={micro} x "
                f"world size {world_size} = {micro * world_size}: change one of them")
        return total // (micro * world_size)

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(micro batch per rank, gradient accumulation steps) on `world_size` ranks: DeepSpeed's
        train_micro_batch_size_per_gpu and gradient_accumulation_steps; ConfigError unless they divide."""
        return self.micro_batch_size, self.accumulation_steps(world_size)


def build_dataclass(cls, data: dict, prefix: str, source: str, moved: dict | None = None):
    """`cls(**data)`, nested sections built alike and values coerced to the annotated types.
    `moved` maps a dotted key that no longer exists to its new place, for a clearer error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be an object, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for name in unknown:
        if (moved or {}).get(prefix + name):
            raise ConfigError(f"{source}: {prefix}{name} has moved to {moved[prefix + name]}: rename it there")
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]}; valid keys here: {valid}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build_dataclass(kind, value, prefix + name + ".", source, moved)
        else:
            kwargs[name] = _coerce(value, kind, prefix + name, source)
    return cls(**kwargs)


def _coerce(value, kind, key: str, source: str = ""):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        return str(value)
    elif kind is list or typing.get_origin(kind) is list:
        if isinstance(value, list):
            return value
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    where = f"{source}: " if source else ""
    raise ConfigError(f"{where}{key}={value!r} is not a valid {getattr(kind, '__name__', kind)}")


def check_positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value}: must be > 0")


def check_nonnegative(key: str, value) -> None:
    if value < 0:
        raise ConfigError(f"{key}={value}: must be >= 0")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}")
