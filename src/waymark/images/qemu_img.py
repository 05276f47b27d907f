"""The only place that runs ``qemu-img``.

Argv lists, ``LC_ALL=C``, ``--output=json`` wherever qemu-img has it, and an explicit ``-f``/``-F``
on every image we open, so a raw file can never be probed into another format. Never call these
on an image a running QEMU has open (a later issue routes those through QMP block jobs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waymark import process
from waymark.errors import ImageError, NotFound, ToolError

FORMATS = ("qcow2", "raw")
QCOW2_MAGIC = b"QFI\xfb"
SECTOR = 512


@dataclass(frozen=True)
class ImageInfo:
    """One entry of ``qemu-img info --output=json``."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int = 0
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None
    data_file: str | None = None  # a qcow2 image's external data file

    @classmethod
    def parse(cls, entry: dict[str, Any]) -> ImageInfo:
        specific = entry.get("format-specific", {}).get("data", {})
        return cls(filename=str(entry["filename"]), format=str(entry["format"]),
                   virtual_size=int(entry["virtual-size"]),
                   actual_size=int(entry.get("actual-size", 0)),
                   backing_filename=entry.get("backing-filename"),
                   full_backing_filename=entry.get("full-backing-filename"),
                   backing_format=entry.get("backing-filename-format"),
                   data_file=specific.get("data-file"))


@dataclass(frozen=True)
class MapExtent:
    start: int
    length: int
    depth: int
    data: bool
    zero: bool
    present: bool = True  # allocated in some layer (false: reads as zero from nowhere)

    @classmethod
    def parse(cls, entry: dict[str, Any]) -> MapExtent:
        return cls(int(entry["start"]), int(entry["length"]), int(entry["depth"]),
                   bool(entry["data"]), bool(entry["zero"]), bool(entry.get("present", True)))


Progress = Callable[[float], None] | None


