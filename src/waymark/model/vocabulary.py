"""Shapes every answer shares (docs/api.md, "The JSON vocabulary").

A delete answers ``{"deleted": [Gone, ...]}`` on the API and with the CLI's ``--json``: a list,
since one request may delete several things (checkpoints matched by a pattern, a subtree), each
naming what went by its kind, its id (``None`` for what only has a name: profiles, templates,
locations, schedules) and its name.
"""

from __future__ import annotations

from typing import TypedDict


class Gone(TypedDict):
    """One thing a delete removed."""

    kind: str  # vm, checkpoint, user, token, profile, template, location, schedule
    id: str | None
    name: str


class DeleteAnswer(TypedDict):
    deleted: list[Gone]


def gone(kind: str, name: str, id: str | None = None) -> Gone:
    return {"kind": kind, "id": id, "name": name}


def deleted(*what: Gone) -> DeleteAnswer:
    return {"deleted": list(what)}
