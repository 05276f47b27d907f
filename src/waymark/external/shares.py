"""Folders on shared or external storage that Waymark owns (a backup repository, a library):
each is marked by a small JSON file naming its format, version and id, so a folder is never
mistaken for one, nor used by a Waymark that does not know its version."""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal, Self

from waymark import durable, filelock, modes
from waymark.errors import Busy, Conflict, ImageError, NotFound, StorageError
from waymark.images import qemu_img


def create(path: Path, marker: str, fmt: str, version: int, *, what: str,
           use_hint: str) -> str:
    """Make the empty (or new) folder ``path`` a ``what``: its ``vms/`` folder and the marker
    file, written durably; returns its new id."""
    if (path / marker).exists():
        raise Conflict(f"{path} is already a {what}.", hint=use_hint)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise Conflict(f"{path} exists and is not an empty folder.",
                       hint="Give a new or empty folder on that storage.")
    folder_id = uuid.uuid4().hex
    try:
        (path / "vms").mkdir(parents=True, exist_ok=True)
        modes.tighten(path)  # an empty folder someone else made may be open to all
        durable.write_bytes(path / marker, json.dumps(
            {"format": fmt, "version": version, "id": folder_id,
             "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
            indent=2).encode())
    except OSError as err:
        raise StorageError(f"cannot create a {what} in {path}: {err.strerror}.",
                           hint="Check that the storage is mounted and writable.") from err
    return folder_id


def read(path: Path, marker: str, fmt: str, version: int, *, what: str,
         create_hint: str) -> dict[str, Any]:
    """The marker of the ``what`` at ``path``; NotFound when it is none, Conflict when it is
    of another format or version."""
    try:
        data: dict[str, Any] = json.loads((path / marker).read_text())
    except FileNotFoundError as err:
        raise NotFound(f"{path} is not a {what}.",
                       hint=f"{create_hint} (or check that the storage is mounted)") from err
    except (OSError, ValueError) as err:
        raise StorageError(f"cannot read {path / marker}: {err}.") from err
    modes.tighten(path)  # one an older Waymark made is owner-only from now on
    if data.get("format") != fmt or data.get("version") != version:
        raise Conflict(f"{path} holds an unknown {what} format {data.get('format')!r} "
                       f"version {data.get('version')!r}.",
                       hint="Use a Waymark version that knows it.")
    return data


@dataclass(frozen=True)
class Marking:
    """What marks a kind of share: its marker file, format and version, what users call it,
    and the texts that tell them how to create and use one and who holds its lock (each a
    template of ``{path}``, the folder)."""

    marker: str
    format: str
    version: int
    what: str
    create_hint: str
    use_hint: str
    busy: str


@dataclass(frozen=True)
class Share:
    """A folder Waymark owns on shared or external storage, opened (its marker read) or made;
    a kind of share sets :attr:`MARKING`."""

    MARKING: ClassVar[Marking]
    root: Path
    id: str

    @classmethod
    def init(cls, path: Path) -> Self:
        """Make the empty (or new) folder ``path`` a share of this kind."""
        path, mark = path.absolute(), cls.MARKING
        return cls(path, create(path, mark.marker, mark.format, mark.version, what=mark.what,
                                use_hint=mark.use_hint.format(path=path)))

    @classmethod
    def open(cls, path: Path) -> Self:
        """The share at ``path``; NotFound when it is none, Conflict when of another version."""
        path, mark = path.absolute(), cls.MARKING
        marker = read(path, mark.marker, mark.format, mark.version, what=mark.what,
                      create_hint=mark.create_hint.format(path=path))
        return cls(path, str(marker["id"]))

    def locked(self, timeout: float) -> AbstractContextManager[None]:
        """Hold the share's lock; Busy after ``timeout`` seconds."""
        return filelock.held(self.root / "lock", timeout=timeout, busy=lambda: Busy(
            self.MARKING.busy.format(path=self.root), hint="Retry when it finishes."))


# --- reading what such a folder holds ---------------------------------------------------------
# Whoever can write the storage (an NFS export, a USB disk) controls every byte of it, so a name
# read there is confined to the folder before Waymark opens, copies or deletes anything by it.

Backing = Literal["inside", "none", "replaced"]
SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def refused(where: str, what: str) -> ImageError:
    """The error for untrusted content: names the file and says nothing was changed."""
    return ImageError(f"{where}: {what}. Nothing was changed.",
                      hint="The storage may have been altered by someone else: check who can "
                           "write it, and use another copy.")


def no_links(root: Path, *, what: str) -> None:
    """Refuse a ``what`` at ``root`` that holds a symbolic link anywhere below it. Waymark makes
    none there, and its clean-ups walk and delete by pattern: a planted link to a host folder
    would have them delete or write host files. Call it under the folder's lock, before such a
    walk or write (os.walk follows no link)."""
    for top, folders, files in os.walk(root):
        for name in (*folders, *files):
            path = Path(top) / name
            if path.is_symlink():
                raise refused(str(path.relative_to(root.parent)),
                              f"a symbolic link (to {os.readlink(path)!r}); Waymark makes none "
                              f"in a {what}, so someone else did: remove it")


def plain_folder(root: Path, folder: Path, *, where: str) -> Path:
    """``folder`` (inside ``root``) made where missing, every folder from ``root`` down to it
    checked to be a folder and no symbolic link, so a write into it stays inside ``root``."""
    path = root
    for part in folder.relative_to(root).parts:
        path = path / part
        with suppress(FileExistsError):
            os.mkdir(path, modes.FOLDER_MODE)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise refused(where, f"{path.relative_to(root)} is no folder but a "
                                 f"{'symbolic link' if path.is_symlink() else 'file'}")
    return folder


def component(value: object, *, where: str, what: str) -> str:
    """An id read from the folder, safe as one file-name component (no ``/``, no ``..``)."""
    if not isinstance(value, str) or not SAFE_COMPONENT.fullmatch(value) or ".." in value:
        raise refused(where, f"{what} {value!r} is not a plain name")
    return value


def inside(root: Path, name: object, *, where: str, base: Path | None = None) -> Path:
    """``name`` (relative to ``base``, by default ``root``) as a path inside ``root``: refused
    when absolute, when it has a ``..`` part, or when it resolves (symbolic links followed)
    outside ``root``."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise refused(where, f"the file name {name!r} is not a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise refused(where, f"the file name {name!r} leads outside {root}")
    path = (base or root) / pure
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise refused(where, f"the file name {name!r} leads outside {root}")
    return path


def image_chain(root: Path, path: Path, *, where: str, backing: Backing = "inside"
                ) -> list[Path]:
    """The qcow2 image ``path`` and the backing files it names, each read from its own header
    (:func:`qemu_img.header`: no implicit look-ups) before anything opens the next; see
    :func:`pinned_chain`, which this checks and closes again."""
    with pinned_chain(root, path, where=where, backing=backing) as layers:
        return [layer.path for layer in layers]


@dataclass(frozen=True)
class Layer:
    """One checked file of a chain: the path it was named by and the file it is, held open."""

    path: Path
    fd: int


@contextmanager
def pinned_chain(root: Path, path: Path, *, where: str, backing: Backing = "inside"
                 ) -> Iterator[list[Layer]]:
    """The qcow2 image ``path`` and its backing files, each opened (no symbolic link followed,
    a regular file whose real place is inside ``root``) and its header read from the open file
    before anything opens the next. The files stay open while the caller copies them
    (:func:`qemu_img.convert_pinned`), so a file renamed or swapped for a link after the check
    changes nothing.

    ``backing``: ``inside`` (each backing file a qcow2 named relatively, inside ``root``),
    ``none`` (the image must stand alone) or ``replaced`` (its backing name is rewritten before
    anything follows it: not followed). Refused too: a ``json:`` or protocol backing name, a
    loop, an external data file, a file that is not qcow2."""
    with ExitStack() as stack:
        layers = [Layer(path, stack.enter_context(opened_inside(root, path, where=where)))]
        seen = {_identity(layers[0].fd)}
        while True:
            here = f"{where}: {path.name}" if len(layers) > 1 else where
            below = _backing_of(root, layers[-1], here=here, backing=backing)
            if below is None:
                break
            fd = stack.enter_context(opened_inside(root, below, where=here))
            if _identity(fd) in seen:
                raise refused(here, f"the backing chain loops at {below.name!r}")
            seen.add(_identity(fd))
            layers.append(Layer(below, fd))
            path = below
        yield layers


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


@contextmanager
def opened_inside(root: Path, path: Path, *, where: str) -> Iterator[int]:
    """``path`` opened read-only (a symbolic link is not followed): refused unless it is a
    regular file whose real place (where the open file is, not what its name says now) is
    inside ``root``. Hand it on as ``/dev/fd/N`` or ``/proc/self/fd/N``."""
    try:
        fd = os.open(path.resolve(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise refused(where, f"cannot open {path.name!r} as a plain file ({err.strerror})"
                      ) from err
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not stat.S_ISREG(os.fstat(fd).st_mode) or root.resolve() not in real.parents:
            raise refused(where, f"{path.name!r} is not a regular file inside {root}")
        yield fd
    finally:
        os.close(fd)


def _backing_of(root: Path, layer: Layer, *, here: str, backing: Backing) -> Path | None:
    """The checked backing file named in ``layer``'s header (read from the open file), or None
    at the base."""
    header = qemu_img.header(layer.path, layer.fd)
    if header.data_file is not None:
        raise refused(here, f"the image has an external data file ({header.data_file!r})")
    name = header.backing_filename
    if not name or backing == "replaced":
        return None
    if backing == "none":
        raise refused(here, f"the image has a backing file ({name!r}); it must stand alone")
    if ":" in name or header.backing_format != "qcow2":
        raise refused(here, f"the backing file {name!r} (format "
                            f"{header.backing_format!r}) is not a qcow2 file named plainly")
    real = Path(os.readlink(f"/proc/self/fd/{layer.fd}"))
    return inside(root, name, where=here, base=real.parent)
