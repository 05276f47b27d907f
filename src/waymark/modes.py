"""Everything Waymark writes is its owner's only: files 0600, folders 0700.

The catalog holds password and token hashes, session CSRF tokens and the audit log; memory
states hold guest RAM; disks, serial logs, backup points and bundles hold guest data. So the
entry points (``waymark`` and ``waymark serve``) set the process umask to :data:`UMASK` before
anything is created: every file and folder Waymark, SQLite, qemu-img and QEMU (children inherit
the umask) create is then owner-only, whatever mode its creator asks for. Folders made before
this rule (or by someone else: an empty folder given to ``backup repo init`` or an export) are
tightened with :func:`tighten` when Waymark opens them: the home, backup repositories, library
shares and export bundles become 0700, which also hides any older, looser file inside them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotated: `waymark --help` imports this module, and not pathlib
    from pathlib import Path

UMASK = 0o077
FOLDER_MODE = 0o700
log = logging.getLogger(__name__)


def restrict_process() -> None:
    """Owner-only for everything this process and its children create from now on."""
    os.umask(UMASK)


def tighten(folder: Path) -> None:
    """Make ``folder`` (one Waymark owns) 0700 if others could read or enter it. Best effort:
    on storage that keeps no modes (vfat) or a folder this user does not own, it stays as it
    is (its new files are still owner-only through the umask)."""
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077 == 0:
            return
        try:
            os.chmod(folder, FOLDER_MODE)
        except OSError as err:
            log.info("cannot make %s owner-only (%s); it stays %o", folder, err.strerror, mode)
