"""What a fake QMP server or guest agent in the unit tests reads: JSON messages one after
another, none ended by a newline (a QMP client sends them so)."""

from __future__ import annotations

import json
from typing import Any


def messages(pending: str) -> tuple[list[dict[str, Any]], str]:
    """The complete JSON messages at the start of ``pending`` and what is left of it."""
    found = []
    while pending.strip():
        try:
            message, end = json.JSONDecoder().raw_decode(pending.lstrip())
        except ValueError:
            break
        pending = pending.lstrip()[end:]
        found.append(message)
    return found, pending
