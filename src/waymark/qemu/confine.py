"""QEMU confined, as libvirt confines it: an unprivileged user, a seccomp sandbox, and no paths.

*Who*: when Waymark runs as root, every VM's QEMU is started directly as the QEMU user (setting
``WAYMARK_QEMU_USER``, default ``waymark-qemu``, created as a system user when missing) with the
``kvm`` group for ``/dev/kvm``: QEMU never holds root, not even while it parses the disk images.
When Waymark is not root, QEMU runs as the invoking user.

*Sandbox*: ``-sandbox`` :data:`waymark.qemu.cmdline.SANDBOX`: no obsolete system calls, no
set*uid, no fork/exec, no scheduler or CPU-affinity changes; QEMU also gets ``no_new_privs``.

*No paths*: QEMU opens nothing by path. Waymark (root) opens every file QEMU needs and hands over
the open descriptors, so QEMU's user needs no access to the home, the VM's folder or a user's
own images, and everything stays owner-only for root:

- images: an fd set each (``-add-fd``, later QMP ``add-fd``) holding ONE descriptor: read-write
  for Waymark's own images, read-only for a user's pinned ones; QEMU opens ``/dev/fdset/N``. The
  file node of each of Waymark's images says ``read-only: false`` even below a read-only format
  node (which asks no write permission, so it takes no write lock), so QEMU never reopens the
  file with another access mode: in QEMU 7.2 an fd set keeps every descriptor it was given open,
  and the image locks QEMU took through one would outlive a switch to another ("Failed to get
  shared 'write' lock" at the next ``cont``). The set's *opaque* text is the file's path, which
  maps QEMU's filenames back (:func:`real_paths`) and names the home in the command line;
- an ISO in the CD drive: an fd set holding one read-only descriptor (its node is read-only
  too: a medium is never written), also when it is inserted into a running VM (:func:`open_image`);
- the serial log: an fd set opened for appending;
- QMP, agent and console sockets: listening sockets Waymark binds, passed as ``fd=N``;
- the VNC socket: QEMU's VNC server takes no descriptor, so QEMU binds it itself, in the one
  folder of ``run/`` that is QEMU's user's (``run/display``, made anew at every start), reached
  through that folder's descriptor (``unix:/proc/self/fd/N/vnc.sock``); who connects to it
  checks that QEMU is at the other end (:mod:`waymark.qemu.display`);
- kernel and initrd: copied into a memory file (memfd) QEMU reads as ``/proc/self/fd/N``;
- memory states: ``fd:`` migrations (already so);
- a bridge NIC: a tap device Waymark creates and plugs into the bridge, passed as ``fd=N``.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from waymark import process
from waymark.errors import InvalidInput, StorageError, ToolError
from waymark.model.hardware import HardwareConfig
from waymark.qemu import cmdline, firmware, qmp, sockets

DEFAULT_USER = "waymark-qemu"
START_TIMEOUT = 60.0
FDSET = "/dev/fdset/"
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000


@dataclass(frozen=True)
class Identity:
    """The unprivileged user QEMU runs as."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def identity(user: str) -> Identity | None:
    """Whom QEMU runs as: None when Waymark is not root (QEMU runs as the invoking user), else
    ``user``, created as a system user when missing."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        entry = _create(user)
    if entry.pw_uid == 0:
        raise InvalidInput(f"the QEMU user {user!r} is root: QEMU must run unprivileged.",
                           hint=f"Set WAYMARK_QEMU_USER to an unprivileged user (default "
                                f"{DEFAULT_USER}).")
    groups: tuple[int, ...] = ()
    with contextlib.suppress(KeyError):
        groups = (grp.getgrnam("kvm").gr_gid,)
    return Identity(user, entry.pw_uid, entry.pw_gid, groups)


def _create(user: str) -> pwd.struct_passwd:
    try:
        process.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                     user], what=f"creating the QEMU user {user!r}")
        return pwd.getpwnam(user)
    except (ToolError, KeyError) as err:
        raise ToolError(f"the QEMU user {user!r} does not exist and could not be created: "
                        f"{getattr(err, 'message', err)}",
                        hint=f"Create it (useradd --system --no-create-home --shell "
                             f"/usr/sbin/nologin {user}) or name another one in "
                             "WAYMARK_QEMU_USER.") from err


def _quoted(text: str) -> str:
    """A value inside a QEMU option list (a comma is doubled)."""
    return text.replace(",", ",,")


@dataclass
class Handoff:
    """What a new QEMU gets already open instead of paths (see the module's docstring)."""

    owner: Identity | None
    fds: list[int] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    sockets: dict[str, int] = field(default_factory=dict)
    taps: dict[int, int] = field(default_factory=dict)
    display: int | None = None

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def _fdset(self, path: str, flags: tuple[int, ...]) -> None:
        number = len(self.files) + 1
        for flag in flags:
            fd = self._keep(os.open(path, flag, 0o600))
            self.args += ["-add-fd", f"fd={fd},set={number},opaque={_quoted(path)}"]
        self.files[path] = f"{FDSET}{number}"

    def image(self, path: str, *, writable: bool) -> None:
        if path not in self.files:
            self._fdset(path, (os.O_RDWR if writable else os.O_RDONLY,))

    def log(self, path: str) -> None:
        self._fdset(path, (os.O_WRONLY | os.O_APPEND | os.O_CREAT,))

    def boot_file(self, path: str) -> None:
        """A kernel or initrd, copied into a memory file QEMU reads through /proc/self/fd."""
        fd = self._keep(os.memfd_create(Path(path).name))
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                os.write(fd, chunk)
        self.files[path] = f"/proc/self/fd/{fd}"

    def listener(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with sockets.address(path) as where:  # a deep home's socket too
                sock.bind(where)
        except OSError as err:
            sock.close()
            raise StorageError(f"cannot make the socket {path}: {err}.",
                               hint="Check that the Waymark home is writable.") from err
        sock.listen()
        self.sockets[str(path)] = self._keep(sock.detach())

    def display_folder(self, path: Path) -> None:
        """The folder QEMU binds its VNC socket in: made anew (what QEMU's user left in the old
        one goes; :func:`shutil.rmtree` follows no link), its user's own, owner-only, handed
        over open."""
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        if self.owner is not None:
            os.chown(path, self.owner.uid, self.owner.gid, follow_symlinks=False)
        self.display = self._keep(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))

    def tap(self, number: int, bridge: str) -> None:
        """NIC ``number``'s tap device on ``bridge`` (QEMU, unprivileged, cannot make one)."""
        try:
            fd = self._keep(os.open("/dev/net/tun", os.O_RDWR))
            answer = fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", b"", _IFF_TAP | _IFF_NO_PI))
        except OSError as err:
            raise ToolError(f"cannot create a tap device for bridge {bridge!r}: {err.strerror}.",
                            hint="Bridge NICs need Waymark to run as root.") from err
        name = answer[:16].rstrip(b"\0").decode()
        process.run(["ip", "link", "set", "dev", name, "master", bridge, "up"],
                    what=f"plugging {name} into bridge {bridge!r}")
        self.taps[number] = fd

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def handoff(owner: Identity | None, run: cmdline.RunFiles, hardware: HardwareConfig,
            chains: tuple[cmdline.DiskChain, ...]) -> Handoff:
    """Everything a VM's QEMU opens at its start, opened by Waymark: Waymark's own images
    writable (read-write and read-only, for block jobs), a user's pinned images and the CD
    drive's ISO read-only."""
    given = Handoff(owner)
    try:
        for chain in chains:
            if chain.passthrough is not None:
                given.image(chain.passthrough, writable=True)
            for layer in chain.layers:
                given.image(layer.path, writable=not layer.pinned)
        if hardware.uefi:  # the host's firmware code, never written
            given.image(str(firmware.BUILDS[hardware.firmware].code), writable=False)
        for boot in (hardware.kernel, hardware.initrd):
            if boot:
                given.boot_file(boot)
        if hardware.media:
            given.image(hardware.media, writable=False)
        given.log(str(run.serial_log))
        for path in (run.qmp, run.console, run.agent):
            given.listener(path)
        given.display_folder(run.display)
        for number, nic in enumerate(hardware.nics):
            if nic.kind == "bridge" and nic.bridge:
                given.tap(number, nic.bridge)
    except BaseException:
        given.close()
        raise
    return given


def spawn(argv: list[str], handoff: Handoff, errors: Path, what: str,
          more_fds: int | None = None) -> subprocess.Popen[bytes]:
    """Start QEMU as ``handoff.owner`` with the handed-over descriptors (and ``more_fds``: its
    end of the TPM's socket); its stderr goes to ``errors``. It outlives Waymark (a session of
    its own)."""
    owner = handoff.owner
    fds = [*handoff.fds, *([] if more_fds is None else [more_fds])]
    with open(errors, "ab") as stderr:
        return process.spawn(argv, what=what, pass_fds=fds, stderr=stderr,
                             user=owner.uid if owner else None,
                             group=owner.gid if owner else None,
                             extra_groups=list(owner.groups) if owner else None)


def exited(label: str, errors: Path) -> ToolError:
    """The error of a QEMU that exited before it greeted: its last words."""
    return ToolError(f"QEMU of {label!r} exited right after it started: {_last_words(errors)}",
                     hint=f"See its messages in {errors}")


def _last_words(errors: Path) -> str:
    try:
        lines = errors.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else "(no message)"


# --- files QEMU opens later, over QMP -----------------------------------------------------------

async def open_image(machine: qmp.Qmp, path: str, *, writable: bool) -> str:
    """Hand QEMU an open image for ``blockdev-add``: the ``/dev/fdset/N`` it opens instead
    (its file node must say ``read-only`` as ``writable`` does)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        machine.client.send_fd_scm(fd)
    finally:
        os.close(fd)
    added = await machine.command("add-fd", opaque=path)
    return f"{FDSET}{added['fdset-id']}"


async def real_paths(machine: qmp.Qmp) -> dict[str, str]:
    """QEMU's ``/dev/fdset/N`` filenames, each mapped to the path it was opened from."""
    found: dict[str, str] = {}
    for fdset in await machine.command("query-fdsets"):
        for fd in fdset["fds"]:
            if "opaque" in fd:
                found[f"{FDSET}{fdset['fdset-id']}"] = fd["opaque"]
    return found


def path_of(filename: str, real: dict[str, str]) -> str:
    """The file a node of QEMU reads, from the filename QEMU reports: ``/dev/fdset/N``, or,
    for a qcow2 node whose backing node's filename differs from its header's backing string
    (always so with fd sets), a ``json:{...}`` description whose ``file`` names its file."""
    if filename.startswith("json:"):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            filename = str(json.loads(filename[len("json:"):])["file"]["filename"])
    return real.get(filename, filename)
