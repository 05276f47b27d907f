"""A VM's TPM 2.0: Debian's ``swtpm``, one process per running VM, its state owned by the VM.

*Where the state lives*: Now's state is one file, ``<vm folder>/tpm/tpm2-00.permall`` (swtpm's
directory backend; a few KiB). A checkpoint keeps a whole copy of it taken at its instant (in the
catalog, :attr:`waymark.catalog.models.Checkpoint.tpm_state`), never a difference: apply writes
it back, delete drops it. A standard checkpoint's memory state carries the TPM's state too (QEMU
asks swtpm for it in the migration stream); it is the same state as the copy.

*Made once*: the TPM is manufactured when the VM is created (``swtpm_setup``: an endorsement key
and its certificate, signed by the host's swtpm-localca, as libvirt and Proxmox do). A VM whose
state file is missing or cannot be loaded refuses to start: a fresh TPM would silently lose every
key sealed to the old one (BitLocker, LUKS with TPM unlock).

*Confined as QEMU is*: swtpm runs as QEMU's user with its seccomp profile; it opens no socket by
path. Waymark makes a socket pair, hands one end to swtpm (``--ctrl clientfd``) and the other to
QEMU (``-chardev socket,fd=``); swtpm ends when QEMU closes it (``--terminate``). The state folder
belongs to QEMU's user while it runs (swtpm replaces the file by renaming a new one into it).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from waymark import durable, process
from waymark.errors import NotFound, ToolError, ToolMissing

STATE_FILE = "tpm2-00.permall"
LOG_FILE = "swtpm.log"
MAX_STATE = 1 << 20  # libtpms's whole NV space is far smaller: anything larger is not a state


def state_file(folder: Path) -> Path:
    return folder / STATE_FILE


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} is not installed: a VM with a TPM needs it.",
                          hint="Install Debian's swtpm and swtpm-tools packages.")
    return found


def files(folder: Path) -> list[Path]:
    """What a TPM folder holds: its state, swtpm's lock and log (a VM deleted deletes them)."""
    return [folder / name for name in (STATE_FILE, ".lock", LOG_FILE)]


def manufacture(folder: Path) -> None:
    """A new TPM's state in ``folder`` (which must not exist yet): made in a temporary folder
    beside it and renamed into place, so an interrupted run leaves nothing that looks made."""
    work = folder.with_name(folder.name + ".new")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)
    argv = [_tool("swtpm_setup"), "--tpm2", "--tpmstate", str(work), "--createek",
            "--decryption", "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
            "--not-overwrite"]
    made = subprocess.run(argv, capture_output=True, text=True, check=False)
    if made.returncode != 0 or not state_file(work).is_file():
        shutil.rmtree(work, ignore_errors=True)
        raise ToolError(f"swtpm_setup could not make a TPM: {made.stderr.strip()[-400:]}",
                        hint="Check that swtpm-tools is installed and /var/lib/swtpm-localca "
                             "is writable.")
    durable.fsync_file(state_file(work))
    os.replace(work, folder)
    durable.fsync_dir(folder.parent)


def read_state(folder: Path) -> bytes:
    """Now's TPM state; NotFound when it is missing or empty (never a new TPM in its place).
    The folder is written by swtpm as QEMU's user, whom a guest may have taken over: only a
    regular file is read (never through a link it put there), and only a TPM state's size."""
    path = state_file(folder)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        data = b""
    except OSError as err:  # ELOOP: a link in its place
        raise _not_plain(path) from err
    else:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise _not_plain(path)
            data = handle.read(MAX_STATE + 1)
    if len(data) > MAX_STATE:
        raise _not_plain(path)
    if not data:
        raise NotFound(f"the VM's TPM state {path} is missing: starting it would give the guest "
                       "a new, empty TPM and lose every key sealed to its own.",
                       hint="Apply one of its checkpoints or restore a backup of it: their TPM "
                            "state comes back with them.")
    return data


def _not_plain(path: Path) -> NotFound:
    return NotFound(f"the VM's TPM state {path} is not a plain TPM state file (a link, a folder "
                    "or too large: something other than swtpm put it there).",
                    hint="Apply one of its checkpoints or restore a backup of it: their TPM "
                         "state comes back with them.")


def write_state(folder: Path, data: bytes) -> None:
    """Now's TPM state replaced by ``data`` (a checkpoint's, on apply): written into a new
    folder of root's, which then takes the old one's place (whatever QEMU's user left in the
    old folder is never opened); redone whole after a crash."""
    fresh, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    fresh.mkdir(mode=0o700, parents=True)
    durable.write_bytes(state_file(fresh), data)
    if folder.exists():
        os.replace(folder, old)
    os.replace(fresh, folder)
    durable.fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def started(folder: Path, owner: tuple[int, int] | None) -> Iterator[int]:
    """swtpm started on Now's state (refused when it is missing), as ``owner`` (uid, gid) when
    given; yields QEMU's end of their socket pair, closed on exit (QEMU holds its own copy).

    swtpm gets its folder and log open (``/proc/self/fd/N``, as QEMU gets its files): the VM's
    folder stays root's alone, only the TPM folder itself belongs to ``owner``."""
    read_state(folder)
    if owner is not None:  # (never through a link QEMU's user may have put there)
        for path in (folder, *folder.iterdir()):
            os.chown(path, *owner, follow_symlinks=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    state_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if (folder / LOG_FILE).is_symlink():  # not swtpm's log: a link left in its place
            (folder / LOG_FILE).unlink()
        log = os.open(folder / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600)
        with os.fdopen(log, "ab") as errors:
            argv = [_tool("swtpm"), "socket", "--tpm2", "--terminate",
                    "--tpmstate", f"dir=/proc/self/fd/{state_fd},mode=0600",
                    "--ctrl", f"type=unixio,clientfd={theirs.fileno()}",
                    "--log", f"fd={errors.fileno()},level=1", "--seccomp", "action=kill"]
            process.spawn(argv, what="starting the VM's TPM",
                          pass_fds=[theirs.fileno(), state_fd, errors.fileno()], stderr=errors,
                          user=owner[0] if owner else None, group=owner[1] if owner else None,
                          extra_groups=[] if owner else None)
        theirs.close()
        yield ours.fileno()
    finally:
        os.close(state_fd)
        theirs.close()
        ours.close()


def damaged(folder: Path, qemu_words: str) -> NotFound | None:
    """The error to give when QEMU could not start because swtpm could not load the state."""
    if "tpm-emulator" not in qemu_words:
        return None
    return NotFound(f"the VM's TPM state {state_file(folder)} is damaged: swtpm cannot load it "
                    f"({qemu_words.strip()}).",
                    hint="Apply one of its checkpoints or restore a backup of it: their TPM "
                         f"state comes back with them. swtpm's log: {folder / LOG_FILE}")


def fits(data: bytes) -> bool:
    """Whether ``data`` read from outside (a bundle, a backup point, a library share) may be a
    TPM state: not empty, not larger than any TPM's (swtpm checks the rest when it loads it)."""
    return 0 < len(data) <= MAX_STATE


def decoded(text: object) -> bytes | None:
    """A TPM state written as base64 in a manifest read from outside, or None when ``text`` is
    no base64 of something that :func:`fits`."""
    try:
        state = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except binascii.Error:
        return None
    return state if fits(state) else None
