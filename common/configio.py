"""Typed configuration: dataclasses loaded from YAML, overridden by ``key=value`` arguments.

One config object describes a whole run. Rules (the same for every entry point):

* A YAML file gives values for any subset of fields; missing fields keep their dataclass defaults.
* A YAML file may start from another: ``base: other.yaml`` (relative to the file; chains allowed). Sections
  merge key by key, the file's own values win; lists and scalars replace the base's.
* ``key=value`` overrides use dotted keys for nested sections (``data.url=s3://b/p``, ``optim.lr=3e-4``).
  Values are parsed as YAML scalars/lists (``true``, ``3``, ``[2,3]``, ``null``).
* Unknown keys and values of the wrong type are errors (:class:`ConfigError`) that name the dotted key.
* :func:`save_config` writes the resolved config (secrets redacted) next to an output.

This module imports nothing from the project but :mod:`common.errors`, so any package may use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import ConfigError

T = TypeVar("T")

# Top-level key of a config file naming the file it overrides (a path relative to that file). Not a config
# key: it is consumed while reading and never reaches the dataclass or the saved config.
BASE_KEY = "base"
# Field names whose values never reach a file or a log.
SECRET_FIELD_NAMES = ("secret", "password", "token", "access_key")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        # type too: YAML's true would otherwise pass as 1 (True == 1)
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"config key '{key}': must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys in this section: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any, redact: bool = False) -> Any:
    """Dataclass -> plain dict (lists for tuples); optionally replace secrets with '***'."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name), redact)
            if redact and value and any(s in f.name.lower() for s in SECRET_FIELD_NAMES):
                value = "***"
            out[f.name] = value
        return out
    if isinstance(obj, list | tuple):
        return [to_dict(v, redact) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, redact) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict ``{"a": {"b": 1}, "c": "x"}``."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. data.url=s3://bucket/prefix)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # Keep things like "s3://..." and "1e-4" sensible: YAML 1.1 reads "1e-4" as a string.
        value = _read_yaml_numbers(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section (nested mappings merge; anything else is replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml_numbers(data: Any) -> Any:
    """YAML 1.1 loads '3e-4' as a string; turn such strings into floats."""
    if isinstance(data, dict):
        return {k: _read_yaml_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_read_yaml_numbers(v) for v in data]
    if isinstance(data, str):
        if data[:1] in "0123456789-+." and any(c in data.lower() for c in ".e"):
            try:
                return float(data)
            except ValueError:
                return data
    return data


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file with its ``base:`` chain merged underneath (``chain``: the files that named it, in order)."""
    named_by = f" (base of '{chain[-1]}')" if chain else ""
    if not path.is_file():
        hint = (
            "fix the base: path, relative to that file"
            if chain
            else "pass --config PATH to an existing YAML file"
        )
        raise ConfigError(f"config file '{path}'{named_by} does not exist ({hint})")
    if path.resolve() in {p.resolve() for p in chain}:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config file '{path}'{named_by} comes back in its own base chain: {loop}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
    data = _read_yaml_numbers(loaded)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file '{path}': '{BASE_KEY}' must be a YAML file path, got {base!r}")
    # Relative to the file that names it, so a config works from any working directory.
    return deep_merge(_read_config_file(path.parent / base, (*chain, path)), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- base files (``base:``, deepest first) <- YAML file <- ``key=value`` overrides, checked
    against ``cls``."""
    data = _read_config_file(Path(path)) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (secrets redacted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj, redact=True), sort_keys=False))
    return path
