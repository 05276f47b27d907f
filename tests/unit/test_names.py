"""The name grammar (waymark.model.names): what stays allowed, what is refused and how it is
said."""

from __future__ import annotations

import pytest

from waymark.errors import InvalidInput
from waymark.model import names

KEPT = ["web", "web 2", "before upgrade (2026-12-06 10:00)", "Büro", "Ελληνικά", "сервер",
        "a?b #c%d 50%", "n" * 99, "it's \"quoted\" <b>&amp;", "café", "3f2a9c81d0e",
        "db.example.com", "user@host", "web - (2026-12-06 - 10:00:00)"]


@pytest.mark.parametrize("name", KEPT)
def test_names_in_use_today_stay_valid(name: str) -> None:
    assert names.clean(name) == name


def test_names_are_normalised() -> None:
    assert names.clean("  x  ") == "x"
    assert names.clean("cafe\u0301") == "caf\u00e9"  # NFC: one code point, as typed elsewhere


@pytest.mark.parametrize(("name", "says"), [
    ("", "is empty"), ("   ", "is empty"), ("n" * 100, "100 characters; at most 99"),
    ("a\x1b[2Jb", "U+001B, a control character"), ("a\tb", "U+0009, a control character"),
    ("a\x7fb", "U+007F"), ("a\x85b", "U+0085"),
    ("invoice\u202efdp.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE), an invisible formatting"),
    ("a\u2066b", "U+2066"), ("a\u200bb", "U+200B (ZERO WIDTH SPACE)"),
    ("a\u00a0b", "U+00A0 (NO-BREAK SPACE), white space other than a plain space"),
    ("a\u2028b", "U+2028"), ("a\ue000b", "U+E000, a character that is not printable"),
    ("../profiles/small", "U+002F (SOLIDUS)"), ("a\\b", "U+005C"),
    ("a,b", "U+002C (COMMA)"), ("web,process=evil", "U+002C"),
    (".", "is a path step"), ("..", "is a path step"), ("-rf", "starts with '-'"),
    ("0123456789abcdef0123456789abcdef", "looks like an id"),
    ("0123456789ABCDEF0123456789ABCDEF", "looks like an id"),
    ("0123456789ab", "looks like an id"),
    ("01234567-89ab-cdef-0123-456789abcdef", "looks like an id"),
    ("p\u0430ypal", "mixes letters of Latin (U+0070 (LATIN SMALL LETTER P)) and Cyrillic "
                    "(U+0430 (CYRILLIC SMALL LETTER A))"),
    ("\u03bfpen", "Greek"),
])
def test_refused_names_say_what_is_wrong(name: str, says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        names.clean(name, what="VM name")
    assert caught.value.message.startswith("the VM name ")
    assert says in caught.value.message
    assert caught.value.hint
    assert "\x1b" not in str(caught.value) and "\u202e" not in str(caught.value)


def test_checkpoint_names_may_hold_commas_and_nothing_else_more() -> None:
    assert names.clean("live, with memory", what="checkpoint name", commas=True) == \
        "live, with memory"
    with pytest.raises(InvalidInput):
        names.clean("a,b/c", what="checkpoint name", commas=True)
    with pytest.raises(InvalidInput):
        names.clean("a,b", what="VM name")
