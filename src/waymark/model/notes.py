"""A checkpoint's notes: free text an administrator writes about it (Hyper-V's Notes, SCVMM's
``-Description``, Proxmox's snapshot description). Pure code.

Notes are shown whole in ``checkpoint show`` and the portal's dialog, as a short first line in
``checkpoint list`` and the portal's tree. They are free text, several lines, any script, but
they reach terminals and pages, so :func:`clean` keeps them to what reads as text:

- at most :data:`MAX_NOTES` (4,000) characters, after normalising (Unicode NFC, Windows line
  ends ``\\r\\n`` made ``\\n``, white space around the whole text stripped);
- printable characters, line breaks (``\\n``) and tabs only: control characters (ESC starts the
  escape sequences that move a terminal's cursor or retitle its window; a lone carriage return
  rewrites a line), invisible format characters (the bidi overrides that reorder what follows,
  zero-width spaces), the Unicode line and paragraph separators, surrogates, private-use and
  unassigned code points are refused, naming the character and its line. The zero-width
  (non-)joiners stay: scripts and emoji need them.

Empty notes (nothing left after stripping) are no notes: :func:`clean` gives None. The same
check holds for notes read back from outside storage (a library share, a bundle): a share is
written by whoever can write its storage.
"""

from __future__ import annotations

import unicodedata

from waymark.errors import InvalidInput
from waymark.model.names import code_point

MAX_NOTES = 4000
KEPT = frozenset("\n\t\u200c\u200d")  # line breaks, tabs, zero-width (non-)joiners
HINT = (f"Write printable text (line breaks and tabs are kept), at most {MAX_NOTES} "
        "characters.")
ELLIPSIS = "…"


def clean(text: str | None, *, what: str = "checkpoint notes") -> str | None:
    """``text`` normalised and checked (see the module); None for no notes. ``what`` starts
    the error message."""
    if text is None:
        return None
    normal = unicodedata.normalize("NFC", text.replace("\r\n", "\n")).strip()
    if len(normal) > MAX_NOTES:
        raise InvalidInput(f"the {what} have {len(normal)} characters, at most {MAX_NOTES} "
                           "fit.", hint="Shorten them.")
    for number, line in enumerate(normal.split("\n"), start=1):
        for char in line:
            if char not in KEPT and _hidden(char):
                raise InvalidInput(f"the {what} contain {code_point(char)} on line {number}, "
                                   f"{_kind(char)}.", hint=HINT)
    return normal or None


def _hidden(char: str) -> bool:
    """Whether a terminal or browser would act on ``char`` rather than show it."""
    category = unicodedata.category(char)
    return category.startswith("C") or category in ("Zl", "Zp")


def _kind(char: str) -> str:
    category = unicodedata.category(char)
    return {"Cc": "a control character", "Cf": "an invisible formatting character",
            "Zl": "a line separator", "Zp": "a paragraph separator"}.get(
        category, "a character that is not printable")


def width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide and full-width characters take
    two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def first_line(notes: str | None, columns: int) -> str:
    """The notes' first line in at most ``columns`` terminal columns (tabs as spaces), ended
    with an ellipsis when it is cut or more lines follow; "" for no notes."""
    if not notes or columns < 1:
        return ""
    line, _, rest = notes.partition("\n")
    line = line.replace("\t", " ").rstrip()
    if not rest.strip() and width(line) <= columns:
        return line
    kept, used = [], width(ELLIPSIS)
    for char in line:
        used += width(char)
        if used > columns:
            break
        kept.append(char)
    return "".join(kept).rstrip() + ELLIPSIS
