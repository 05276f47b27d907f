"""Printing results: human text, or JSON on stdout with ``--json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def json_option(fn: F) -> F:
    """Every command takes ``--json``: machine-readable stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON on stdout.")(fn)


def emit(as_json: bool, data: Any, lines: Iterable[str] = ()) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        for line in lines:
            click.echo(line)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
