"""Installation media: ISO 9660 images a VM's CD drive reads (never writes).

An ISO is recognised by its first volume descriptor: the standard identifier ``CD001`` at
byte 32769 (sector 16 of 2048 bytes, after the descriptor type byte). That is all QEMU needs:
it reads the file as a raw, read-only block device.
"""

from __future__ import annotations

import stat
from pathlib import Path

from waymark.errors import ImageError, NotFound

MAGIC_OFFSET = 16 * 2048 + 1
MAGIC = b"CD001"


def is_iso(path: str | Path) -> bool:
    """Whether ``path`` is a regular file holding an ISO 9660 image (False if it is gone)."""
    try:
        if not stat.S_ISREG(Path(path).stat().st_mode):  # a FIFO would block the open
            return False
        with open(path, "rb") as handle:
            handle.seek(MAGIC_OFFSET)
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def checked(value: str | Path) -> str:
    """The absolute path of the ISO ``value`` names; NotFound when nothing is there, ImageError
    when it is no ISO 9660 image (a disk image, a folder, a text file)."""
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise NotFound(f"the ISO {path} does not exist.",
                       hint="Give the path of an existing .iso file.")
    if not is_iso(path):
        raise ImageError(f"{path} is not an ISO image (no ISO 9660 volume descriptor "
                         f"'CD001' at byte {MAGIC_OFFSET}).",
                         hint="Give an ISO 9660 image (.iso), e.g. an installation or "
                              "driver disc; disks are attached with: waymark vm disk add")
    return str(path)
