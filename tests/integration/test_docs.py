"""The user documentation cannot rot: the walkthrough of ``docs/getting-started.md`` runs as
written, and ``docs/troubleshooting.md`` explains every exit code and error class.

The guide's convention: a fenced ```` ```console ```` block is runnable. Each of its lines that
starts with ``$ `` is a ``waymark`` or ``qemu-img`` command; the lines after it, up to the
next command, are what it prints (ids and times may differ). The blocks run in order, in one
scratch ``$HOME`` (``~`` is that folder) with the default home folder below it, so each command
sees what the ones before it made. ```` ```sh ```` blocks are illustrations and never run.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import waymark
from tests.helpers import Waymark
from waymark import errors

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDE = DOCS / "getting-started.md"
TROUBLESHOOTING = DOCS / "troubleshooting.md"
RUNNABLE = ("waymark", "qemu-img")
# the guide's output was taken as root, whose $HOME is /root
DOC_HOME = "/root"
# what differs from run to run: ids (hex), times (a checkpoint's default name and its stamp),
# sizes on disk (the file system's allocation)
VOLATILE = [(re.compile(r"[0-9a-f]{8,}"), "<id>"),
            (re.compile(r"\d{4}-\d\d-\d\d( - |[ T])\d\d:\d\d:\d\dZ?"), "<time>"),
            (re.compile(r"\b\d+(\.\d)? (B|KiB|MiB|GiB|TiB)\b"), "<size>")]


@dataclass
class Command:
    argv: list[str]
    expected: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def console_blocks(markdown: str) -> Iterator[list[str]]:
    """The lines of each ```` ```console ```` block, in order."""
    block: list[str] | None = None
    for line in markdown.splitlines():
        if block is None and line.strip() == "```console":
            block = []
        elif block is not None and line.strip() == "```":
            yield block
            block = None
        elif block is not None:
            block.append(line)


def guide_commands(markdown: str) -> list[Command]:
    """The runnable commands of the guide, each with the output lines shown after it."""
    commands: list[Command] = []
    for block in console_blocks(markdown):
        for line in block:
            if line.startswith("$ "):
                commands.append(Command(shlex.split(line[2:])))
            elif line.strip():
                assert commands, f"output before any command in a console block: {line!r}"
                commands[-1].expected.append(line)
    return commands


def expand_home(argv: list[str], home: Path) -> list[str]:
    return [str(home / arg[2:]) if arg.startswith("~/") else arg for arg in argv]


def masked(line: str, home: str) -> str:
    line = line.rstrip().replace(home, "~")
    for pattern, placeholder in VOLATILE:
        line = pattern.sub(placeholder, line)
    return line


def run(command: Command, wm: Waymark, home: Path) -> str:
    """Run one command of the guide; its stdout and stderr, after asserting it succeeded."""
    argv = expand_home(command.argv, home)
    if argv[0] == "waymark":
        result = wm.run(*argv[1:], env=wm.env(HOME=str(home)))
        code, out = result.returncode, result.stdout + result.stderr
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=home, check=False)
        code, out = proc.returncode, proc.stdout + proc.stderr
    assert code == 0, f"the guide's `{command.text}` failed ({code}):\n{out}"
    return out


def test_the_getting_started_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = guide_commands(GUIDE.read_text())
    programs = {c.argv[0] for c in commands}
    assert programs <= set(RUNNABLE), f"a console block runs something else: {programs}"
    steps = {tuple(c.argv[1:3]) for c in commands if c.argv[0] == "waymark"}
    for step in [("vm", "create"), ("checkpoint", "create"), ("checkpoint", "list"),
                 ("checkpoint", "apply"), ("checkpoint", "delete")]:
        assert step in steps, f"the guide no longer runs waymark {' '.join(step)}"
    home = tmp_path / "user"
    home.mkdir()
    wm = Waymark(home / ".local/share/waymark")  # the default home of a user with this $HOME
    for command in commands:
        shown = [masked(line, str(home)) for line in run(command, wm, home).splitlines()]
        for line in command.expected:
            assert masked(line, DOC_HOME) in shown, \
                f"`{command.text}` no longer prints {line!r}; it prints:\n" + "\n".join(shown)


def error_classes() -> list[type[errors.WaymarkError]]:
    """Every error class of the product, whichever modules the test run imported so far."""
    for module in pkgutil.walk_packages(waymark.__path__, "waymark."):
        if not module.name.endswith("__main__"):  # (that one runs the command line)
            importlib.import_module(module.name)
    found: list[type[errors.WaymarkError]] = [errors.WaymarkError]
    for cls in found:
        found += cls.__subclasses__()
    return found


def test_troubleshooting_explains_every_exit_code_and_error_class() -> None:
    text = TROUBLESHOOTING.read_text()
    headings = {int(code) for code in re.findall(r"^## Exit (\d+)\b", text, re.MULTILINE)}
    classes = error_classes()
    assert len(classes) > 10
    missing_codes = {cls.exit_code for cls in classes} - headings
    assert not missing_codes, f"docs/troubleshooting.md has no '## Exit N' for {missing_codes}"
    missing_names = [cls.__name__ for cls in classes  # (a _private one never reaches a user)
                     if not cls.__name__.startswith("_")
                     and not re.search(rf"\b{cls.__name__}\b", text)]
    assert not missing_names, f"docs/troubleshooting.md never names {missing_names}"
    stale = headings - {cls.exit_code for cls in classes}
    assert not stale, f"docs/troubleshooting.md explains exit codes nothing raises: {stale}"


def test_a_missing_qemu_names_the_debian_package_that_installs_it(tmp_path: Path) -> None:
    """Troubleshooting's exit 69: the hint is an apt-get line that works (the program is
    qemu-system-x86_64, its package qemu-system-x86)."""
    wm = Waymark(tmp_path / "home")
    image = tmp_path / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    wm("vm", "create", "web", "--disk", str(image))
    tools = tmp_path / "bin"  # qemu-img and qemu-io, but no QEMU
    tools.mkdir()
    for program in ("qemu-img", "qemu-io"):
        (tools / program).symlink_to(shutil.which(program) or program)
    result = wm.run("vm", "start", "web", env=wm.env(PATH=str(tools)))
    assert result.returncode == errors.ToolMissing.exit_code, result.stderr
    assert "qemu-system-x86_64 is not installed" in result.stderr
    assert "apt-get install -y qemu-system-x86\n" in result.stderr
    assert wm.json("vm", "show", "web")["state"] == "off"


def test_serve_on_a_port_in_use_is_a_conflict_naming_the_address(tmp_path: Path) -> None:
    """Troubleshooting's "waymark serve does not start": a taken port is Waymark's Conflict
    (exit 5) with what to do, not uvicorn's log line and its exit 3 (NotFound's code)."""
    wm = Waymark(tmp_path / "home")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        result = wm.run("serve", "--listen", listen, "--no-schedules", timeout=60)
    assert result.returncode == errors.Conflict.exit_code, result.stderr
    assert f"error: cannot listen on {listen}: Address already in use." in result.stderr
    assert "--listen" in result.stderr.splitlines()[-1]
