"""Printing results: human text, or JSON on stdout with ``--json``."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from waymark.errors import WaymarkError
from waymark.model.units import human
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


PLAIN_EVERY = 10.0  # seconds between a step's plain progress lines (no terminal, --json)
BAR_MAX, BAR_MIN = 30, 10  # a terminal line's bar, in characters (none below BAR_MIN)
LABEL_MIN = 48  # a label cut shorter than this first makes room by dropping rate, then bytes


def duration(seconds: float) -> str:
    """``6 s``, ``4 min 10 s``, ``2 h 5 min``: a time left, as a person reads it."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def shortened(text: str, width: int) -> str:
    """``text`` cut to ``width`` in its middle (its start names the VM, its end the
    checkpoints)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


@dataclass(frozen=True)
class Measure:
    """One moment of a step: how far (``fraction``), of how many bytes (``size``, when known),
    how fast (``rate``, bytes a second) and how long still (``left``, seconds)."""

    fraction: float
    size: int | None = None
    rate: float | None = None
    left: float | None = None

    def figures(self) -> dict[str, str]:
        """The figures after the percentage, in the order shown: the bytes done and total, the
        rate, the time left (each only when known)."""
        out = {}
        if self.size:
            out["bytes"] = f"{human(int(self.fraction * self.size))} of {human(self.size)}"
        if self.rate is not None:
            out["rate"] = f"{human(int(self.rate))}/s"
        if self.left is not None:
            out["left"] = f"{duration(self.left)} left"
        return out


# How a line too narrow for everything gives way, in turn: (the figure it drops, how much of
# the label must then fit): the rate goes before the label is cut at all, the bytes before it is
# cut below LABEL_MIN characters, the time left last.
_GIVING_WAY = (("", "all"), ("rate", "all"), ("", "some"), ("bytes", "some"), ("left", "any"))


def progress_line(head: str, what: str, measure: Measure, width: int, *, bar: bool = True
                  ) -> str:
    """A progress line of at most ``width`` characters: ``head`` (``[1/2] ``), ``what`` (cut in
    its middle when it must be), a bar when there is room (and ``bar``), the percentage, the
    bytes done and total, the rate and the time left (see :data:`_GIVING_WAY`)."""
    figures = measure.figures()
    percent = f"{int(measure.fraction * 100):3d}%"
    for dropped, label_fits in _GIVING_WAY:
        figures.pop(dropped, None)
        stats = "  ".join([percent, ", ".join(figures.values())]).rstrip()
        room = width - len(head) - len(stats) - 1
        needed = {"all": len(what), "some": min(LABEL_MIN, len(what)), "any": 0}[label_fits]
        if room >= needed:
            break
    label = shortened(what, max(room, 0))
    spare = room - len(label) - 1
    if bar and spare >= BAR_MIN + 2:
        cells = min(BAR_MAX, spare - 2)
        label += " [" + ("#" * int(measure.fraction * cells)).ljust(cells) + "]"
    return f"{head}{label} {stats}"[:width]


class StepProgress:
    """A progress line on stderr for multi-step work, naming the VM and its checkpoints:
    ``[1/2] web01 disk 1/1 (0a1b2c3d4e5f): merging 'a' into 'b' [###  ]  43%  340 MiB of
    1.0 GiB, 120 MiB/s, 6 s left`` (bytes, rate and time left when the step's size is known,
    the time left from the pace so far otherwise).

    On a terminal the line is redrawn in place (``\r``), fitted to its width
    (:func:`shutil.get_terminal_size`, which honours ``COLUMNS``). Otherwise (a pipe, a log) or
    with ``plain`` (``--json``), plain lines: one when a step starts (with its size), then one
    every :data:`PLAIN_EVERY` seconds while it runs, so logs stay readable.
    """

    def __init__(self, plain: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.tty = sys.stderr.isatty() and not plain
        self.clock = clock
        self.last: tuple[int, int, str] | None = None
        self.began, self.began_at, self.printed = 0.0, 0.0, 0.0
        self.drawn = ""  # the terminal's line as last drawn

    def __call__(self, number: int, total: int, what: str, fraction: float,
                 size: int | None = None) -> None:
        now, step = self.clock(), (number, total, what)
        fresh = step != self.last
        if fresh:
            self.last, self.began, self.began_at, self.printed = step, fraction, now, now
        measure = self.measure(fraction, size, now)
        head = f"[{number}/{total}] "
        if self.tty:
            width = shutil.get_terminal_size().columns - 1  # the last column wraps
            line = progress_line(head, printable(what), measure, width)
            ended = fraction >= 1.0 and number == total
            if line != self.drawn or ended:
                click.echo(f"\r{line}\033[K", err=True, nl=ended)
            self.drawn = line
        elif fresh:
            sized = f" ({human(size)})" if size else ""
            click.echo(f"{head}{printable(what)}{sized}", err=True)
        elif now - self.printed >= PLAIN_EVERY and fraction < 1.0:
            self.printed = now
            click.echo(progress_line(head, printable(what), measure, 1 << 16, bar=False),
                       err=True)

    def measure(self, fraction: float, size: int | None, now: float) -> Measure:
        """Where the step is: the rate and time left from its pace since it began."""
        elapsed, gained = now - self.began_at, fraction - self.began
        if elapsed < 0.5 or gained <= 0:
            return Measure(fraction, size)
        left = elapsed * (1.0 - fraction) / gained
        return Measure(fraction, size, gained * size / elapsed if size else None, left)


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
