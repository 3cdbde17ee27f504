"""Every key of a config dataclass with its type, default and meaning, read from the dataclass itself.

The meaning of a field is its trailing ``# comment`` (any comment inside the field's statement, so a line the
formatter wrapped keeps it). Comment lines above a field are notes on why; they are not part of the meaning.
``docs/CONFIG.md`` (``python -m launch.config_reference``) and ``launch/pretrain.py --help`` both list keys
with :func:`config_keys`, so the field is the one place a key is described.

This module imports nothing from the project but :mod:`common.configio`, so any package may use it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from common.configio import to_dict


@dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, as in YAML and key=value overrides
    type: str  # annotation as written, e.g. "int | None", "Literal['a', 'b']"
    default: Any  # plain value (lists for tuples), as the resolved config file holds it
    meaning: str  # the field's trailing comment; empty when it has none


def _class_comments(klass: type) -> dict[str, str]:
    """Field name -> the comments inside that field's statement, for one class body (not its bases)."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (built in a REPL, frozen app): no meanings
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            end = node.end_lineno or node.lineno
            parts = [comments[line] for line in range(node.lineno, end + 1) if line in comments]
            if parts:
                out[node.target.id] = " ".join(parts)
    return out


def field_meanings(cls: type) -> dict[str, str]:
    """Field name -> meaning for dataclass ``cls``, inherited fields included (a subclass's comment wins)."""
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            meanings.update(_class_comments(klass))
    return meanings


def type_text(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def config_keys(cls: type, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of ``cls`` (defaults from ``cls()``), each section's own keys before its subsections."""
    instance = cls()
    hints = typing.get_type_hints(cls)
    meanings = field_meanings(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, type(value)))
            continue
        rows.append(
            ConfigKey(prefix + f.name, type_text(hints[f.name]), to_dict(value), meanings.get(f.name, ""))
        )
    for name, sub in nested:
        rows += config_keys(sub, prefix + name + ".")
    return rows


def keys_help(cls: type, width: int = 110) -> str:
    """Plain-text list of every key for a command's ``--help``: ``key (type, default value)`` then its meaning."""
    lines = []
    for k in config_keys(cls):
        lines.append(f"  {k.key} ({k.type}, default {k.default!r})")
        lines += textwrap.wrap(k.meaning, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
