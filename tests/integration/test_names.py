"""Names that would confuse the portal, QEMU or a reader are refused wherever a name enters,
through the CLI and a real ``waymark serve``, with nothing created or changed.

The names are the review's: ``../profiles/small`` (a self-service VM that turned an
administrator's "Save settings" into a profile change), ``a,b`` (a QEMU sub-option), an ESC
sequence (retitles a terminal), U+202E (shows text backwards), and a real VM's id (its owner's
commands would reach the impostor). A real QEMU started for a VM whose name and folders hold
commas keeps each of them one value.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Waymark, file_sha256, query, serve_process
from waymark.model.hardware import HardwareConfig
from waymark.qemu import cmdline

EXIT_INVALID = 2
BAD = {"slash": "../profiles/small", "comma": "a,b", "escape": "x\x1b]0;pwned\x07",
       "bidi": "invoice\u202efdp.exe", "id": "(the id of VM web)"}
SAYS = {"slash": "U+002F", "comma": "U+002C", "escape": "U+001B", "bidi": "U+202E",
        "id": "looks like an id"}


@dataclass
class Home:
    wm: Waymark
    base: Path
    web_id: str
    point: str  # a backup point of web in the repository "repo"

    def name(self, kind: str) -> str:
        return self.web_id if kind == "id" else BAD[kind]

    def state(self) -> dict[str, Any]:
        """Every named row in the catalog and every file's bytes (but the catalog's)."""
        rows = {table: query(self.wm.home, f"SELECT * FROM {table} ORDER BY 1") for table in (
            "vms", "checkpoints", "profiles", "templates", "locations", "users", "schedules",
            "grants")}
        rows["api_tokens"] = query(self.wm.home, "SELECT id, user_id, name FROM api_tokens")
        for folder in (self.wm.home, self.base / "repo"):
            rows[str(folder)] = {str(p): None if p.name.startswith("catalog.db")
                                 else file_sha256(p)
                                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return rows


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    base = tmp_path_factory.mktemp("names")
    wm = Waymark(base / "home")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base / "base.qcow2"), "1M"],
                   check=True)
    wm("profile", "create", "small", "--cpus", "1")
    wm("template", "create", "tpl", "--profile", "small", "--disk", str(base / "base.qcow2"))
    web_id = wm.json("vm", "create", "web", "--disk", "1M")["id"]
    wm("checkpoint", "create", "web", "--name", "base")
    wm("checkpoint", "export", "web", "base", str(base / "bundle"))
    wm("backup", "repo", "init", str(base / "repo"))
    point = wm.json("backup", "run", "web", "--repo", str(base / "repo"))[0]["point"]["id"]
    wm("location", "add", "repo", str(base / "repo"), "--kind", "repository")
    for user, role in (("admin", "administrator"), ("tenant", "self-service")):
        wm.run("user", "add", user, "--role", role, "--password-stdin",
               input=f"{user}-password-1\n").ok()
    wm("user", "grant", "tenant", "--template", "tpl")
    return Home(wm, base, web_id, point)


def cli_entries(home: Home, name: str) -> list[tuple[str, ...]]:
    """Every CLI command that takes a new name."""
    base = home.base
    return [("vm", "create", name, "--disk", "1M"),
            ("vm", "rename", "web", name),
            ("checkpoint", "create", "web", "--name", name),
            ("checkpoint", "rename", "web", "base", name),
            ("profile", "create", name, "--cpus", "1"),
            ("template", "create", name, "--disk", str(base / "base.qcow2")),
            ("vm", "import", str(base / "bundle"), "--name", name),
            ("backup", "restore", "web", "--repo", str(base / "repo"), "--as-new", name),
            ("backup", "schedule", "add", name, "--vm", "web", "--repo", str(base / "repo"),
             "--daily", "03:00"),
            ("location", "add", name, str(base), "--kind", "export"),
            ("user", "add", name, "--role", "read-only", "--password-stdin"),
            ("token", "create", name, "--user", "admin")]


def test_the_cli_refuses_confusing_names(home: Home) -> None:
    """``vm create`` with each name; every other command that takes a name with one of them
    (each CLI run costs a second or more: the grammar itself is checked in tests/unit)."""
    before = home.state()
    kinds = list(BAD)
    tried = [(kind, ("vm", "create", home.name(kind), "--disk", "1M")) for kind in kinds]
    for number, entry in enumerate(cli_entries(home, "{}")[1:]):
        kind = kinds[number % len(kinds)]
        if kind == "comma" and entry[0] == "checkpoint":  # checkpoint names may hold commas
            kind = "slash"
        tried.append((kind, tuple(home.name(kind) if a == "{}" else a for a in entry)))
    for kind, args in tried:
        result = home.wm.run(*args, input="a-password-1\n")
        assert result.returncode == EXIT_INVALID, result
        assert result.stderr.startswith("error: the "), result
        assert SAYS[kind] in result.stderr, result
        assert "\x1b" not in result.stderr and "\u202e" not in result.stderr, result
        assert "Traceback" not in result.stderr, result
    assert home.state() == before


def api_entries(name: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(caller, method, path, body) of every API call that takes a new name."""
    return [("tenant", "POST", "/api/vms", {"name": name, "template": "tpl"}),
            ("admin", "POST", "/api/vms", {"name": name, "template": "tpl"}),
            ("admin", "POST", "/api/vms/web/checkpoints", {"name": name}),
            ("admin", "PATCH", "/api/vms/web/checkpoints/base", {"name": name}),
            ("admin", "POST", "/api/profiles", {"name": name, "cpus": 1}),
            ("admin", "POST", "/api/schedules", {"name": name, "vms": ["web"],
                                                  "repository": "repo", "every": "daily",
                                                  "at": "03:00"}),
            ("admin", "POST", "/api/locations", {"name": name[:64], "kind": "export",
                                                  "path": "/tmp"}),
            ("admin", "POST", "/api/users", {"name": name[:64], "role": "read-only",
                                              "password": "a-password-1"}),
            ("tenant", "POST", "/api/tokens", {"name": name[:64]})]