def allocated(path: str) -> int:
    """Bytes the file itself holds on disk (qemu-img's ``actual-size``; 0: it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _qemu_img(*args: str, what: str, pass_fds: Sequence[int] = (),
             answers: Sequence[int] = ()) -> str:
    return process.run(["qemu-img", *args], what=what, pass_fds=pass_fds,
                       answers=answers).stdout


def _qemu_img_p(args: list[str], *, what: str, on_progress: Progress,
                pass_fds: Sequence[int] = ()) -> None:
    """A long qemu-img command; with ``on_progress``, run with ``-p`` and report fractions."""
    if on_progress is None:
        _qemu_img(*args, what=what, pass_fds=pass_fds)
        return
    process.run_progress(["qemu-img", args[0], "-p", *args[1:]], what=what,
                         on_progress=on_progress, pass_fds=pass_fds)


def create(path: Path, *, size: int | None = None, backing: Path | None = None,
           backing_fmt: str | None = None, unsafe: bool = False) -> None:
    """Create a qcow2 image: a new base of ``size`` bytes, or an overlay on ``backing``.

    qemu-img opens the backing chain (headers only) to learn its size, so an overlay costs the
    same whatever the disk size, and a chain with a missing file fails here. ``unsafe`` (``-u``,
    which needs ``size``) does not open the backing file: the way to put an overlay on the
    image a running QEMU holds locked.
    """
    argv = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        if backing_fmt is None:
            raise ValueError("backing_fmt is required with backing")
        argv += ["-F", backing_fmt, "-b", str(backing)]
        if unsafe:
            if size is None:
                raise ValueError("an unsafe overlay needs its size")
            argv.append("-u")
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    _qemu_img(*argv, what=f"creating {path}")


def probe_format(path: Path) -> str:
    """The format of a file a user brings; only qcow2 and raw are accepted."""
    if not path.is_file():
        raise NotFound(f"disk image {path} does not exist.",
                       hint="Give the path of an existing qcow2 or raw image file.")
    try:
        out = _qemu_img("info", "-U", "--output=json", str(path), what=f"reading {path}")
    except ToolError as err:
        raise ImageError(f"{path} is not a readable disk image: {err.message}",
                         hint="Give a qcow2 or raw image file.") from err
    probed = json.loads(out)
    fmt = str(probed.get("format", "?"))
    if fmt not in FORMATS:
        raise ImageError(f"{path} is a {fmt} image; Waymark takes qcow2 or raw.",
                         hint=f"Convert it first: qemu-img convert -O qcow2 {path} NEW.qcow2")
    # QEMU rounds a short raw file up to a sector: its own length is what it holds
    check_disk_size(path, fmt, path.stat().st_size if fmt == "raw"
                    else int(probed.get("virtual-size") or 0))
    if fmt == "qcow2":  # a broken chain first (its own refusal), then each file's tables
        for image in chain(path, fmt):
            if image.format == "qcow2":
                check_intact(Path(image.filename))
    return fmt


def in_use(path: Path, fmt: str) -> bool:
    """Whether another process (a running QEMU) holds ``path`` open for writing: ``qemu-img
    info`` without ``-U`` asks for a consistent read of the ``fmt`` image, which a writer of a
    qcow2 image refuses (a lock on the file; a raw image's writer shares reads, so it is not
    seen). Any other failure is not this question's: False (the checks of the file say what is
    wrong with it)."""
    try:
        _qemu_img("info", "-f", fmt, "--output=json", str(path), what=f"reading {path}")
    except ToolError as err:
        return 'get shared "write" lock' in err.message
    return False


def check_disk_size(path: Path, fmt: str, size: int) -> None:
    """A disk holds at least one sector: an empty or 12-byte file is no disk image."""
    if size < SECTOR:
        raise ImageError(f"{path} is no disk: as a {fmt} image it holds {size} bytes, less "
                         f"than one {SECTOR}-byte sector.",
                         hint="Give a real qcow2 or raw disk image (an empty one: qemu-img "
                              "create -f qcow2 NEW.qcow2 10G).")


def check_intact(path: Path) -> None:
    """A qcow2 file a user brings holds every cluster its tables point at. One cut short (a
    copy or a download that stopped, a disk that filled up) keeps its header, so ``qemu-img
    info`` reads it as a disk of its full size, but what lay past the cut is gone: ``qemu-img
    check`` counts each table entry that points past the end as a corruption. Leaked clusters
    (space lost, no data) are no reason to refuse an image."""
    report = check_report(path, "qcow2")
    if report.corruptions:
        raise ImageError(f"{path} is damaged: qemu-img check finds {report.corruptions} "
                         "error(s) in its qcow2 tables (clusters missing past the end of the "
                         "file, a copy or download that stopped, or counted wrong by a crash).",
                         hint=f"Copy it again from its source; qemu-img check -f qcow2 {path} "
                              "lists what is wrong.")


def chain(path: Path, fmt: str) -> list[ImageInfo]:
    """``qemu-img info --backing-chain``: the image, then its backing files down to the base.

    A missing backing file or a loop in the chain raises ImageError.
    """
    try:
        out = _qemu_img("info", "-U", "--backing-chain", "--output=json", "-f", fmt, str(path),
                        what=f"reading the backing chain of {path}")
    except ToolError as err:
        raise ImageError(f"the backing chain of {path} is broken: {err.message}",
                         hint="Repair or replace the image (qemu-img rebase), then retry.") from err
    try:
        return [ImageInfo.parse(entry) for entry in json.loads(out)]
    except (KeyError, TypeError, ValueError) as err:
        raise ImageError(f"qemu-img info gave unexpected output for {path}: {err}") from err


def info(path: Path, fmt: str) -> ImageInfo:
    return chain(path, fmt)[0]


def header(path: Path, fd: int | None = None) -> ImageInfo:
    """What the qcow2 header of ``path`` says, read from that one file: ``qemu-img info``
    without ``--backing-chain`` opens neither the backing file nor an external data file, so
    this is how to look at an image from untrusted storage before anything follows its names.
    With ``fd`` (``path`` opened already), reads that open file, whatever the name now is.
    ImageError when it is not a readable qcow2 image."""
    try:
        out = _qemu_img("info", "-U", "--output=json", "-f", "qcow2",
                        str(path) if fd is None else f"/dev/fd/{fd}",
                        what=f"reading the header of {path}", pass_fds=() if fd is None else (fd,))
        return ImageInfo.parse(json.loads(out))
    except ToolError as err:
        raise ImageError(f"{path} is not a readable qcow2 image: {err.message}",
                         hint="Use another copy of it.") from err
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ImageError(f"qemu-img info gave unexpected output for {path}: {err}") from err


def named_files(path: Path) -> list[Path]:
    """The files a qcow2 image's own header names (its backing file, its external data file),
    relative names resolved against its folder; read from that one file (:func:`header`), so a
    chain broken further down does not hide them. [] for a file that is not a qcow2 image."""
    try:
        with path.open("rb") as file:
            if file.read(4) != QCOW2_MAGIC:
                return []
        found = header(path)
    except (OSError, ImageError):
        return []
    names = (found.backing_filename, found.data_file)
    return [path.parent / name for name in names if name]


def commit(top: Path, base: Path, on_progress: Progress = None) -> None:
    """Write ``top``'s own clusters into ``base`` (its direct backing file); ``top`` is kept."""
    _qemu_img_p(["commit", "-f", "qcow2", "-d", "-b", str(base), str(top)],
                what=f"merging {top} into {base}", on_progress=on_progress)


