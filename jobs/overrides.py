"""Typed `--set section.key=value` overrides for nested config dataclasses.

A value is parsed by the annotated type of the field it replaces; unknown sections or keys are refused
with the list of valid ones, so a typo never turns into a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import json
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
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a float, got {raw!r}") from None
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


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a nested dataclass from `to_dict` output; unknown keys are refused."""
    types_by_name = _field_types(cls)
    unknown = set(data) - set(types_by_name)
    if unknown:
        raise ConfigError(f"unknown keys for {cls.__name__}: {sorted(unknown)}; valid: {sorted(types_by_name)}")
    kwargs = {}
    for name, value in data.items():
        annotation = types_by_name[name]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            kwargs[name] = from_dict(annotation, value)
        elif typing.get_origin(annotation) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


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
