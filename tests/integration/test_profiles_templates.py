"""Hardware profiles and VM templates: the real CLI, real qemu-img, real qcow2 files.

What is checked: where each setting of a new VM comes from (its own option, else the hardware
profile, else the template, else Waymark's default), written here as a table by hand; that a
later change to a profile or template changes no existing VM, and that ``vm set`` makes a
setting the VM's own; that a template's images are read-only copies that linked clones never
write and that outlive the files they were made from, while ``--full-copy`` makes standalone
disks; that bad input fails with the documented exit code, a clear message and nothing changed;
and that a ``template create`` SIGKILLed after its copy leaves nothing listed and a folder the
next one removes.

The last tests (races between commands) pause a command at a failpoint by making
``WAYMARK_FAILPOINT_LOG`` a FIFO, so that another command runs at exactly that moment.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.helpers import Result, Waymark, content_sha256, file_sha256, qemu_io_write, query

KIB, MIB = 1 << 10, 1 << 20
EXIT_INVALID, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_BUSY = 2, 3, 5, 75
SETTINGS = ("checkpoint_type", "memory_mib", "cpus", "max_checkpoints", "automatic_checkpoints")
Expected = dict[str, tuple[Any, str]]  # setting -> (value, settings_source)
Write = tuple[int, int, int]  # (offset, length, pattern)


# --- helpers ----------------------------------------------------------------------------------

def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def image(path: Path, size: str, *writes: Write, fmt: str = "qcow2") -> Path:
    qemu_img("create", "-f", fmt, str(path), size)
    for offset, length, pattern in writes:
        qemu_io_write(path, fmt, offset, length, pattern)
    return path


def reference(folder: Path, name: str, size: str, *writes: Write) -> str:
    """The content a disk must hold: a raw image with the same writes, made without Waymark."""
    folder.mkdir(exist_ok=True)
    return content_sha256(image(folder / f"ref-{name}.raw", size, *writes, fmt="raw"), "raw")


def info(path: Path | str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    found: dict[str, Any] = json.loads(out)
    return found


def backing(path: Path | str) -> str | None:
    found = info(path)
    name: str | None = found.get("full-backing-filename") or found.get("backing-filename")
    return name


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def settings(shown: dict[str, Any]) -> Expected:
    """A ``vm show --json``'s settings with their sources, shaped like the tables below."""
    return {key: (shown[key], shown["settings_source"][key]) for key in SETTINGS}


def templates_folder(home: Path) -> set[str]:
    """What HOME/templates holds (names)."""
    folder = home / "templates"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def listed_folders(wm: Waymark) -> set[str]:
    return {Path(t["folder"]).name for t in wm.json("template", "list")}


def error_lines(result: Result) -> list[str]:
    """stderr without the progress lines (``[1/1] copying ...``)."""
    return [line for line in result.stderr.splitlines() if not line.startswith("[")]


def assert_error(result: Result, code: int, *fragments: str) -> None:
    """Failed with ``code``, an ``error:`` line naming each fragment, nothing on stdout and no
    traceback."""
    assert result.returncode == code, result
    errors = error_lines(result)
    assert errors and errors[0].startswith("error: "), result
    assert "Traceback" not in result.stdout + result.stderr, result
    assert result.stdout == "", result
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"


def assert_clean(wm: Waymark) -> None:
    checked = wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr


def human_type_line(wm: Waymark, vm: str) -> str:
    (line,) = [ln.strip() for ln in wm("vm", "show", vm).stdout.splitlines()
               if ln.strip().startswith("checkpoint type:")]
    return line


TABLES = ("vms", "disks", "images", "checkpoints", "intents", "profiles", "templates")


