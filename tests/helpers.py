"""Helpers for tests: run the real CLI, write into images with qemu-io, hash disk content."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from waymark import modes
from waymark.cli import main as cli_main

REQUIRED = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils"}
# the one error envelope's members, the API's and the CLI's (--json): waymark.errors.envelope
ERROR_KEYS = {"code", "kind", "message", "hint", "exit_code", "details"}


def require_tools() -> None:
    """A missing tool fails the test run with the command that installs it (no silent skip)."""
    missing = [f"{tool} (apt-get install -y {pkg})" for tool, pkg in REQUIRED.items()
               if shutil.which(tool) is None]
    if missing:
        raise RuntimeError("missing tools: " + ", ".join(missing))


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def ok(self) -> Result:
        assert self.returncode == 0, f"waymark {self.args} failed ({self.returncode}):\n" \
                                     f"{self.stdout}\n{self.stderr}"
        return self


class Waymark:
    """Runs the ``waymark`` command line as a user would, against one home folder.

    A command runs in this process (:func:`waymark.cli.main.run`, with its own environment,
    stdin, stdout, stderr and umask, as the entry point gives it) unless it must be a process
    of its own: when the environment arms failpoints (the process is killed), when the command
    outlives or waits on its caller (``serve``, ``job run``, ``vm console``), or when a test
    asks for it (``separate=True``). Starting an interpreter per command was most of the
    suite's time."""

    SEPARATE = frozenset({("serve",), ("job", "run"), ("vm", "console")})

    def __init__(self, home: Path) -> None:
        self.home = home

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAYMARK_")}
        env["WAYMARK_HOME"] = str(self.home)
        env["WAYMARK_TEST_SUITE"] = "1"  # the key that lets WAYMARK_FAILPOINT* arm failpoints
        # no consolidate job left behind by a command (a background process would race the
        # test's own reads of the files); tests/integration/test_consolidation.py turns it on
        env["WAYMARK_BACKGROUND_CONSOLIDATION"] = "off"
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120, separate: bool = False) -> Result:
        env = env or self.env()
        if separate or _must_be_separate(args, env, self.SEPARATE):
            return _run_process(args, env, input, timeout)
        return _run_in_process(args, env, input, timeout)

    def __call__(self, *args: str) -> Result:
        return self.run(*args).ok()

    def json(self, *args: str) -> Any:
        return self.run(*args, "--json").ok().json()


def _must_be_separate(args: tuple[str, ...], env: dict[str, str],
                      separate: frozenset[tuple[str, ...]]) -> bool:
    words = tuple(a for a in args if not a.startswith("-"))
    return (any(k.startswith("WAYMARK_FAILPOINT") and v for k, v in env.items())
            or any(words[:len(cmd)] == cmd for cmd in separate))


def _run_process(args: tuple[str, ...], env: dict[str, str], input: str | None,
                 timeout: float) -> Result:
    argv = [sys.executable, "-m", "waymark", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                          input=input if input is not None else "", timeout=timeout,
                          check=False)
    return Result(list(args), proc.returncode, proc.stdout, proc.stderr)


class _TimedOut(BaseException):
    """A command run in-process ran past its timeout (BaseException: the command's own
    ``except Exception`` must not swallow it)."""


def _run_in_process(args: tuple[str, ...], env: dict[str, str], input: str | None,
                    timeout: float) -> Result:
    changes: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    changes.update(env)

    def expired(signum: int, frame: object) -> None:
        raise _TimedOut(f"waymark {list(args)} ran past {timeout} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    umask = os.umask(modes.UMASK)
    try:
        with CliRunner().isolation(input=input or "", env=changes) as (out, err, _):
            try:
                code = cli_main.run(list(args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.umask(umask)
    return Result(list(args), code, stdout, stderr)


def qemu_io_write(path: Path, fmt: str, offset: int, length: int, pattern: int) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}",
                    str(path)], check=True, capture_output=True)


