"""Intent parameters: per journal intent kind, a frozen record (:class:`msgspec.Struct`) of what
its commit handler (and, for a live kind, its resolver) needs, with one JSON form
(:mod:`waymark.engine.records`).

The kind's name is the class's ``kind``, so an intent's kind and its parameters cannot
disagree: :func:`waymark.engine.journal.add` takes the parameters and writes their kind. The
catalog's ``intents.params`` holds :meth:`Params.to_json` (the object of the fields, the shape
the journal has always stored); :meth:`Params.from_json` reads it back checked (a missing,
ill-typed or unknown field: :class:`~waymark.errors.MalformedRecord`; a step of an unknown op
held in it: :class:`~waymark.errors.UnknownKind`). Each class lives beside its commit handler
(and says ``kw_only=True`` again); the composition root (:mod:`waymark.wiring`) pairs them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from waymark.engine import records
from waymark.engine.records import Record


class Params(Record, frozen=True, kw_only=True):
    """The parameters of one intent kind (``kind``: its name in the catalog)."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return records.dump(self)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        params: Self = records.load(cls, data, f"the parameters of a {cls.kind} intent")
        return params
