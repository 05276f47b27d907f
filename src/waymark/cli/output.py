"""Printing results: human text, or JSON on stdout with ``--json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import click

from waymark.errors import WaymarkError

F = TypeVar("F", bound=Callable[..., Any])

# What a terminal acts on instead of showing: C0 controls (ESC starts escape sequences that
# retitle the window or erase lines), DEL, C1 controls (0x9b is a one-byte CSI), the bidi
# controls that reorder what is shown (marks, embeddings, overrides, isolates), invisible
# characters and the Unicode line separators. The zero-width (non-)joiners stay: scripts and
# emoji need them.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x180E, 0x200B, 0x200E, 0x200F,
             *range(0x2028, 0x202F), *range(0x2060, 0x2070), 0xFEFF]
_SHOWN = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_SHOWN_KEEPING_LINES = {c: s for c, s in _SHOWN.items() if c not in (0x0A, 0x09)}


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` safe to print on a terminal: every control character (see ``_CONTROLS``) is
    shown as its escape (ESC as ``\\x1b``, RIGHT-TO-LEFT OVERRIDE as ``\\u202e``), so text from
    a guest, a remote client or a server cannot move the cursor, rewrite lines or hide what
    follows. With ``lines``, newlines and tabs stay (the text is the CLI's own layout around
    fields that were made printable on their own). Use it for everything printed that Waymark
    did not write itself."""
    return text.translate(_SHOWN_KEEPING_LINES if lines else _SHOWN)


def json_option(fn: F) -> F:
    """Every command takes ``--json``: machine-readable stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON on stdout.")(fn)


def emit(as_json: bool, data: Any, lines: Iterable[str] = ()) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        for line in lines:  # a safety net: fields from outside are made printable on their own
            click.echo(printable(line, lines=True))


def warn(message: str) -> None:
    click.echo(f"warning: {printable(message, lines=True)}", err=True)


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


class StepProgress:
    """A progress line on stderr for multi-step work: ``[2/3] merging a into b  43%``.

    On a terminal the line is redrawn in place; otherwise each step is printed once when it
    starts, so logs stay readable.
    """

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last: tuple[int, int] | None = None

    def __call__(self, number: int, total: int, what: str, fraction: float) -> None:
        percent = int(fraction * 100)
        if self.tty:
            width = 30
            bar = "#" * (percent * width // 100)
            click.echo(f"\r[{number}/{total}] [{bar:<{width}}] {percent:3d}%  "
                       f"{printable(what)}\033[K",
                       err=True, nl=fraction >= 1.0 and number == total)
        elif self.last != (number, total):
            click.echo(f"[{number}/{total}] {printable(what)}", err=True)
        self.last = (number, total)


def fraction_progress(what: str) -> Callable[[float], None]:
    """A one-step progress line (``exporting  43%``) for a qemu-img copy."""
    line = StepProgress()
    return lambda fraction: line(1, 1, what, fraction)


def fail_after(as_json: bool, err: WaymarkError) -> NoReturn:
    """End a command that already emitted its result with the failure's exit code; with
    ``--json`` stdout stays one JSON document (the message goes to stderr only)."""
    if as_json:
        click.echo(f"error: {printable(err.message, lines=True)}", err=True)
        sys.exit(err.exit_code)
    raise err