def content_sha256(path: Path | str, fmt: str = "qcow2") -> str:
    """sha256 of the disk as the guest sees it: the whole chain, flattened to raw."""
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path),
                        str(flat)], check=True, capture_output=True)
        return file_sha256(flat)


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def query(home: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the catalog of ``home`` directly (tests check what the CLI does not print)."""
    con = sqlite3.connect(home / "catalog.db")
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def vm_id_named(home: Path, name: str) -> str:
    ((found,),) = query(home, "SELECT id FROM vms WHERE name = ?", name)
    return str(found)


def active_image_of(home: Path, name: str) -> str:
    """The path of the active image of the VM's one disk, from the catalog."""
    ((path,),) = query(home, "SELECT i.path FROM disks d JOIN images i "
                             "ON i.id = d.active_image_id JOIN vms v ON v.id = d.vm_id "
                             "WHERE v.name = ?", name)
    return str(path)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted on ``folder`` (a full file system on demand), unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        done = subprocess.run(["umount", str(folder)], check=False, capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def own_bytes(path: Path) -> int:
    """The guest bytes a qcow2 file holds itself (not through its backing file)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-U", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["present"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serve_process(wm: Waymark, log: Path | None = None, timeout: float = 30.0,
                  options: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  schedules: bool = False) -> Iterator[str]:
    """A real ``waymark serve`` over ``wm``'s home on a free loopback port (more ``options``
    of ``waymark serve`` when given, ``env``: more environment; it runs backup schedules only
    when ``schedules``), its output in ``log`` (default ``serve.log`` beside the home: a pipe
    nobody reads could stall it); yields the base URL once the OpenAPI document answers;
    stopped at the end."""
    log = log or wm.home.parent / "serve.log"
    url = f"http://127.0.0.1:{free_port()}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "waymark", "serve", "--listen",
                                 url.removeprefix("http://"),
                                 *(() if schedules else ("--no-schedules",)), *options],
                                env=wm.env(**(env or {})),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/openapi.json", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("waymark serve did not come up:\n"
                                       + log.read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


@contextmanager
def served(wm: Waymark) -> Iterator[tuple[str, str]]:
    """:func:`serve_process` with an administrator (``root-admin``) and their API token:
    yields (base URL, token)."""
    wm.run("user", "add", "root-admin", "--role", "administrator", "--password-stdin",
           input="test-password\n").ok()
    token = wm.json("token", "create", "tests", "--user", "root-admin")["token"]
    with serve_process(wm) as url:
        yield url, token


class RemoteWaymark(Waymark):
    """The real CLI against a real ``waymark serve`` on the same home: the commands that work
    through ``--server`` go through it (WAYMARK_SERVER, WAYMARK_TOKEN); the rest (creating VMs
    from files, check, ...) run on the host as a user there would."""

    REMOTE = frozenset({
        ("vm", "list"), ("vm", "show"), ("vm", "start"), ("vm", "stop"), ("vm", "save"),
        ("vm", "pause"), ("vm", "resume"), ("checkpoint", "create"), ("checkpoint", "list"),
        ("checkpoint", "show"), ("checkpoint", "apply"), ("checkpoint", "revert"),
        ("checkpoint", "rename"), ("checkpoint", "notes"), ("checkpoint", "delete"),
        ("job", "list"), ("job", "show"), ("job", "wait"), ("job", "cancel")})

    def __init__(self, home: Path, url: str, token: str) -> None:
        super().__init__(home)
        self.url, self.token = url, token
        self.remote_calls = 0

    def run(self, *args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120, separate: bool = False) -> Result:
        if tuple(args[:2]) in self.REMOTE and env is None:
            self.remote_calls += 1
            env = self.env(WAYMARK_SERVER=self.url, WAYMARK_TOKEN=self.token)
        return super().run(*args, env=env, input=input, timeout=timeout, separate=separate)
