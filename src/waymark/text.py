"""Untrusted text made safe to show: what a guest, a remote client, a server or external
storage wrote reaches terminals (the CLI) and pages (the portal) with its control characters
shown as escapes, never acted on."""

from __future__ import annotations

# What a terminal or a browser acts on instead of showing: C0 controls (ESC starts escape
# sequences that retitle the window or erase lines), DEL, C1 controls (0x9b is a one-byte CSI),
# the bidi controls that reorder what is shown (marks, embeddings, overrides, isolates),
# invisible characters and the Unicode line separators. The zero-width (non-)joiners stay:
# scripts and emoji need them.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x180E, 0x200B, 0x200E, 0x200F,
             *range(0x2028, 0x202F), *range(0x2060, 0x2070), 0xFEFF]
_SHOWN = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_SHOWN_KEEPING_LINES = {c: s for c, s in _SHOWN.items() if c not in (0x0A, 0x09)}


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` safe to show: every control character (see ``_CONTROLS``) is shown as its
    escape (ESC as ``\\x1b``, RIGHT-TO-LEFT OVERRIDE as ``\\u202e``), so text from a guest, a
    remote client or a server cannot move the cursor, rewrite lines, reorder what follows or
    hide it. With ``lines``, newlines and tabs stay (the text is the caller's own layout around
    fields that were made printable on their own). Use it for everything shown that Waymark
    did not write itself."""
    return text.translate(_SHOWN_KEEPING_LINES if lines else _SHOWN)
