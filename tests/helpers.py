"""Helpers for tests: run the real CLI, write into images with qemu-io, hash disk content."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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

REQUIRED = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils"}


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
    """Runs ``python -m waymark`` as a user would, against one home folder."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAYMARK_")}
        env["WAYMARK_HOME"] = str(self.home)
        env["WAYMARK_TEST_SUITE"] = "1"  # the key that lets WAYMARK_FAILPOINT* arm failpoints
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> Result:
        argv = [sys.executable, "-m", "waymark", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env or self.env(),
                              input=input if input is not None else "", timeout=timeout,
                              check=False)
        return Result(list(args), proc.returncode, proc.stdout, proc.stderr)

    def __call__(self, *args: str) -> Result:
        return self.run(*args).ok()

    def json(self, *args: str) -> Any:
        return self.run(*args, "--json").ok().json()


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
                  options: tuple[str, ...] = (), schedules: bool = False) -> Iterator[str]:
    """A real ``waymark serve`` over ``wm``'s home on a free loopback port (more ``options``
    of ``waymark serve`` when given; it runs backup schedules only when ``schedules``), its
    output in ``log`` (default ``serve.log`` beside the home: a pipe nobody reads could stall
    it); yields the base URL once the OpenAPI document answers; stopped at the end."""
    log = log or wm.home.parent / "serve.log"
    url = f"http://127.0.0.1:{free_port()}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "waymark", "serve", "--listen",
                                 url.removeprefix("http://"),
                                 *(() if schedules else ("--no-schedules",)), *options],
                                env=wm.env(),
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
        ("checkpoint", "show"), ("checkpoint", "apply"), ("checkpoint", "rename"),
        ("checkpoint", "delete"), ("job", "list"), ("job", "show"), ("job", "wait"),
        ("job", "cancel")})

    def __init__(self, home: Path, url: str, token: str) -> None:
        super().__init__(home)
        self.url, self.token = url, token
        self.remote_calls = 0

    def run(self, *args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> Result:
        if tuple(args[:2]) in self.REMOTE and env is None:
            self.remote_calls += 1
            env = self.env(WAYMARK_SERVER=self.url, WAYMARK_TOKEN=self.token)
        return super().run(*args, env=env, input=input, timeout=timeout)
