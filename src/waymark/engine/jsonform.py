"""One JSON form for the engine's plain-data records (the journal's steps,
:mod:`waymark.engine.steps`, and its intents' parameters): a frozen dataclass is stored as the
object of its fields, by name, and read back checked, field by field, against its annotations.

Reading refuses what it cannot trust, with :class:`~waymark.errors.MalformedRecord` naming the
record and the field: a missing required field, a value of the wrong type, a field the class
does not have (a newer Waymark wrote it). Never a ``KeyError`` deep in a handler.

Field annotations understood: ``str``, ``int``, ``float``, ``bool``, ``None`` and unions of
them, ``Any``, ``dict[str, X]``, ``list[X]`` and ``Sequence[X]`` (read as a list), and a nested
record class (a dataclass, or any class with a ``from_json`` class method, read through it).

Why not pydantic (which the API already uses): every command that changes something writes an
intent, and importing pydantic and building validators for these ~35 classes costs about
0.1-0.2 s of start-up on this project's hosts, against a CLI whose commands answer in a few
hundred milliseconds. This reader is small, checks exactly these annotations, and costs nothing
to import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections import abc
from collections.abc import Callable
from typing import Any, TypeVar

from waymark.errors import MalformedRecord

T = TypeVar("T")
HINT = ("A newer Waymark or a damaged catalog wrote it. Run the Waymark that wrote it, or "
        "report a bug.")


def dump(record: Any) -> dict[str, Any]:
    """The record's fields (nested records and lists of them included) as JSON values."""
    return {f.name: _dumped(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _dumped(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value)
    if isinstance(value, list | tuple):
        return [_dumped(v) for v in value]
    if isinstance(value, dict):
        return {k: _dumped(v) for k, v in value.items()}
    return value


def load(cls: type[T], data: Any, what: str) -> T:
    """``cls`` from its JSON object ``data`` (``what`` names it in a refusal)."""
    if not isinstance(data, dict):
        raise MalformedRecord(f"{what} is {data!r}, not an object.", hint=HINT)
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init}
    extra = sorted(set(data) - set(fields))
    if extra:
        raise MalformedRecord(f"{what} has fields this Waymark does not know: "
                              f"{', '.join(extra)} ({data!r}).", hint=HINT)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _loaded(data[name], hints[name], f"{what}: field {name!r}")
        elif field.default is dataclasses.MISSING \
                and field.default_factory is dataclasses.MISSING:
            raise MalformedRecord(f"{what} has no {name!r} ({data!r}).", hint=HINT)
    return cls(**values)


def _loaded(value: Any, hint: Any, what: str) -> Any:
    """``value`` read as ``hint`` says, or a refusal naming ``what``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _one_of(value, args, what)
    if hint is type(None) or hint is None:
        if value is None:
            return None
    elif origin in (list, abc.Sequence) and isinstance(value, list):
        return [_loaded(v, args[0], f"{what}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _loaded(v, args[1], f"{what}[{k!r}]") for k, v in value.items()}
    elif hint is dict and isinstance(value, dict):
        return value
    elif isinstance(hint, type) and origin is None:
        return _scalar_or_record(value, hint, what)
    raise MalformedRecord(f"{what} is {value!r}, not {_name(hint)}.", hint=HINT)


def _one_of(value: Any, options: tuple[Any, ...], what: str) -> Any:
    if value is None and type(None) in options:
        return None
    for option in (o for o in options if o is not type(None)):
        try:
            return _loaded(value, option, what)
        except MalformedRecord:
            continue
    raise MalformedRecord(f"{what} is {value!r}, not {' or '.join(map(_name, options))}.",
                          hint=HINT)


def _scalar_or_record(value: Any, hint: type, what: str) -> Any:
    reader: Callable[[Any], Any] | None = getattr(hint, "from_json", None)
    if reader is not None:
        return reader(value)
    if dataclasses.is_dataclass(hint):
        return load(hint, value, what)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise MalformedRecord(f"{what} is {value!r}, not {_name(hint)}.", hint=HINT)


def _name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint)
