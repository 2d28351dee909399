"""Typed `--set section.key=value` overrides for nested config dataclasses.

A value is parsed by the annotated type of the field it replaces; unknown sections or keys are refused
with the list of valid ones, so a typo never turns into a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config key or value that does not exist or does not fit its type."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_value(raw: str, annotation: Any, key: str) -> Any:
    """Turn the text after `=` into a value of `annotation` (int, float, bool, str, tuples, lists, Optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return parse_value(raw, candidate, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin in (tuple, list):
        text = raw.strip()
        items = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        elem = args[0] if args else str
        parsed = [parse_value(str(v), elem, key) for v in items]
        return tuple(parsed) if origin is tuple else parsed
    if annotation is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a bool (true/false), got {raw!r}")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an int, got {raw!r}") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a float, got {raw!r}") from None
        if not math.isfinite(value):  # float() accepts "nan" and "inf", and NaN slips past every `<= 0` check
            raise ConfigError(f"{key}: expected a finite float, got {raw!r}")
        return value
    if annotation is str:
        return raw
    raise ConfigError(f"{key}: cannot parse values of type {annotation!r}")


def apply_overrides(config: Any, assignments: list[str]) -> Any:
    """Return a copy of `config` with every `a.b.c=value` applied; dataclass checks run again after."""
    updated = config
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} must look like section.key=value")
        dotted, raw = assignment.split("=", 1)
        updated = _set_path(updated, dotted.strip().split("."), raw, dotted.strip())
    return updated


def _set_path(node: Any, path: list[str], raw: str, full_key: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise ConfigError(f"{full_key}: {type(node).__name__} has no sub-keys")
    types_by_name = _field_types(type(node))
    name = path[0]
    if name not in types_by_name:
        valid = ", ".join(sorted(types_by_name))
        raise ConfigError(f"unknown config key {full_key!r}: {name!r} is not one of: {valid}")
    current = getattr(node, name)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            valid = ", ".join(f"{name}.{k}" for k in sorted(_field_types(type(current))))
            raise ConfigError(f"{full_key} is a section; set one of its keys: {valid}")
        value = parse_value(raw, types_by_name[name], full_key)
    else:
        value = _set_path(current, path[1:], raw, full_key)
    try:
        return dataclasses.replace(node, **{name: value})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{full_key}={raw!r} rejected: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """`value` as an instance of `annotation` (ints widen to float, lists to tuples); ConfigError otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for candidate in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, candidate, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {annotation}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        checked = [_check_type(v, args[0], key) for v in value] if args else list(value)
        return tuple(checked) if origin is tuple else checked
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return float(value)
    if annotation in (int, float, bool, str):
        is_bool_mismatch = isinstance(value, bool) != (annotation is bool)  # bool is a subclass of int
        if is_bool_mismatch or not isinstance(value, annotation):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a nested dataclass from `to_dict` output (a saved config); unknown keys and wrong types are refused."""
    types_by_name = _field_types(cls)
    unknown = set(data) - set(types_by_name)
    if unknown:
        keys = sorted(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config keys {keys}; valid: {', '.join(sorted(types_by_name))}")
    kwargs = {}
    for name, value in data.items():
        annotation = types_by_name[name]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            kwargs[name] = from_dict(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, annotation, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def settable_keys(config: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, one-line meaning) of every key `--set` accepts, in declaration order.

    The meaning is the field's `metadata["help"]` (one source of truth beside each field); "" where a field has
    none, which tests/unit/test_config.py refuses.
    """
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += settable_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return keys


def format_value(value: Any) -> str:
    """A value as `--set key=VALUE` takes it: lists comma-joined, bools and None lower-case, "" for empty text."""
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def format_config(config: Any) -> str:
    """One `key = value    # meaning` line per settable key."""
    rows = [(key, format_value(value), meaning) for key, value, meaning in settable_keys(config)]
    width = max(len(f"{key} = {value}") for key, value, _ in rows)
    return "\n".join(f"{key} = {value}".ljust(width) + (f"    # {meaning}" if meaning else "") for key, value, meaning in rows)
