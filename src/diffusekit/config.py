"""Typed configs that round-trip through JSON, with errors that name the bad key or value."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
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


def check_finite(name: str, value, expected: str = "a finite number") -> None:
    """Raise ConfigError unless value is a real number other than NaN and +-inf."""
    # bool is an int to Python but never a sensible number for a config field
    try:
        finite = not isinstance(value, (bool, str, bytes)) and value is not None and math.isfinite(value)
    except TypeError:
        finite = False
    if not finite:
        what = "not a finite number" if isinstance(value, float) else "not a number"
        raise ConfigError(f"{name}={value!r} is {what}; give {expected}.")


def check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Raise ConfigError unless value is finite and lo <= value <= hi (open ends where asked)."""
    lb, rb = "(" if lo_open or lo is None else "[", ")" if hi_open or hi is None else "]"
    interval = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    # NaN compares False with everything, so the range test alone would let it through
    check_finite(name, value, expected=f"a finite value in {interval}")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        raise ConfigError(f"{name}={value!r} is out of range; expected a value in {interval}.")


class Config:
    """Mixin for dataclass configs: validation of Literal fields, JSON round trip, diffs.

    Subclasses are dataclasses; they may define `validate(self)` for extra checks, which runs
    after the Literal checks and the check that every float field is finite, in __post_init__.
    """

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        nonfinite = []
        for f in dataclasses.fields(self):
            tp, value = hints.get(f.name), getattr(self, f.name)
            if typing.get_origin(tp) is Literal:
                check_choice(f.name, value, typing.get_args(tp))
            elif float in _members(tp) and isinstance(value, float) and not math.isfinite(value):
                nonfinite.append(f.name)
        # validate() first, so that a range check can name the interval; any other failure it
        # meets on a NaN is reported as the NaN it is
        try:
            self.validate()
        except ConfigError:
            raise
        except Exception:
            if nonfinite:
                check_finite(nonfinite[0], getattr(self, nonfinite[0]))
            raise
        for name in nonfinite:
            check_finite(name, getattr(self, name))

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        """The config from a parsed JSON object; a wrong key or value type raises ConfigError naming it."""
        return _from_dict(cls, d, "")

    def to_json(self, path: str | Path | None = None) -> str:
        d = self.to_dict()
        try:
            text = json.dumps(d, indent=2, sort_keys=False, allow_nan=False)
        except ValueError:
            bad = {k: v for k, v in _flatten(d).items() if isinstance(v, float) and not math.isfinite(v)}
            raise ConfigError(f"{type(self).__name__} holds non-finite values {bad}; JSON cannot store "
                              f"them and no option accepts them. Set finite values.") from None
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        """The config in a JSON file; errors name the file (and the line for invalid JSON)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}; check the path.") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not a text file ({e.reason}); give a JSON config file.") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                              f"fix that line, or write the file again with the config's to_json().") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def diff(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as {name: (self_value, other_value)} (flattened)."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _from_dict(cls: type[C], d: Any, where: str) -> C:
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: expected {_expected(cls)}, got "
                          f"{_received(d)}; give the settings as one JSON object.")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {names}"
            raise ConfigError(f"unknown key {key!r} in {cls.__name__}{extra}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _convert(f"{where}{k}", v, hints.get(k)) for k, v in d.items()})


def _convert(key: str, value: Any, tp) -> Any:
    """value as the field type tp wants it (JSON lists to tuples, sections to configs), else ConfigError."""
    ok, value = _accept(key, value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_expected(tp)}, got {_received(value)}; correct {key} in the config.")
    return value


def _accept(key: str, value: Any, tp) -> tuple[bool, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is None or tp is Any or origin is Literal:     # Literal values are checked in __post_init__
        return True, value
    if tp is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for arg in args:
            ok, converted = _accept(key, value, arg)
            if ok:
                return True, converted
        return False, value
    if isinstance(tp, type) and issubclass(tp, Config):
        return isinstance(value, dict), _from_dict(tp, value, f"{key}.") if isinstance(value, dict) else value
    if tp is bool or tp is str:
        return isinstance(value, tp), value
    if tp is int:
        # JSON writers may give 2000.0 for an integer; take it, but never a fractional value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), \
            float(value) if isinstance(value, int) else value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if args and len(items) != len(value):
            return False, value
        converted = [_accept(key, v, t) for v, t in zip(value, items)] if args else [(True, v) for v in value]
        if not all(ok for ok, _ in converted):
            return False, value
        return True, origin(v for _, v in converted)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value


def _expected(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if isinstance(tp, type) and issubclass(tp, Config):
        names = [f.name for f in dataclasses.fields(tp)]
        return f"an object of {tp.__name__} fields ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        plural = {bool: "true/false values", str: "strings", int: "integers", float: "numbers"}
        return "a list" + (f" of {plural[inner[0]]}" if inner and inner[0] in plural else "")
    names = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}
    return names.get(tp, "an object" if (origin is dict or tp is dict) else getattr(tp, "__name__", str(tp)))


def _received(value: Any) -> str:
    kind = ("null" if value is None else "true/false" if isinstance(value, bool) else
            "a string" if isinstance(value, str) else "an integer" if isinstance(value, int) else
            "a number" if isinstance(value, float) else "a list" if isinstance(value, (list, tuple)) else
            "an object" if isinstance(value, dict) else type(value).__name__)
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({kind})"


def _members(tp) -> tuple:
    """The types a field annotation admits: (float,) for float, (int, NoneType) for int | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
