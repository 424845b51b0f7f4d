"""Typed configs for stages: frozen dataclasses built from plain dicts, with field-path errors.

Every stage kind declares a frozen, keyword-only ``Config`` dataclass. Fields are identity fields
(they change the result and so the stage's key) unless declared with ``setting(...)``, which marks
fields such as logging cadence that must not retrain anything when they change.
"""
from __future__ import annotations

import dataclasses
import keyword
import math
import re
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """Bad input found before any compute; the message names the field and the fix."""


def setting(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None) -> Any:
    """A non-identity field: changing it never changes a stage's key or output."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"identity": False, "doc": doc})
    return dataclasses.field(default=default, metadata={"identity": False, "doc": doc})


def param(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None) -> Any:
    """An identity field with a docstring."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"identity": True, "doc": doc})
    return dataclasses.field(default=default, metadata={"identity": True, "doc": doc})


def is_identity(f: dataclasses.Field) -> bool:
    return f.metadata.get("identity", True)


def identity_dict(cfg: Any) -> Any:
    """The identity fields of a config, recursively, as plain JSON-able data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: identity_dict(getattr(cfg, f.name))
                for f in dataclasses.fields(cfg) if is_identity(f)}
    if isinstance(cfg, dict):
        return {k: identity_dict(v) for k, v in sorted(cfg.items())}
    if isinstance(cfg, (list, tuple)):
        return [identity_dict(v) for v in cfg]
    return cfg


def identity_field_paths(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every identity field of a config class (nested dataclasses expanded)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not is_identity(f):
            continue
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            out += identity_field_paths(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; errors name ``where.field`` and say what to do."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # YAML says `from:`; Python fields cannot be keywords, so the field is `from_`.
    data = {(k + "_" if isinstance(k, str) and keyword.iskeyword(k) else k): v for k, v in data.items()}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field. Known fields: "
                          f"{', '.join(sorted(yaml_name(n) for n in fields))} (check the spelling)")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{yaml_name(name)}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: required field is missing; set it in the stage's config")
            continue
        kwargs[name] = _coerce(hints[name], data[name], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # __post_init__ messages start with the field's relative path ("lr: must be > 0")
        msg = str(e)
        head = msg.split(":", 1)[0]
        if re.fullmatch(r"[A-Za-z_][\w./-]*", head) and ":" in msg:
            raise ConfigError(f"{where}.{msg}") from e
        raise ConfigError(f"{where}: {msg}") from e


def yaml_name(field: str) -> str:
    """The name a field has in YAML and in messages: `from_` is written `from`."""
    return field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field


def _coerce(tp: Any, value: Any, path: str) -> Any:
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
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, f"{path}.{k}"): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list such as [a, b], got {value!r}")
        et = args[0] if args else Any
        return tuple(_coerce(et, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value
