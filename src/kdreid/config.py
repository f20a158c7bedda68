"""Typed configs: dataclasses whose defaults are the documented settings, round-tripped through YAML.

A config is a (possibly nested) dataclass of plain values: bool, int, float, str, None, lists and tuples of those,
and other config dataclasses. `to_dict`/`from_dict` convert both ways with type checks, so a YAML file with a
misspelt key or a wrong type fails with one line naming the key. CLI flags override a loaded config through
`override`, using dotted names (`"optim.lr"`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from kdreid.errors import ConfigError

T = TypeVar("T")


def to_dict(config: Any) -> dict:
    """A dataclass config as nested plain dicts and lists (YAML- and JSON-safe)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"to_dict takes a dataclass instance, got {type(config).__name__}")

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "config") -> T:
    """Build `cls` from a mapping, checking every key and type; missing keys keep their defaults."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(data) - set(fields))  # YAML keys may be numbers ("0: x")
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
        )
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against the type hint `hint`, converting YAML's lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, where=where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads 1e-3 (no dot, YAML 1.1) as a string; it is a number to anyone who writes it.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and math.isfinite(float(value)):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def override(config: T, changes: Mapping[str, Any]) -> T:
    """A copy of `config` with dotted keys replaced (`{"optim.lr": 0.1}`); `None` values are skipped,
    so unset CLI flags leave the config alone."""
    data = to_dict(config)
    for dotted, value in changes.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"no config section {dotted!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key {dotted!r}; known: {', '.join(sorted(node))}")
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(config), data)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def read_yaml(path: str | Path) -> Any:
    """The parsed contents of a YAML file; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder; pass a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (ValueError, RecursionError) as error:
        # PyYAML builds dates and nests by recursion: "2001-02-30" or thousands of "[" fail outside YAMLError.
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ConfigError(f"{path} is not valid YAML: {reason}") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config of type `cls` from a YAML file (missing keys keep their defaults)."""
    return from_dict(cls, read_yaml(path), where=str(path))


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