def rebase(path: Path, backing: Path | None, backing_fmt: str | None, *, unsafe: bool,
           on_progress: Progress = None) -> None:
    """Point ``path`` at a new backing file.

    Safe mode (``unsafe=False``) first copies into ``path`` every cluster where the old and new
    chains differ, so the image's content never changes, even if interrupted; ``unsafe`` only
    rewrites the header, for when both chains are known to hold the same content.
    """
    argv = ["rebase", "-f", "qcow2"]
    if unsafe:
        argv.append("-u")
    if backing is None:
        argv += ["-b", ""]
    else:
        if backing_fmt is None:
            raise ValueError("backing_fmt is required with backing")
        argv += ["-F", backing_fmt, "-b", str(backing)]
    argv.append(str(path))
    _qemu_img_p(argv, what=f"rebasing {path}", on_progress=on_progress)


def convert(src: Path, src_fmt: str, dst: Path, dst_fmt: str = "qcow2",
            on_progress: Progress = None) -> None:
    """Copy the whole chain of ``src`` into one standalone image ``dst``."""
    _qemu_img_p(["convert", "-f", src_fmt, "-O", dst_fmt, str(src), str(dst)],
                what=f"copying {src} to {dst}", on_progress=on_progress)


def convert_pinned(layers: Sequence[int], dst: Path, on_progress: Progress = None) -> None:
    """Copy a checked qcow2 chain, given as open files (top first, base last), into one
    standalone image ``dst``. Every layer is named explicitly down to ``"backing": null``, so
    qemu-img follows no backing or file name: what was checked is what is copied."""
    spec: dict[str, Any] | None = None
    for fd in reversed(layers):
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": f"/dev/fd/{fd}"},
                "backing": spec}
    _qemu_img_p(["convert", "-O", "qcow2", "json:" + json.dumps(spec), str(dst)],
                what=f"copying a checked image chain to {dst}", on_progress=on_progress,
                pass_fds=layers)


def allocation_map(path: Path, fmt: str) -> list[MapExtent]:
    out = _qemu_img("map", "--output=json", "-f", fmt, str(path), what=f"mapping {path}")
    return [MapExtent.parse(e) for e in json.loads(out)]


# qcow2 (docs/interop/qcow2.txt): a version 3 header is at least 104 bytes; its length is the
# big-endian u32 at offset 100; header extensions follow it (type u32, length u32, data padded
# to 8 bytes; type 0 ends them), all within the first cluster (at least 512 bytes).
_V3_HEADER, _HEADER_LENGTH_AT, _BITMAPS_EXTENSION, _FIRST_BYTES = 104, 100, 0x23852875, 65536


def has_bitmaps_extension(path: Path) -> bool:
    """Whether the qcow2 file's header carries the bitmaps extension, read from the header
    itself (no qemu-img process): a file without it has no persistent bitmap, which is most
    files, so :func:`bitmaps` need not ask qemu-img. True when unsure (not a readable version
    3 qcow2 header): qemu-img then answers."""
    try:
        with path.open("rb") as file:
            head = file.read(_FIRST_BYTES)
    except OSError:
        return True
    if len(head) < _V3_HEADER or head[:4] != QCOW2_MAGIC:
        return True
    if int.from_bytes(head[4:8], "big") < 3:
        return False  # bitmaps need a version 3 image
    at = int.from_bytes(head[_HEADER_LENGTH_AT:_HEADER_LENGTH_AT + 4], "big")
    while at + 8 <= len(head):
        kind = int.from_bytes(head[at:at + 4], "big")
        length = int.from_bytes(head[at + 4:at + 8], "big")
        if kind == 0:
            return False
        if kind == _BITMAPS_EXTENSION:
            return True
        at += 8 + (length + 7) // 8 * 8
    return True  # no end found: let qemu-img read it


def bitmaps(path: Path, *, shared: bool = False) -> list[dict[str, Any]]:
    """The persistent dirty bitmaps of a qcow2 image: ``name``, ``granularity`` and ``flags``
    (``in-use``: a QEMU has the image open, or was killed while it had). ``shared`` (``-U``)
    reads an image a QEMU may hold open. A file whose header has no bitmaps extension has none
    (:func:`has_bitmaps_extension`: no qemu-img run, a merge's or a checkpoint's usual case)."""
    if not has_bitmaps_extension(path):
        return []
    out = _qemu_img("info", *(["-U"] if shared else []), "--output=json", "-f", "qcow2",
                    str(path), what=f"reading the bitmaps of {path}")
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


