"""The CLI's progress line (pure formatting, and the line on a terminal with a fake clock) and
"did you mean" (:func:`waymark.model.names.did_you_mean`)."""

from __future__ import annotations

import io

import pytest

from waymark.cli import output
from waymark.cli.output import Measure, StepProgress, duration, progress_line, shortened
from waymark.model.names import did_you_mean

GIB, MIB = 1 << 30, 1 << 20
WHAT = "web01 disk 1/2: merging deleted 'before upgrade' into 'clean install'"


def test_a_wide_line_shows_a_bar_bytes_rate_and_time_left() -> None:
    line = progress_line("[1/2] ", WHAT, Measure(0.5, GIB, 120 * MIB, 4.3), 200)
    assert line == (f"[1/2] {WHAT} [###############               ]  50%  "
                    "512.0 MiB of 1.0 GiB, 120.0 MiB/s, 4 s left")


@pytest.mark.parametrize("width", [150, 120, 100, 80, 60, 40, 30, 12, 3])
def test_every_line_fits_its_width(width: int) -> None:
    line = progress_line("[1/2] ", WHAT, Measure(0.43, GIB, 120 * MIB, 6.0), width)
    assert len(line) <= width, line
    assert line.startswith("[1/2] w" if width >= 30 else "[1/2]"[:width])


def test_a_narrow_line_drops_the_rate_then_the_bytes_before_it_cuts_the_names() -> None:
    measure = Measure(0.43, GIB, 120 * MIB, 6.0)
    assert progress_line("[1/2] ", WHAT, measure, 125) == \
        f"[1/2] {WHAT}  43%  440.3 MiB of 1.0 GiB, 120.0 MiB/s, 6 s left"
    assert progress_line("[1/2] ", WHAT, measure, 111) == \
        "[1/2] web01 disk 1/2: merging deleted '…fore upgrade' into 'clean install'  43%  " \
        "440.3 MiB of 1.0 GiB, 6 s left"
    assert progress_line("[1/2] ", WHAT, measure, 90) == f"[1/2] {WHAT}  43%  6 s left"
    assert progress_line("[1/2] ", WHAT, measure, 70) == \
        "[1/2] web01 disk 1/2: merging …de' into 'clean install'  43%  6 s left"
    assert progress_line("[1/2] ", WHAT, measure, 50) == \
        "[1/2] web01 disk 1/2: mer…nto 'clean install'  43%"


def test_duration_and_middle_cut() -> None:
    assert [duration(s) for s in (0.4, 59.6, 250, 7500)] == ["0 s", "1 min 0 s", "4 min 10 s",
                                                          "2 h 5 min"]
    assert shortened("abcdefghij", 5) == "ab…ij" and shortened("abc", 5) == "abc"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_with_its_rate_and_time_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    monkeypatch.setenv("COLUMNS", "100")
    now = [0.0]
    line = StepProgress(clock=lambda: now[0])
    line(1, 1, "web01: merging Now into deleted 'one'", 0.0, 100 * MIB)
    now[0] = 2.0
    line(1, 1, "web01: merging Now into deleted 'one'", 0.5, 100 * MIB)
    line(1, 1, "web01: merging Now into deleted 'one'", 0.5, 100 * MIB)  # unchanged: not drawn
    now[0] = 4.0
    line(1, 1, "web01: merging Now into deleted 'one'", 1.0, 100 * MIB)
    drawn = screen.getvalue().split("\r")[1:]
    assert len(drawn) == 3, drawn
    assert drawn[1].endswith("50%  50.0 MiB of 100.0 MiB, 25.0 MiB/s, 2 s left\x1b[K")
    assert drawn[2].endswith("100%  100.0 MiB of 100.0 MiB, 25.0 MiB/s, 0 s left\x1b[K\n")
    assert all(len(d.removesuffix("\n").removesuffix("\x1b[K")) <= 99 for d in drawn)


def test_off_a_terminal_a_step_prints_a_line_when_it_starts_then_now_and_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    now = [0.0]
    line = StepProgress(clock=lambda: now[0])
    for moment, fraction in ((0.0, 0.0), (1.0, 0.1), (output.PLAIN_EVERY + 1, 0.5),
                             (output.PLAIN_EVERY + 2, 0.6), (output.PLAIN_EVERY + 3, 1.0)):
        now[0] = moment
        line(1, 1, "web01: merging Now into deleted 'one'", fraction, 10 * MIB)
    assert log.getvalue().splitlines() == [
        "[1/1] web01: merging Now into deleted 'one' (10.0 MiB)",
        "[1/1] web01: merging Now into deleted 'one'  50%  5.0 MiB of 10.0 MiB, 465.5 KiB/s, "
        "11 s left"]


def test_did_you_mean_offers_only_the_names_given() -> None:
    names = ["web01", "web02", "database", "Web-Front"]
    assert did_you_mean("web1", names, "List them.") == "Did you mean 'web01' or 'web02'? " \
                                                         "List them."
    assert did_you_mean("WEB-FRONT", names, "List them.").startswith("Did you mean 'Web-Front'")
    assert did_you_mean("zzz", names, "List them.") == "List them."
    assert did_you_mean("web1", [], "List them.") == "List them."
