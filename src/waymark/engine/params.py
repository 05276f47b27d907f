"""Intent parameters: per journal intent kind, a frozen dataclass of what its commit handler
(and, for a live kind, its resolver) needs, with one JSON form (:mod:`waymark.engine.jsonform`).

The kind's name is the class's ``kind``, so an intent's kind and its parameters cannot
disagree: :func:`waymark.engine.journal.add` takes the parameters and writes their kind. The
catalog's ``intents.params`` holds :meth:`Params.to_json` (the object of the fields, the shape
the journal has always stored); :meth:`Params.from_json` reads it back checked (a missing,
ill-typed or unknown field: :class:`~waymark.errors.MalformedRecord`). Each class lives beside
its commit handler; the composition root (:mod:`waymark.wiring`) pairs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from waymark.engine import jsonform


@dataclass(frozen=True, kw_only=True)
class Params:
    """The parameters of one intent kind (``kind``: its name in the catalog)."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return jsonform.dump(self)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        return jsonform.load(cls, data, f"the parameters of a {cls.kind} intent")
