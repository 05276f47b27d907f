"""``waymark guest``: the small Debian-based guest that the demo and the tests boot."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from waymark.cli.main import face
from waymark.cli.output import emit, json_option


@click.group()
def guest() -> None:
    """The test/demo guest (any VM image works with Waymark; this one is self-contained)."""


@guest.command("build")
@click.option("--dest", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the guest and its package cache (default: <home>/guest).")
@click.option("--rebuild", is_flag=True,
              help="Build even if the cached guest is up to date (e.g. after a host upgrade).")
@json_option
def build(dest: Path | None, rebuild: bool, as_json: bool) -> None:
    """Build the guest from Debian packages, or reuse the cached one.

    Prints the kernel, initrd and data disk (qcow2) to give to: waymark vm create, and the same
    guest as a disk that boots by its own GRUB (BIOS or UEFI) and as an ISO.
    """
    from waymark.config import Settings
    from waymark.testguest import build as builder

    folder = dest if dest is not None else Settings.from_env(face()._home).home / "guest"
    image = builder.build(folder, log=lambda line: click.echo(line, err=True), force=rebuild)
    command = ["waymark", "vm", "create", "NAME", "--kernel", str(image.kernel),
               "--initrd", str(image.initrd), "--append", image.append,
               "--disk", str(image.disk), "--memory", "256M"]
    emit(as_json, image.to_json(), [
        f"kernel: {image.kernel}", f"initrd: {image.initrd}", f"disk:   {image.disk}",
        "Create a VM from it with:", "  " + shlex.join(command),
        f"boot disk: {image.boot_disk} (GRUB for BIOS and UEFI, its own data partition)",
        f"ISO:       {image.iso} (BIOS and UEFI; attach the data disk)"])
