"""A checkpoint's notes as text (waymark.model.notes): what is kept, what is refused, and the
short first line the tree shows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from waymark.errors import InvalidInput
from waymark.model import tree
from waymark.model.notes import MAX_NOTES, clean, first_line, width


def test_free_text_is_kept_as_written_around_its_ends() -> None:
    text = "Before the upgrade\n\tschema v3 — 日本語, Büro, 👨\u200d👩\u200d👧\n\nlast"
    assert clean(f"  {text} \n\n") == text
    assert clean("a\r\nb\r\n") == "a\nb"  # Windows line ends
    assert clean("e\u0301") == "\u00e9"  # NFC
    assert clean("x" * MAX_NOTES) == "x" * MAX_NOTES
    assert clean("  \n\t ") is None and clean("") is None and clean(None) is None


@pytest.mark.parametrize(("text", "says"), [
    ("a\x1b[2Jb", "U+001B on line 1, a control character"),
    ("one\ntwo\rthree", "U+000D on line 2, a control character"),
    ("ok\n\n\x9b1A", "U+009B on line 3, a control character"),
    ("x\x7f", "U+007F on line 1"),
    ("evil \u202etxt", "U+202E (RIGHT-TO-LEFT OVERRIDE) on line 1, an invisible formatting"),
    ("zero\u200bwidth", "U+200B (ZERO WIDTH SPACE)"),
    ("a\u2029b", "U+2029 (PARAGRAPH SEPARATOR) on line 1, a paragraph separator"),
    ("private \ue000", "U+E000 on line 1, a character that is not printable"),
    ("x" * (MAX_NOTES + 1), f"{MAX_NOTES + 1} characters, at most {MAX_NOTES} fit"),
])
def test_what_a_terminal_or_page_would_act_on_is_refused(text: str, says: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        clean(text)
    assert says in refused.value.message
    assert refused.value.hint


def test_the_first_line_fits_its_columns() -> None:
    assert first_line(None, 40) == "" and first_line("abc", 0) == ""
    assert first_line("short", 40) == "short"
    assert first_line("one\ntwo", 40) == "one…"  # more follows
    assert first_line("one\n\n", 40) == "one"
    assert first_line("a\tb", 40) == "a b"
    assert first_line("abcdefghij", 6) == "abcde…"
    cut = first_line("日本語のメモです", 7)
    assert cut == "日本語…" and width(cut) == 7
    assert width("e\u0301") == 1


def test_the_tree_ends_a_line_with_the_notes_within_its_columns() -> None:
    node = tree.Node("a" * 32, "before upgrade", None, datetime(2026, 1, 1, tzinfo=UTC),
                     notes="first line of the notes\nsecond")
    wide = tree.draw([node], "x")[0]
    assert wide.endswith("  — first line of the notes…")
    for columns in (60, 50):
        line = tree.draw([node], "x", columns)[0]
        assert width(line) <= columns, line
    assert "—" not in tree.draw([node], "x", 45)[0]  # no room: left out
