"""The one config loader: plain dataclasses built from YAML dicts, with errors that teach.

Design note. Config sections are ordinary dataclasses with a docstring (a string literal)
under each field, in the style of torchtitan's ``job_config.py``. This module turns a nested
``dict`` (from ``yaml.safe_load`` plus ``key=value`` overrides) into those dataclasses and
checks every value against its annotation. It knows no section by name: ``config.py`` holds
the sections, plugins hold their own, and both go through :func:`build`.

An error always names the source file, the full dotted key, what was expected, and the valid
keys or choices, with a "did you mean" for near misses.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from turbotune.errors import ConfigError

T = TypeVar("T")

#: A dataclass may name a field that collects keys it does not declare, and a function giving
#: the names and types such keys may take (``TrainConfig`` passes ``TrainingArguments`` through).
PASSTHROUGH_ATTR = "__passthrough__"


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (converted where lossless)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"{source}: '{key}' is {value!r}, which is not a valid choice."
            f"{_suggest(str(value), [str(c) for c in choices])} Valid values: "
            + ", ".join(repr(c) for c in choices)
        )
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except (ConfigError, _Mismatch) as err:
                errors.append(err)
        # A single Literal alternative gives the most helpful message.
        for err in errors:
            if isinstance(err, ConfigError) and "valid choice" in str(err):
                raise err
        raise _Mismatch()
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _Mismatch()
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_checked(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch()
        args = typing.get_args(tp)
        if args:
            return {k: _checked(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _Mismatch()
        return build(tp, value, where=key, source=source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads "1e-4" (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch()
    return value  # an annotation we do not check (e.g. a forward reference from a library)


def _checked(value: Any, tp: Any, key: str, source: str) -> Any:
    try:
        return _coerce(value, tp, key, source)
    except _Mismatch:
        raise ConfigError(
            f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type[T], data: Mapping[str, Any] | None, *, where: str, source: str) -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and value.

    Args:
        cls: the dataclass of the section.
        data: the section's mapping (``None`` means all defaults).
        where: the dotted key of the section, for messages (``"train"``, ``"plugins.fused_ops"``).
        source: where the data came from (a file path, ``"<dict>"``, ``"command line"``).
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    passthrough: tuple[str, Callable[[], dict[str, Any]]] | None = getattr(
        cls, PASSTHROUGH_ATTR, None
    )
    extra: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} under '{where}' must be a string")
        if key in fields and (passthrough is None or key != passthrough[0]):
            kwargs[key] = _checked(value, hints[key], prefix + key, source)
            continue
        if passthrough is not None:
            allowed = passthrough[1]()
            if key in allowed:
                extra[key] = _checked(value, allowed[key], prefix + key, source)
                continue
        valid = sorted(k for k in fields if passthrough is None or k != passthrough[0])
        hint = _suggest(key, valid + (sorted(passthrough[1]()) if passthrough else []))
        more = " (or any Hugging Face TrainingArguments field)" if passthrough else ""
        raise ConfigError(
            f"{source}: unknown key '{prefix}{key}'.{hint} Valid keys of "
            f"'{where or 'the top level'}': {', '.join(valid)}{more}"
        )
    if passthrough is not None:
        kwargs[passthrough[0]] = extra
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: section '{where}': {err}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`build`: a plain nested dict (passthrough keys merged back)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        passthrough = getattr(type(obj), PASSTHROUGH_ATTR, None)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if passthrough is not None and f.name == passthrough[0]:
                out.update(to_dict(value))
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# YAML files and command-line overrides


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (never the unsafe loader)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=2e-4"`` -> (["train", "learning_rate"], 2e-4)."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' must look like section.key=value (e.g. train.max_steps=10)"
        )
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a copy of ``data``; intermediate sections are created."""
    data = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{text}': '{where}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


# ---------------------------------------------------------------------------------------------
# Field docstrings (the string literal under each field), for `turbotune arguments` and docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
