"""Typed configs for stages: frozen dataclasses built from plain dicts, with field-path errors.

Every stage kind declares a ``@configclass`` (a frozen, keyword-only dataclass). Fields are
identity fields (they change the result and so the stage's key) unless declared with
``setting(...)``, which marks fields such as logging cadence that must not retrain anything when
they change. Bounds are declared with the field (``param(1, "epochs", ge=1)``) and checked when the
config is created, before its own ``__post_init__`` (which keeps the checks that relate fields).
A field added after stages were run is declared ``keyed_if_set=True``: while it holds its default
it is left out of the key, so every earlier key (and the work behind it) stays valid.
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


BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
          "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _field(identity: bool, default: Any, doc: str, factory: Any, bounds: dict,
           keyed_if_set: bool = False) -> Any:
    meta = {"identity": identity, "doc": doc, "bounds": {k: v for k, v in bounds.items()
                                                          if v is not None},
            "keyed_if_set": keyed_if_set}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def setting(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None, *,
            ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> Any:
    """A non-identity field: changing it never changes a stage's key or output."""
    return _field(False, default, doc, factory, {"ge": ge, "gt": gt, "le": le, "lt": lt})


def param(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None, *,
          ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None,
          keyed_if_set: bool = False) -> Any:
    """An identity field with a docstring and optional bounds (``ge=1``: must be >= 1)."""
    return _field(True, default, doc, factory, {"ge": ge, "gt": gt, "le": le, "lt": lt},
                  keyed_if_set)


def check_bounds(cfg: Any) -> None:
    """Raise ``ValueError("field: must be >= 1, got 0 (doc)")`` for the first field out of its
    bounds (``from_dict`` puts the config's path in front)."""
    for f in dataclasses.fields(cfg):
        bounds = f.metadata.get("bounds") or {}
        value = getattr(cfg, f.name)
        if value is None or all(BOUNDS[name][1](value, b) for name, b in bounds.items()):
            continue
        doc = f.metadata.get("doc", "")
        raise ValueError(f"{yaml_name(f.name)}: must be {_describe(bounds)}, got {value!r}"
                         + (f" ({doc})" if doc else ""))


def _describe(bounds: dict) -> str:
    """``>= 1``, or an interval such as ``in [0, 1)`` when there is a lower and an upper bound."""
    num = lambda b: f"{b:g}" if isinstance(b, float) else str(b)  # noqa: E731
    low = [(n, b) for n, b in bounds.items() if n in ("ge", "gt")]
    high = [(n, b) for n, b in bounds.items() if n in ("le", "lt")]
    if low and high:
        (ln, lb), (hn, hb) = low[0], high[0]
        return f"in {'[' if ln == 'ge' else '('}{num(lb)}, {num(hb)}{']' if hn == 'le' else ')'}"
    return " and ".join(f"{BOUNDS[n][0]} {num(b)}" for n, b in bounds.items())


def configclass(cls: type) -> type:
    """A frozen, keyword-only config dataclass whose field bounds are checked on creation."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self) -> None:
        check_bounds(self)
        if own is not None:
            own(self)
        else:  # a subclass without checks of its own still runs its parents'
            parent = getattr(super(cls, self), "__post_init__", None)
            if parent is not None:
                parent()

    cls.__post_init__ = __post_init__
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def is_identity(f: dataclasses.Field) -> bool:
    return f.metadata.get("identity", True)


def _in_key(f: dataclasses.Field, value: Any) -> bool:
    if not is_identity(f):
        return False
    if f.metadata.get("keyed_if_set"):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        return value != default
    return True


def identity_dict(cfg: Any) -> Any:
    """The identity fields of a config, recursively, as plain JSON-able data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: identity_dict(getattr(cfg, f.name))
                for f in dataclasses.fields(cfg) if _in_key(f, getattr(cfg, f.name))}
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