def catalog_rows(home: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {table: query(home, f"SELECT * FROM {table} ORDER BY 1") for table in TABLES}


def home_entries(home: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under the home, but the catalog and lock files."""
    found = {}
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home)
        if rel.parts[0] == "locks" or path.name.startswith("catalog.db") \
                or str(rel) in ("templates", "templates/lock"):
            continue
        found[str(rel)] = file_sha256(path) if path.is_file() else "folder"
    return found


# --- 1. precedence ----------------------------------------------------------------------------

# Hardware profiles and templates the tables use. "fast" sets every setting, "lean" only the CPUs;
# template "typed" sets the checkpoint type, "plain" nothing, "stock" both a type and a profile.
PROFILES = {
    "fast": ("--cpus", "2", "--memory", "256M", "--checkpoint-type", "standard",
             "--max-checkpoints", "7", "--automatic-checkpoints", "on"),
    "lean": ("--cpus", "3"),
}
TEMPLATES = {
    "typed": ("--checkpoint-type", "productiononly"),
    "plain": (),
    "stock": ("--profile", "fast", "--checkpoint-type", "productiononly"),
}

DEFAULT: Expected = {"checkpoint_type": ("production", "default"),
                     "memory_mib": (512, "default"), "cpus": (1, "default"),
                     "max_checkpoints": (50, "default"),
                     "automatic_checkpoints": (False, "default")}
FAST: Expected = {"checkpoint_type": ("standard", "profile fast"),
                  "memory_mib": (256, "profile fast"), "cpus": (2, "profile fast"),
                  "max_checkpoints": (7, "profile fast"),
                  "automatic_checkpoints": (True, "profile fast")}
LEAN: Expected = {**DEFAULT, "cpus": (3, "profile lean")}

# The checkpoint type: (VM option set?, profile sets it?, template sets it?), all 8 ways, then
# "no profile" / "no template" next to "one that does not set it".
#        VM      options                                   template  profile  expected
TYPE_CASES: list[tuple[str, tuple[str, ...], str | None, str | None, Expected]] = [
    ("t-yyy", ("--checkpoint-type", "disabled"), "typed", "fast",
     {**FAST, "checkpoint_type": ("disabled", "vm")}),
    ("t-yyn", ("--checkpoint-type", "disabled"), "plain", "fast",
     {**FAST, "checkpoint_type": ("disabled", "vm")}),
    ("t-yny", ("--checkpoint-type", "disabled"), "typed", "lean",
     {**LEAN, "checkpoint_type": ("disabled", "vm")}),
    ("t-ynn", ("--checkpoint-type", "disabled"), None, None,
     {**DEFAULT, "checkpoint_type": ("disabled", "vm")}),
    ("t-nyy", (), "typed", "fast", FAST),
    ("t-nyn", (), None, "fast", FAST),
    ("t-nny", (), "typed", "lean",
     {**LEAN, "checkpoint_type": ("productiononly", "template typed")}),
    ("t-nnn", (), "plain", "lean", LEAN),
    ("t-nny-noprofile", (), "typed", None,
     {**DEFAULT, "checkpoint_type": ("productiononly", "template typed")}),
    ("t-nnn-nothing", (), None, None, DEFAULT),
]

# Memory, CPUs, limit and automatic checkpoints: an option beats the profile, which beats the
# default (templates do not set them); a template's profile is used unless --profile names one.
SIZE_CASES: list[tuple[str, tuple[str, ...], str | None, str | None, Expected]] = [
    ("s-memory", ("--memory", "128M"), "plain", "fast",
     {**FAST, "memory_mib": (128, "vm")}),
    ("s-all", ("--cpus", "4", "--memory", "1G", "--max-checkpoints", "9",
               "--automatic-checkpoints", "off"), None, "fast",
     {"checkpoint_type": ("standard", "profile fast"), "memory_mib": (1024, "vm"),
      "cpus": (4, "vm"), "max_checkpoints": (9, "vm"), "automatic_checkpoints": (False, "vm")}),
    ("s-lean", ("--memory", "64M"), None, "lean",
     {**LEAN, "memory_mib": (64, "vm")}),
    # the template's own profile ...
    ("s-stock", (), "stock", None, FAST),
    # ... unless --profile overrides it: nothing of "fast" is left, the template's type shows
    ("s-stock-lean", (), "stock", "lean",
     {**LEAN, "checkpoint_type": ("productiononly", "template stock")}),
]


def make_library(wm: Waymark, folder: Path) -> None:
    source = image(folder / "library.qcow2", "8M", (0, 64 * KIB, 0x5A))
    for name, options in PROFILES.items():
        wm("profile", "create", name, *options)
    for name, options in TEMPLATES.items():
        wm("template", "create", name, "--disk", str(source), *options)


def create_args(options: tuple[str, ...], template: str | None, profile: str | None
                ) -> list[str]:
    return [*options, *(["--template", template] if template else ["--disk", "1M"]),
            *(["--profile", profile] if profile else [])]


def test_settings_come_from_vm_then_profile_then_template_then_default(
        wm: Waymark, tmp_path: Path) -> None:
    make_library(wm, tmp_path)
    shown: dict[str, dict[str, Any]] = {}
    for name, options, template, profile, expected in TYPE_CASES + SIZE_CASES:
        created = wm.json("vm", "create", name, *create_args(options, template, profile))
        assert settings(created) == expected, name
        # the profile a VM used: the one named, else its template's
        used = profile or ("fast" if template == "stock" else None)
        assert (created["template"], created["profile"]) == (template, used), name
        shown[name] = created

    # vm show reads back what create reported (json), and says where the type came from
    again = wm.json("vm", "show", "s-stock-lean")
    assert settings(again) == settings(shown["s-stock-lean"])
    assert (again["template"], again["profile"]) == ("stock", "lean")
    human = {"t-yyy": ("memory: 256 MiB   cpus: 2", "checkpoint type: disabled   limit: 7"),
             "t-nyy": ("memory: 256 MiB   cpus: 2",
                       "checkpoint type: standard (from profile fast)   limit: 7"),
             "s-stock-lean": ("memory: 512 MiB   cpus: 3",
                              "checkpoint type: productiononly (from template stock)   limit: 50"),
             "s-all": ("memory: 1024 MiB   cpus: 4",
                       "checkpoint type: standard (from profile fast)   limit: 9"),
             "t-nnn-nothing": ("memory: 512 MiB   cpus: 1",
                               "checkpoint type: production (from default)   limit: 50")}
    for name, (sizes, type_line) in human.items():
        lines = [ln.strip() for ln in wm("vm", "show", name).stdout.splitlines()]
        assert any(ln.startswith(sizes) for ln in lines), (name, lines)
        assert any(ln.startswith(type_line) for ln in lines), (name, lines)


# --- 2. later changes -------------------------------------------------------------------------

def test_later_profile_and_template_changes_leave_existing_vms_alone(
        wm: Waymark, tmp_path: Path) -> None:
    make_library(wm, tmp_path)
    before = wm.json("vm", "create", "early", "--template", "stock")
    assert settings(before) == FAST

    changed = wm.json("profile", "set", "fast", "--checkpoint-type", "disabled", "--memory", "1G",
                      "--cpus", "8", "--max-checkpoints", "3", "--automatic-checkpoints", "off")
    assert changed == {"name": "fast", "cpus": 8, "memory_mib": 1024,
                       "checkpoint_type": "disabled", "max_checkpoints": 3,
                       "automatic_checkpoints": False}
    retemplated = wm.json("template", "set", "stock", "--checkpoint-type", "standard",
                          "--profile", "lean")
    assert (retemplated["profile"], retemplated["checkpoint_type"]) == ("lean", "standard")
    assert retemplated["vm_names"] == ["early"]

    assert wm.json("vm", "show", "early") == before  # nothing about it changed
    assert human_type_line(wm, "early").startswith(
        "checkpoint type: standard (from profile fast)   limit: 7")
    # new VMs get the new settings
    assert settings(wm.json("vm", "create", "late", "--template", "stock")) == \
        {**LEAN, "checkpoint_type": ("standard", "template stock")}
    assert settings(wm.json("vm", "create", "late-fast", "--template", "stock",
                            "--profile", "fast")) == \
        {"checkpoint_type": ("disabled", "profile fast"), "memory_mib": (1024, "profile fast"),
         "cpus": (8, "profile fast"), "max_checkpoints": (3, "profile fast"),
         "automatic_checkpoints": (False, "profile fast")}

    # vm set makes a setting the VM's own; the others keep their sources
    wm("vm", "set", "early", "--checkpoint-type", "productiononly")
    after = wm.json("vm", "show", "early")
    assert settings(after) == {**FAST, "checkpoint_type": ("productiononly", "vm")}
    assert (after["template"], after["profile"]) == ("stock", "fast")
    assert human_type_line(wm, "early").startswith("checkpoint type: productiononly   limit: 7")
    wm("vm", "set", "early", "--memory", "384M", "--automatic-checkpoints", "on")
    assert settings(wm.json("vm", "show", "early")) == {
        **FAST, "checkpoint_type": ("productiononly", "vm"), "memory_mib": (384, "vm"),
        "automatic_checkpoints": (True, "vm")}
    assert settings(wm.json("vm", "show", "late")) == \
        {**LEAN, "checkpoint_type": ("standard", "template stock")}


# --- 3. linked clones and full copies ---------------------------------------------------------

T0: list[Write] = [(0, 64 * KIB, 0x11), (MIB, 64 * KIB, 0x12)]  # the template's disk 0
T1: list[Write] = [(0, 64 * KIB, 0x13)]  # and disk 1


def golden_sources(folder: Path) -> list[Path]:
    """Disk 0: a qcow2 overlay on a base of its own (the template flattens it), disk 1: raw;
    returns [base, disk 0, disk 1]."""
    folder.mkdir()
    base = image(folder / "base.qcow2", "8M", T0[0])
    disk0 = folder / "disk0.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk0))
    qemu_io_write(disk0, "qcow2", *T0[1])
    return [base, disk0, image(folder / "disk1.raw", "4M", *T1, fmt="raw")]


def assert_template_files(wm: Waymark, made: dict[str, Any], sources: list[Path],
                          content: list[str]) -> list[Path]:
    """The template's images: read-only standalone qcow2 copies, checksummed; their paths."""
    folder = Path(made["folder"])
    assert folder.parent == wm.home / "templates"
    assert [(d["file"], d["format"], d["source"], d["virtual_size"])
            for d in made["disks"]] == [("disk0.qcow2", "qcow2", str(sources[0]), 8 * MIB),
                                        ("disk1.qcow2", "qcow2", str(sources[1]), 4 * MIB)]
    files = [folder / "disk0.qcow2", folder / "disk1.qcow2"]
    assert templates_folder(wm.home) == {folder.name, "lock"}
    assert {p.name for p in folder.iterdir()} == {"disk0.qcow2", "disk1.qcow2"}
    for path, disk in zip(files, made["disks"], strict=True):
        assert mode(path) == 0o400, oct(mode(path))
        assert info(path)["format"] == "qcow2" and backing(path) is None
        assert file_sha256(path) == disk["sha256"]
    assert [content_sha256(p) for p in files] == content
    return files


def assert_linked(wm: Waymark, vm: dict[str, Any], files: list[Path]) -> None:
    """Each template image under an overlay of the VM's own."""
    for disk, path in zip(vm["disks"], files, strict=False):
        assert (disk["base_image"], disk["base_pinned"]) == (str(path), True), vm["name"]
        assert Path(disk["active_image"]).parent == wm.home / "vms" / vm["id"] / "disks"
        assert backing(disk["active_image"]) == str(path), vm["name"]


def assert_standalone(wm: Waymark, vm: dict[str, Any]) -> None:
    for disk in vm["disks"]:
        assert disk["base_image"] == disk["active_image"] and not disk["base_pinned"]
        assert Path(disk["active_image"]).parent == wm.home / "vms" / vm["id"] / "disks"
        assert backing(disk["active_image"]) is None, vm["name"]


def contents(vm: dict[str, Any]) -> list[str]:
    """What the VM's first two disks (the template's) hold."""
    return [content_sha256(d["active_image"]) for d in vm["disks"][:2]]


def write(vm: dict[str, Any], *where: tuple[int, int, int, int]) -> None:
    """qemu-io writes (disk number, offset, length, pattern) into the VM's active images."""
    for disk, offset, length, pattern in where:
        qemu_io_write(Path(vm["disks"][disk]["active_image"]), "qcow2", offset, length, pattern)


def test_linked_clones_share_a_read_only_template_and_full_copies_stand_alone(
        wm: Waymark, tmp_path: Path) -> None:
    sources = golden_sources(tmp_path / "src")
    refs = tmp_path / "refs"
    template = [reference(refs, "t0", "8M", *T0), reference(refs, "t1", "4M", *T1)]
    wm("profile", "create", "small", "--cpus", "2")
    made = wm.json("template", "create", "golden", "--profile", "small",
                   "--disk", str(sources[1]), "--disk", str(sources[2]))
    files = assert_template_files(wm, made, sources[1:], template)
    template_files = {p: file_sha256(p) for p in files}

    a = wm.json("vm", "create", "a", "--template", "golden")
    for path in sources:  # the template is a copy: the files it was made from may go
        path.unlink()
    b = wm.json("vm", "create", "b", "--template", "golden", "--disk", "1M")
    c = wm.json("vm", "create", "c", "--template", "golden", "--full-copy")
    assert [len(vm["disks"]) for vm in (a, b, c)] == [2, 3, 2]
    assert_linked(wm, a, files)
    assert_linked(wm, b, files)
    assert_standalone(wm, c)
    assert contents(a) == contents(b) == contents(c) == template
    assert wm.json("template", "show", "golden")["vm_names"] == ["a", "b"]  # not c

    # each VM writes its own disks; nobody sees anyone else's data
    write(a, (0, 2 * MIB, 64 * KIB, 0xA1))
    write(b, (0, 2 * MIB, 64 * KIB, 0xB1), (1, 0, 4 * KIB, 0xB2))
    write(c, (0, 2 * MIB, 64 * KIB, 0xC1), (1, 3 * MIB, 4 * KIB, 0xC2))
    # a takes a checkpoint, writes again and deletes it: the merge must not reach the template
    wm("checkpoint", "create", "a", "--name", "before")
    write(wm.json("vm", "show", "a"), (0, 3 * MIB, 64 * KIB, 0xA2))
    wm("checkpoint", "delete", "a", "before", "--yes")
    a = wm.json("vm", "show", "a")
    assert a["checkpoint_count"] == 0
    assert_linked(wm, a, files)
    assert contents(a) == [reference(refs, "a0", "8M", *T0, (2 * MIB, 64 * KIB, 0xA1),
                                     (3 * MIB, 64 * KIB, 0xA2)), template[1]]
    assert contents(b) == [reference(refs, "b0", "8M", *T0, (2 * MIB, 64 * KIB, 0xB1)),
                           reference(refs, "b1", "4M", *T1, (0, 4 * KIB, 0xB2))]
    c_content = [reference(refs, "c0", "8M", *T0, (2 * MIB, 64 * KIB, 0xC1)),
                 reference(refs, "c1", "4M", *T1, (3 * MIB, 4 * KIB, 0xC2))]
    assert contents(c) == c_content
    assert {p: file_sha256(p) for p in files} == template_files
    assert [content_sha256(p) for p in files] == template
    assert all(mode(p) == 0o400 for p in files)
    assert_clean(wm)

    # the template goes only when no VM links to it (the full copy does not count)
    assert_error(wm.run("template", "delete", "golden"), EXIT_CONFLICT, "'golden'", "a, b")
    wm("vm", "delete", "a", "--yes")
    assert_error(wm.run("template", "delete", "golden"), EXIT_CONFLICT, "VM(s) b.")
    assert {p: file_sha256(p) for p in files} == template_files
    wm("vm", "delete", "b", "--yes")
    assert wm.json("template", "show", "golden")["vm_names"] == []
    assert wm.json("template", "delete", "golden") == \
        {"deleted": [{"kind": "template", "id": None, "name": "golden"}]}
    assert not Path(made["folder"]).exists()
    assert templates_folder(wm.home) == {"lock"}
    assert wm.json("template", "list") == []
    assert [v["name"] for v in wm.json("vm", "list")] == ["c"]
    assert contents(c) == c_content
    assert_clean(wm)
    # with no template left, its profile may go (VMs keep the settings they copied)
    wm("profile", "delete", "small")
    assert settings(wm.json("vm", "show", "c"))["cpus"] == (2, "profile small")


# --- 4. bad input -----------------------------------------------------------------------------

def test_bad_input_is_refused_and_changes_nothing(wm: Waymark, tmp_path: Path) -> None:
    source = image(tmp_path / "src.qcow2", "8M", (0, 64 * KIB, 0x21))
    missing = tmp_path / "missing.qcow2"
    wm("profile", "create", "p", "--cpus", "2")
    made = wm.json("template", "create", "t", "--profile", "p", "--disk", str(source))
    wm("vm", "create", "linked", "--template", "t")
    before = {"rows": catalog_rows(wm.home), "files": home_entries(wm.home)}
    template_dir = Path(made["folder"]).name
    assert templates_folder(wm.home) == {template_dir, "lock"}

    def refused(code: int, *args: str, says: tuple[str, ...]) -> None:
        assert_error(wm.run(*args), code, *says)
        assert catalog_rows(wm.home) == before["rows"], args
        assert home_entries(wm.home) == before["files"], args
        assert templates_folder(wm.home) == {template_dir, "lock"}, args

    # unknown names
    refused(EXIT_NOT_FOUND, "vm", "create", "x", "--template", "nope",
            says=("no template 'nope'", "waymark template list"))
    refused(EXIT_NOT_FOUND, "vm", "create", "x", "--template", "t", "--profile", "nope",
            says=("no hardware profile 'nope'", "waymark profile list"))
    refused(EXIT_NOT_FOUND, "vm", "create", "x", "--profile", "nope", "--disk", "1M",
            says=("no hardware profile 'nope'",))
    refused(EXIT_NOT_FOUND, "template", "create", "t2", "--profile", "nope",
            "--disk", str(source), says=("no hardware profile 'nope'",))
    refused(EXIT_NOT_FOUND, "template", "set", "t", "--profile", "nope",
            says=("no hardware profile 'nope'",))
    refused(EXIT_NOT_FOUND, "profile", "set", "nope", "--cpus", "2",
            says=("no hardware profile 'nope'",))
    refused(EXIT_NOT_FOUND, "template", "delete", "nope", says=("no template 'nope'",))
    refused(EXIT_NOT_FOUND, "profile", "show", "nope", says=("no hardware profile 'nope'",))
    # names taken
    refused(EXIT_CONFLICT, "profile", "create", "p", "--cpus", "4",
            says=("hardware profile named 'p' already exists",))
    refused(EXIT_CONFLICT, "template", "create", "t", "--disk", str(source),
            says=("template named 't' already exists",))
    refused(EXIT_CONFLICT, "vm", "create", "linked", "--template", "t",
            says=("VM named 'linked' already exists",))
    # --full-copy copies a template's disks: without one it means nothing
    refused(EXIT_INVALID, "vm", "create", "x", "--full-copy", says=("--full-copy", "--template"))
    # bad settings
    refused(EXIT_INVALID, "profile", "create", "q", "--memory", "1M", says=("memory",))
    refused(EXIT_INVALID, "profile", "set", "p", "--max-checkpoints", "0",
            says=("--max-checkpoints 0",))
    # files that are not there
    refused(EXIT_NOT_FOUND, "template", "create", "t2", "--disk", str(missing),
            says=(f"disk image {missing} does not exist",))
    refused(EXIT_NOT_FOUND, "template", "create", "t2", "--disk", str(source),
            "--disk", str(missing), says=(str(missing),))
    refused(EXIT_NOT_FOUND, "vm", "create", "x", "--template", "t", "--disk", str(missing),
            says=(str(missing),))
    # in use
    refused(EXIT_CONFLICT, "template", "delete", "t", says=("'t' is the base of VM(s) linked",))
    refused(EXIT_CONFLICT, "profile", "delete", "p", says=("'p' is used by template(s) t",))

    assert [t["name"] for t in wm.json("template", "list")] == ["t"]
    assert [v["name"] for v in wm.json("vm", "list")] == ["linked"]
    assert_clean(wm)


# --- 5. a killed template create --------------------------------------------------------------

def test_template_create_killed_after_the_copy_leaves_nothing_listed(
        wm: Waymark, tmp_path: Path) -> None:
    source = image(tmp_path / "src.qcow2", "8M", (0, 64 * KIB, 0x31), (MIB, 4 * KIB, 0x32))
    content = content_sha256(source)
    kept = wm.json("template", "create", "kept", "--disk", str(source))
    kept_dir = Path(kept["folder"]).name

    killed = wm.run("template", "create", "t1", "--disk", str(source),
                    env=wm.env(WAYMARK_FAILPOINT="template-copied"))
    assert killed.returncode == -signal.SIGKILL, killed
    assert [t["name"] for t in wm.json("template", "list")] == ["kept"]
    (leftover,) = templates_folder(wm.home) - {kept_dir, "lock"}  # the copy was made
    assert {p.name for p in (wm.home / "templates" / leftover).iterdir()} == {"disk0.qcow2"}
    assert_error(wm.run("vm", "create", "x", "--template", "t1"), EXIT_NOT_FOUND,
                 "no template 't1'")
    # check names the leftover folder (and only it); the next create removes it
    checked = wm.run("check", "--json")
    assert checked.returncode != 0, checked
    findings = checked.json()["findings"]
    assert [(f["kind"], Path(f["path"]).name) for f in findings] == \
        [("stray-file", leftover)], findings

    again = wm.json("template", "create", "t1", "--disk", str(source))
    assert templates_folder(wm.home) == {kept_dir, Path(again["folder"]).name, "lock"}
    assert leftover not in templates_folder(wm.home)
    assert listed_folders(wm) | {"lock"} == templates_folder(wm.home)
    for name in ("kept", "t1"):
        vm = wm.json("vm", "create", f"from-{name}", "--template", name)
        assert content_sha256(vm["disks"][0]["active_image"]) == content
    assert_clean(wm)


def test_check_finds_damaged_template_images_and_repairs_leftover_folders(
        wm: Waymark, tmp_path: Path) -> None:
    source = image(tmp_path / "src.qcow2", "8M", (0, 64 * KIB, 0x61))
    made = wm.json("template", "create", "t", "--disk", str(source))
    stray = wm.home / "templates" / ("0" * 32 + ".partial")
    stray.mkdir()
    (stray / "disk0.qcow2").write_bytes(b"half a copy")
    disk = Path(made["folder"]) / "disk0.qcow2"
    os.chmod(disk, 0o644)
    with disk.open("r+b") as f:  # one flipped byte in the image's data
        f.seek(disk.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    checked = wm.run("check", "--json")
    assert checked.returncode != 0, checked
    kinds = {(f["kind"], f["path"]) for f in checked.json()["findings"]}
    assert kinds == {("image-error", str(disk)), ("stray-file", str(stray))}, kinds
    repaired = wm.run("check", "--repair", "--json")
    rows = {f["path"]: f["repaired"] for f in repaired.json()["findings"]}
    assert rows == {str(stray): "removed", str(disk): None}, rows  # data is never invented
    assert not stray.exists() and disk.exists()


# --- 6. races between commands --------------------------------------------------------------------

BLOCKED = "wait_for_partner"  # the kernel's wait of open() on a FIFO nobody reads yet


class Paused:
    """A waymark command stopped at each failpoint until the test lets it pass: its
    ``WAYMARK_FAILPOINT_LOG`` is a FIFO, and a failpoint's open() blocks until it is read."""

    def __init__(self, wm: Waymark, fifo: Path, *args: str) -> None:
        os.mkfifo(fifo)
        self.fifo = fifo
        self.proc = subprocess.Popen([sys.executable, "-m", "waymark", *args],
                                     env=wm.env(WAYMARK_FAILPOINT_LOG=str(fifo)),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.args = list(args)

    def __enter__(self) -> Paused:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def blocked(self) -> bool:
        """Whether the command waits at a failpoint (False once it has ended)."""
        try:
            return Path(f"/proc/{self.proc.pid}/wchan").read_text().strip() == BLOCKED
        except OSError:
            return False

    def wait_blocked(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.blocked():
            if self.proc.poll() is not None:
                raise RuntimeError(f"waymark {self.args} ended before its next failpoint")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waymark {self.args} never reached a failpoint")
            time.sleep(0.01)

    def pass_point(self) -> str:
        """Wait until the command is at a failpoint, then let it pass; the point's label."""
        self.wait_blocked()
        box: list[str] = []

        def read() -> None:
            with self.fifo.open() as fifo:
                box.append(fifo.read())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(30)
        if reader.is_alive():  # cannot be, the writer waits: unblock our open() all the same
            os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            raise RuntimeError(f"waymark {self.args} did not write its failpoint")
        (line,) = box[0].splitlines()
        return line.split(" ", 1)[1]

    def finish(self, timeout: float = 120) -> Result:
        """Let the command pass every further failpoint; its result once it ended."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if self.blocked():
                self.pass_point()
            elif time.monotonic() > deadline:
                raise RuntimeError(f"waymark {self.args} did not end")
            else:
                time.sleep(0.01)
        stdout, stderr = self.proc.communicate()
        return Result(self.args, self.proc.returncode, stdout, stderr)


def run_while_paused(wm: Waymark, paused: Paused, *args: str) -> tuple[Result, Result]:
    """Run ``waymark ARGS`` to its end while ``paused`` waits at its failpoint (or, if ARGS
    waits for ``paused``, say for a lock, let ``paused`` go on after 30 s); both results."""
    proc = subprocess.Popen([sys.executable, "-m", "waymark", *args], env=wm.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=30)
        other = paused.finish()
    except subprocess.TimeoutExpired:
        other = paused.finish()
        stdout, stderr = proc.communicate(timeout=120)
    return Result(list(args), proc.returncode, stdout, stderr), other


def assert_ok_or_clear_error(result: Result) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result
    if result.returncode != 0:
        lines = error_lines(result)
        assert lines and lines[0].startswith("error: "), result


def assert_templates_whole(wm: Waymark) -> None:
    """Every listed template's images are there as recorded, and a VM can be made from it."""
    for number, listed in enumerate(wm.json("template", "list")):
        for disk in listed["disks"]:
            path = Path(listed["folder"]) / disk["file"]
            assert path.is_file(), f"template {listed['name']}: {path} is gone"
            assert file_sha256(path) == disk["sha256"], path
        wm("vm", "create", f"probe-{number}", "--template", listed["name"])


def test_template_delete_during_a_vm_create_from_it(wm: Waymark, tmp_path: Path) -> None:
    source = image(tmp_path / "src.qcow2", "8M", (0, 64 * KIB, 0x41))
    wm("template", "create", "t", "--disk", str(source))
    with Paused(wm, tmp_path / "points", "vm", "create", "v", "--template", "t") as create:
        while not create.pass_point().startswith("step:create_image"):
            pass
        create.wait_blocked()  # at the commit: the overlay on the template image is made
        deleted, made = run_while_paused(wm, create, "template", "delete", "t")
    assert_ok_or_clear_error(made)
    assert_ok_or_clear_error(deleted)
    assert made.returncode != 0 or deleted.returncode != 0, "both the VM and the delete won"
    for vm in wm.json("vm", "list"):
        for disk in wm.json("vm", "show", vm["name"])["disks"]:
            assert Path(disk["base_image"]).is_file(), f"{vm['name']}: its base is gone"
    assert_clean(wm)


@pytest.mark.parametrize("second", ["other", "first"])
def test_two_template_creates_at_once(wm: Waymark, tmp_path: Path, second: str) -> None:
    source = image(tmp_path / "src.qcow2", "8M", (0, 64 * KIB, 0x51))
    with Paused(wm, tmp_path / "points", "template", "create", "first",
                "--disk", str(source)) as first:
        first.wait_blocked()  # at template-copied: its folder is in place, its row not yet
        done, result = run_while_paused(wm, first, "template", "create", second,
                                        "--disk", str(source))
    assert_ok_or_clear_error(done)
    assert_ok_or_clear_error(result)
    if second == "first":  # one wins, the other is refused
        codes = sorted([done.returncode, result.returncode])
        assert codes[0] == 0 and codes[1] in (EXIT_CONFLICT, EXIT_BUSY), (done, result)
    assert_templates_whole(wm)
    wm("template", "create", "later", "--disk", str(source))  # removes any leftover folder
    assert listed_folders(wm) | {"lock"} == templates_folder(wm.home)
    assert_clean(wm)
