"""The engine's plain-data records in the catalog (the journal's steps,
:mod:`waymark.engine.steps`, and its intents' parameters, :mod:`waymark.engine.params`):
:class:`Record` is a frozen, keyword-only :class:`msgspec.Struct` with one JSON form, the object
of its fields by name (:func:`dump`), read back checked by msgspec, in C (:func:`load`).

Reading refuses what it cannot trust, with :class:`~waymark.errors.MalformedRecord` naming the
record and the field (a missing required field, a value of the wrong type, a field the class
does not have: a newer Waymark wrote it), and a journal step of an op this Waymark does not
know with :class:`~waymark.errors.UnknownKind`. Never a ``KeyError`` deep in a handler, never a
raw :class:`msgspec.ValidationError`.

Why msgspec: a Struct class costs nothing to create (a dataclass compiles its generated methods
with ``exec`` at every start-up, ~11 ms for the steps, paid by every CLI command; pydantic's
import and validators cost 0.1-0.2 s), and its validation is a well-kept library's, not ours.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from waymark.errors import MalformedRecord, UnknownKind

T = TypeVar("T")
HINT = ("A newer Waymark or a damaged catalog wrote it. Run the Waymark that wrote it, or "
        "report a bug.")
UNKNOWN_STEP_HINT = ("This Waymark does not know that step (a newer Waymark wrote it?). Run the "
                     "Waymark that wrote it, or report a bug.")
TAG = "op"  # the field naming a journal step's op (its msgspec tag)
_SEGMENT = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")


class Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A frozen record with one JSON form (each subclass says ``kw_only=True`` again: msgspec
    applies it to the fields a class defines)."""


def dump(record: Record) -> dict[str, Any]:
    """The record's fields (nested records included) as JSON values."""
    built: dict[str, Any] = _listed(msgspec.to_builtins(record))
    return built


def _listed(value: Any) -> Any:
    """``value`` with every tuple a list (a ``Sequence`` field's default), as JSON has it."""
    if isinstance(value, list | tuple):
        return [_listed(item) for item in value]
    if isinstance(value, dict):
        return {key: _listed(item) for key, item in value.items()}
    return value


def load(cls: Any, data: Any, what: str) -> Any:
    """``cls`` (a record class or a union of them) from its JSON object ``data`` (``what``
    names it in a refusal)."""
    if not isinstance(data, dict):
        raise MalformedRecord(f"{what} is {data!r}, not an object.", hint=HINT)
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as err:
        raise refusal(str(err), data, what) from None


def unknown_step(op: Any, data: Any) -> UnknownKind:
    return UnknownKind(f"the journal has no step {op!r} ({data!r}).", hint=UNKNOWN_STEP_HINT)


def refusal(message: str, data: Any, what: str) -> MalformedRecord | UnknownKind:
    """msgspec's ``message`` (``... - at `$.field[0]` ``) about ``data`` said in Waymark's words
    (the record, the place in it, a step held in it by its op, what is wrong), then as is."""
    problem, _, at = message.partition(" - at `")
    keys = [name or (int(index) if index else None)
            for name, index in _SEGMENT.findall(at.rstrip("`").removeprefix("$"))]
    subject, value, start = what, data, 0
    for depth, key in enumerate(keys):
        value = _at(value, key)
        if isinstance(value, dict) and isinstance(value.get(TAG), str):  # a step held in it
            subject, start = f"{what}, {_place(keys[:depth + 1])}: the {value[TAG]} step", \
                depth + 1
    place = _place(keys[start:])
    if problem.startswith("Invalid value") and keys and keys[-1] == TAG:
        return unknown_step(_at_path(data, keys), _at_path(data, keys[:-1]))
    if problem == f"Object missing required field `{TAG}`":  # only steps have an op
        return unknown_step(None, _at_path(data, keys))
    said = _said(problem, _at_path(data, keys))
    return MalformedRecord(f"{subject}{': field ' + place if place else ''} {said} ({data!r}; "
                           f"msgspec: {message}).", hint=HINT)


def _said(problem: str, value: Any) -> str:
    if match := re.fullmatch(r"Object missing required field `(.+)`", problem):
        return f"has no {match[1]!r}"
    if match := re.fullmatch(r"Object contains unknown field `(.+)`", problem):
        return f"has fields this Waymark does not know: {match[1]}"
    if match := re.fullmatch(r"Expected `(.+)`, got `.+`", problem):
        return f"is {value!r}, not {match[1].replace(' | ', ' or ')}"
    return f"is refused: {problem}"


def _place(keys: list[Any]) -> str:
    """``'finish'[0]``: the field, then each index (``[...]``: a key msgspec does not name)."""
    text = ""
    for key in keys:
        text += (f"{key!r}" if not text else f".{key}") if isinstance(key, str) else \
            f"[{'...' if key is None else key}]"
    return text


def _at(value: Any, key: Any) -> Any:
    if isinstance(key, str) and isinstance(value, dict):
        return value.get(key)
    if isinstance(key, int) and isinstance(value, list) and key < len(value):
        return value[key]
    return None


def _at_path(value: Any, keys: list[Any]) -> Any:
    for key in keys:
        value = _at(value, key)
    return value
