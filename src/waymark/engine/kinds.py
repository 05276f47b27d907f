"""A table of the kinds the engine knows (the journal's intent kinds, the job kinds), filled by
the composition root (:mod:`waymark.wiring`). A kind not in it is an error, never a silent
default: it was written by a newer Waymark, or it is a bug."""

from __future__ import annotations

from typing import Generic, TypeVar

from waymark.errors import UnknownKind

T = TypeVar("T")
HINT = ("This Waymark does not know that kind (a newer Waymark wrote it?). Run the Waymark "
        "that wrote it, or report a bug.")


class Kinds(Generic[T]):
    """Kind name -> what the engine does with it. ``unknown``: the refusal's message, with
    ``{kind}`` where the kind's name goes."""

    def __init__(self, unknown: str) -> None:
        self.unknown = unknown
        self.known: dict[str, T] = {}

    def register(self, kind: str, entry: T) -> None:
        self.known[kind] = entry

    def names(self) -> frozenset[str]:
        return frozenset(self.known)

    def of(self, kind: str) -> T:
        entry = self.known.get(kind)
        if entry is None:
            raise UnknownKind(self.unknown.format(kind=repr(kind)), hint=HINT)
        return entry
