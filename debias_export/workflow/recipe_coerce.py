"""Typed coercion of parsed YAML into the recipe's dataclass sections; every error names its key path."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from ..core.errors import ConfigError


def show(value: Any) -> str:
    """repr() that cannot fail (ints past Python's digit limit) and stays short."""
    try:
        text = repr(value)
    except ValueError:
        return "<integer with too many digits>"
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; errors name the key path."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return coerce(value, args[0], path)
        for arg in args:  # e.g. edit.value: a number or the word "mean"; the first type that takes it wins
            try:
                return coerce(value, arg, path)
            except ConfigError:
                pass
        names = {float: "a finite number", int: "an integer", str: "a string", bool: "true/false"}
        raise ConfigError(f"{path}: expected {' or '.join(names.get(a, getattr(a, '__name__', str(a))) for a in args)}, "
                          f"got {show(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return build_section(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {show(value)}")
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {show(value)}")
        return value
    return value


def build_section(cls: type, raw: dict, path: str) -> Any:
    """``cls(**raw)`` with every field coerced to its annotation; unknown and missing keys are refused."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key {where!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = coerce(raw[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {where!r}")
    return cls(**kwargs)
