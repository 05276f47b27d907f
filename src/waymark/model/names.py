"""The one grammar of names a person gives: VMs, checkpoints, templates, profiles, schedules,
API tokens, and (with a stricter pattern on top) users and locations.

A name is shown in tables, typed on command lines, put into portal URLs and QEMU options, so it
must read as what it is and never change where a click or a command goes. Hyper-V is the guide:
its VM names are free text of up to 100 characters; Waymark keeps the free text (spaces,
punctuation, any script: ``before upgrade (2026-12-06 10:00)``, ``web 2``, ``Büro``) and refuses
what can confuse a reader, a URL or QEMU.

:func:`clean` first normalises (Unicode NFC, surrounding white space stripped), then refuses:

- an empty name, or one longer than :data:`MAX_NAME` (99) characters;
- control characters (C0, DEL, C1), invisible format characters such as the bidi controls
  U+202A-U+202E and U+2066-U+2069 or zero-width spaces (Unicode category Cf), and surrogates,
  private-use and unassigned code points (every category ``C*``);
- white space other than the plain space (no tabs, line breaks, no-break or ideographic spaces:
  they look like a space but are not one);
- ``/`` and ``\\`` (a name is one segment of a URL or path), and ``,`` (QEMU's option separator
  and the separator of Waymark's own ``--disk``/``--nic`` options), except in checkpoint names
  (``commas=True``): they reach neither, and Hyper-V users write "before upgrade, with memory";
- the names ``.`` and ``..`` (a browser resolves them in a URL, even percent-encoded);
- a leading ``-`` (it would read as an option on a command line);
- letters of Latin mixed with Cyrillic or Greek in one name (``раypal`` with a Cyrillic ``р``
  and ``а`` looks like ``paypal``); a name wholly in one script is fine;
- anything shaped like an id: 12 or more hex digits (ids are 32, ``vm list`` shows 12), or a
  UUID written with dashes. References resolve a name before an id prefix, so a name that looks
  like an id could stand in for another object.

Every refusal is an :class:`~waymark.errors.InvalidInput` naming the character by code point.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable

from waymark.errors import InvalidInput

MAX_NAME = 99
FORBIDDEN = {"/": "a name is one part of a URL or path",
             "\\": "a name is one part of a URL or path",
             ",": "a comma separates QEMU's and Waymark's options"}
LOOK_ALIKE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")
ID_SHAPED = re.compile(r"[0-9a-f]{12,}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)
HINT = "Use letters, digits, spaces and punctuation other than / \\ , (1 to 99 characters)."


def clean(name: str, *, what: str = "name", commas: bool = False) -> str:
    """``name`` normalised (NFC, surrounding white space stripped) and checked against the
    grammar above; ``what`` ("VM name", ...) starts the error message; ``commas``: a comma is
    allowed (checkpoint names)."""
    text = unicodedata.normalize("NFC", name).strip()
    if not text:
        raise InvalidInput(f"the {what} is empty.", hint="Give 1 to 99 characters.")
    if len(text) > MAX_NAME:
        raise InvalidInput(f"the {what} has {len(text)} characters; at most {MAX_NAME} fit.",
                           hint="Give a shorter name.")
    for char in text:
        if not (commas and char == ","):
            _check_character(char, text, what)
    _check_shape(text, what)
    _check_scripts(text, what)
    return text


def code_point(char: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character as a reader can look it up."""
    label = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({label})" if label else "")


def _refuse(text: str, what: str, problem: str, hint: str = HINT) -> InvalidInput:
    return InvalidInput(f"the {what} {text!r} {problem}.", hint=hint)


def _check_character(char: str, text: str, what: str) -> None:
    category = unicodedata.category(char)
    if category.startswith("C"):
        kind = "a control character" if category == "Cc" else (
            "an invisible formatting character" if category == "Cf"
            else "a character that is not printable")
        raise _refuse(text, what, f"contains {code_point(char)}, {kind}")
    if category.startswith("Z") and char != " ":
        raise _refuse(text, what, f"contains {code_point(char)}, white space other than a "
                                  "plain space")
    if char in FORBIDDEN:
        raise _refuse(text, what, f"contains {code_point(char)}: {FORBIDDEN[char]}")


def _check_shape(text: str, what: str) -> None:
    if text in (".", ".."):
        raise _refuse(text, what, "is a path step, not a name")
    if text.startswith("-"):
        raise _refuse(text, what, "starts with '-' and would read as an option",
                      hint="Start it with a letter or digit.")
    if ID_SHAPED.fullmatch(text):
        raise _refuse(text, what, "looks like an id (12 or more hex digits, or a UUID), so it "
                                  "could be taken for another object's id",
                      hint="Add a letter outside a-f, a space or a dash.")


def _check_scripts(text: str, what: str) -> None:
    first: dict[str, str] = {}
    for char in text:
        if char.isalpha():
            script = unicodedata.name(char, "").split(" ", 1)[0]
            if script in LOOK_ALIKE_SCRIPTS:
                first.setdefault(script, char)
    if len(first) > 1:
        shown = " and ".join(f"{s.title()} ({code_point(c)})" for s, c in first.items())
        raise _refuse(text, what, f"mixes letters of {shown} that can look alike",
                      hint="Write the name's letters in one script.")


def did_you_mean(ref: str, names: Iterable[str], then: str) -> str:
    """A hint for a name that matched nothing: up to three of ``names`` that look like ``ref``
    (:func:`difflib.get_close_matches`, case-insensitively), then ``then`` (what to do
    otherwise). ``names`` must be only those the reader may see: an API caller's scope, never
    every name on the host."""
    by_folded: dict[str, str] = {}
    for name in sorted(names):
        by_folded.setdefault(name.casefold(), name)
    close = difflib.get_close_matches(ref.casefold(), list(by_folded), n=3, cutoff=0.6)
    if not close:
        return then
    quoted = " or ".join(repr(by_folded[c]) for c in close)
    return f"Did you mean {quoted}? {then}"
