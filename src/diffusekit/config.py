"""Typed configs that round-trip through JSON, with errors that name the bad key or value."""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message says what is allowed instead."""


def check_choice(name: str, value: Any, allowed) -> None:
    """Raise ConfigError unless value is one of allowed, listing the allowed values."""
    allowed = list(allowed)
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {allowed}{extra}.")


def check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Raise ConfigError unless lo <= value <= hi (open ends where asked)."""
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{name}={value!r} is out of range; expected a value in "
                          f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}.")


class Config:
    """Mixin for dataclass configs: validation of Literal fields, JSON round trip, diffs.

    Subclasses are dataclasses; they may define `validate(self)` for extra checks, which runs
    after the Literal checks in __post_init__.
    """

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            tp = hints.get(f.name)
            if typing.get_origin(tp) is Literal:
                check_choice(f.name, getattr(self, f.name), typing.get_args(tp))
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {names}"
                raise ConfigError(f"unknown key {key!r} in {cls.__name__}{extra}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            tp = hints.get(k)
            # JSON has no tuples; restore them where the field is a tuple
            if isinstance(v, list) and typing.get_origin(tp) is tuple:
                v = tuple(v)
            sub = _config_class(tp)
            if sub is not None and isinstance(v, dict):
                v = sub.from_dict(v)
            kwargs[k] = v
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def diff(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as {name: (self_value, other_value)} (flattened)."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _config_class(tp):
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp
    for arg in typing.get_args(tp) or ():
        if isinstance(arg, type) and issubclass(arg, Config):
            return arg
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
