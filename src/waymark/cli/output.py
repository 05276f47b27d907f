"""Printing results: human text, or JSON on stdout with ``--json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import click

from waymark.errors import WaymarkError
from waymark.text import printable

F = TypeVar("F", bound=Callable[..., Any])


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