def bitmap(path: Path, name: str, *, add: int | None = None, remove: bool = False,
           merge_from: Path | None = None) -> None:
    """Change one persistent bitmap of a qcow2 image no process has open, in one qemu-img run:
    ``remove`` it, or ``add`` it (with that granularity) and/or merge the same-named bitmap of
    ``merge_from`` into it."""
    argv = ["bitmap", "-f", "qcow2"]
    if remove:
        argv.append("--remove")
    if add is not None:
        argv += ["--add", "-g", str(add)]
    if merge_from is not None:
        argv += ["--merge", name, "-b", str(merge_from), "-F", "qcow2"]
    if len(argv) == 3:
        raise ValueError("bitmap needs add, remove or merge_from")
    _qemu_img(*argv, str(path), name, what=f"changing bitmap {name} of {path}")


@dataclass(frozen=True)
class CheckReport:
    """What ``qemu-img check`` found in one image.

    ``corruptions``: metadata that is wrong (a cluster used but not counted, a broken table):
    data is at risk, and only a person decides what to do. ``leaks``: clusters counted as used
    that nothing uses, left by a process killed while it allocated (QEMU SIGKILLed in a live
    commit): only space is lost, and ``qemu-img check -r leaks`` frees them safely.
    """

    corruptions: int = 0
    leaks: int = 0

    @classmethod
    def parse(cls, out: str) -> CheckReport:
        data = json.loads(out)
        return cls(corruptions=int(data.get("corruptions", 0)), leaks=int(data.get("leaks", 0)))


# qemu-img check exits 2 when it found corruption, 3 when it found only leaks: an answer, not a
# failure; 1 (the check could not finish) and 63 (no checks for this format) are failures.
_CHECK_ANSWERS = (2, 3)


def _alone(path: Path, fmt: str) -> list[str]:
    """qemu-img arguments naming the ``fmt`` image ``path`` without its backing chain: a
    qcow2 image's own tables are checked whatever lies below it, and opening the chain would
    cost every layer below on every call (a chain's images checked one by one: quadratic)."""
    if fmt != "qcow2":
        return ["-f", fmt, str(path)]
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}}
    return [f"json:{json.dumps(spec)}"]


def _check(path: Path, fmt: str, *repair: str) -> CheckReport:
    try:
        out = _qemu_img("check", *repair, "--output=json", *_alone(path, fmt),
                        what=f"checking {path}", answers=_CHECK_ANSWERS)
        return CheckReport.parse(out)
    except ToolError as err:
        raise ImageError(f"{path} failed its consistency check: {err.message}",
                         hint=f"Inspect it with: qemu-img check -f {fmt} {path}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise ImageError(f"qemu-img check gave unexpected output for {path}: {err}") from err


def check_report(path: Path, fmt: str) -> CheckReport:
    """``qemu-img check``: corruptions and leaks counted apart; ImageError when the check
    cannot run (an unreadable image)."""
    return _check(path, fmt)


def repair_leaks(path: Path, fmt: str) -> CheckReport:
    """``qemu-img check -r leaks``: free the leaked clusters of an image no process has open
    (qemu-img takes its write lock, so an image a QEMU holds is refused, never changed).
    Nothing else is touched; returns what is left afterwards."""
    return _check(path, fmt, "-r", "leaks")


def check(path: Path, fmt: str) -> None:
    """``qemu-img check``: raises ImageError when the image has errors or leaks."""
    report = check_report(path, fmt)
    if report.corruptions or report.leaks:
        raise ImageError(f"{path} failed its consistency check: {report.corruptions} "
                         f"corruption(s), {report.leaks} leaked cluster(s)",
                         hint=f"Inspect it with: qemu-img check -f {fmt} {path}")


def commit_onto(top: Path, into: Path, on_progress: Progress = None) -> None:
    """Write ``top``'s own clusters into ``into`` as if ``into`` were its backing file, whatever
    file ``top``'s header names: ``top`` is opened with its backing overridden to ``into``
    (``-d``: kept as it is; its header is never written). ``into`` then holds ``top``'s view
    when it held the view of ``top``'s real backing file (a consolidation advancing by one
    layer, :mod:`waymark.engine.consolidation`). Both must be qcow2. ``top`` is read without
    its lock: a running QEMU holds it as a read-only backing layer that no one writes (without
    ``locking: off``, "Failed to get 'write' lock": commit opens its top read-write, writes
    nothing to it with ``-d``)."""
    spec = {"driver": "qcow2",
            "file": {"driver": "file", "filename": str(top), "locking": "off"},
            "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": str(into)}}}
    _qemu_img_p(["commit", "-d", "json:" + json.dumps(spec)],
                what=f"merging {top} into {into}", on_progress=on_progress)