@pytest.fixture(scope="module")
def server(home: Home) -> Iterator[tuple[str, dict[str, str]]]:
    tokens = {user: home.wm.json("token", "create", "tests", "--user", user)["token"]
              for user in ("admin", "tenant")}
    with serve_process(home.wm, home.base / "serve.log") as url:
        yield url, tokens
    log = (home.base / "serve.log").read_text()
    assert "Traceback" not in log, log


def test_a_real_server_refuses_confusing_names(home: Home, server: tuple[str, dict[str, str]]
                                               ) -> None:
    url, tokens = server
    before = home.state()
    for kind in BAD:
        check_refused(url, tokens, kind, [
            *(e for e in api_entries(home.name(kind))
              if kind != "comma" or "/checkpoints" not in e[2]),  # they may hold commas
            ("admin", "POST", f"/api/vms/web/backups/{home.point}/restore",
             {"repository": "repo", "mode": "as_new", "new_name": home.name(kind)})])
    assert home.state() == before


def check_refused(url: str, tokens: dict[str, str], kind: str,
                  calls: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    for caller, method, path, body in calls:
        headers = {"Authorization": f"Bearer {tokens[caller]}"}
        resp = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
        assert resp.status_code == 400, (caller, method, path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "invalid_input", error
        assert SAYS[kind] in error["message"] and error["hint"], error


def test_names_people_use_stay_valid(wm: Waymark) -> None:
    for name in ("before upgrade (2026-12-06 10:00)", "Büro 2", "a?b #c%d 50%", "сервер"):
        assert wm.json("vm", "create", name)["name"] == name
        assert wm.json("checkpoint", "create", name, "--name", name)["name"] == name
    assert wm.json("checkpoint", "create", "Büro 2", "--name", "live, with memory"
                   )["name"] == "live, with memory"  # Hyper-V writes them; no option sees them
    made = wm.json("vm", "create", "  cafe\u0301  ")
    assert made["name"] == "caf\u00e9"  # NFC, trimmed: the name as any keyboard types it


def qmp(path: Path, *commands: str) -> list[Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        stream = sock.makefile("rw")
        stream.readline()  # the greeting
        answers = []
        for command in ("qmp_capabilities", *commands):
            stream.write(json.dumps({"execute": command}) + "\n")
            stream.flush()
            answer = json.loads(stream.readline())
            while "event" in answer:
                answer = json.loads(stream.readline())
            answers.append(answer.get("return"))
        return answers[1:]


@pytest.mark.guest  # starts qemu-system-x86_64 (no guest OS)
def test_real_qemu_keeps_commas_in_a_name_and_paths_one_value(tmp_path: Path) -> None:
    folder = tmp_path / "x=y,a,b=c"  # '=' before a comma, then commas: both must stay path
    run = cmdline.RunFiles(folder / "run")
    run.display.mkdir(parents=True)  # the VNC server's folder (its socket's path: one value too)
    disk = folder / "disk,file=evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    chain = cmdline.DiskChain("d" * 32, (cmdline.Layer("1" * 32, str(disk), "qcow2"),))
    name = "web,process=evil,debug-threads=off"
    launch = cmdline.Launch(name, "00000000-0000-0000-0000-000000000001",
                            HardwareConfig(memory_mib=64, cpus=1), (chain,), run, "tcg")
    qemu = subprocess.Popen(cmdline.argv(launch), stderr=subprocess.PIPE)  # it stays in front
    pid = qemu.pid
    try:
        for _ in range(300):  # its QMP socket, once QEMU parsed every option (30 s at most)
            if run.qmp.exists() or qemu.poll() is not None:
                break
            time.sleep(0.1)
        assert qemu.poll() is None and run.qmp.exists(), qemu.stderr.read() if qemu.stderr \
            else qemu.returncode
        assert {p.name for p in run.folder.iterdir()} >= {"qmp.sock", "qga.sock",
                                                          "console.sock", "serial.log"}
        assert run.vnc.exists()
        got_name, blocks = qmp(run.qmp, "query-name", "query-named-block-nodes")
        assert got_name == {"name": name}
        assert str(disk) in {b["file"] for b in blocks}
        assert not (tmp_path / "x=y").exists()  # nothing made at a path cut at a comma
        assert Path(f"/proc/{pid}/comm").read_text().strip() != "evil"  # no process=evil
    finally:
        qemu.kill()
        qemu.wait()


def test_a_library_cannot_bring_in_a_confusing_name(wm: Waymark, tmp_path: Path) -> None:
    """A library share is outside storage: a stored VM's name or checkpoint name that CLI input
    could not have is refused at deploy, and the VM stays in the library."""
    vm_id = wm.json("vm", "create", "shared", "--disk", "1M")["id"]
    wm("checkpoint", "create", "shared", "--name", "ok")
    library = tmp_path / "lib"
    wm("library", "init", str(library))
    wm("vm", "store", "shared", "--library", str(library))
    manifest = library / "vms" / vm_id / "manifest.json"
    good = json.loads(manifest.read_text())
    for where, says in ((("vm",), "the stored VM's name"),
                        (("checkpoints", 0), "the name of its checkpoint")):
        doc = json.loads(json.dumps(good))
        target = doc[where[0]] if len(where) == 1 else doc[where[0]][where[1]]
        target["name"] = BAD["slash"]
        manifest.write_text(json.dumps(doc))
        files = {p: file_sha256(p) for p in sorted(library.rglob("*")) if p.is_file()}
        result = wm.run("vm", "deploy", vm_id, "--library", str(library))
        assert result.returncode == EXIT_INVALID, result
        assert says in result.stderr and "U+002F" in result.stderr, result
        assert wm.json("vm", "list") == []
        assert {p: file_sha256(p) for p in sorted(library.rglob("*")) if p.is_file()} == files

