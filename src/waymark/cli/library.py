"""``waymark profile``, ``waymark template`` and ``waymark library``: hardware profiles, VM
templates and library shares (:mod:`waymark.usecases.library.profiles`,
:mod:`waymark.usecases.library.templates`,
:mod:`waymark.usecases.library.store_deploy`; ``vm store`` and ``vm deploy`` are in
:mod:`waymark.cli.vm_change`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from waymark.cli.main import face
from waymark.cli.output import emit, fraction_progress, json_option
from waymark.model.hardware import CHECKPOINT_TYPES, FIRMWARE_KINDS
from waymark.model.units import human, parse_size
from waymark.usecases.library import profiles, templates
from waymark.usecases.library import store_deploy as library_ops
from waymark.usecases.vms import definitions as vms

TYPES = click.Choice(CHECKPOINT_TYPES)
F = TypeVar("F", bound=Callable[..., Any])


def _settings_options(command: F) -> F:
    for option in reversed([
            click.option("--cpus", type=click.IntRange(1, 64)),
            click.option("--memory", help="Memory (M, G suffixes)."),
            click.option("--checkpoint-type", type=TYPES),
            click.option("--max-checkpoints", type=int),
            click.option("--automatic-checkpoints", type=click.Choice(["on", "off"]))]):
        command = option(command)
    return command


def _settings(cpus: int | None, memory: str | None, checkpoint_type: str | None,
              max_checkpoints: int | None, automatic_checkpoints: str | None) -> dict[str, Any]:
    return {"cpus": cpus, "checkpoint_type": checkpoint_type, "max_checkpoints": max_checkpoints,
            "memory": None if memory is None else parse_size(memory, what="memory"),
            "automatic_checkpoints": None if automatic_checkpoints is None
            else automatic_checkpoints == "on"}


def _profile_lines(p: dict[str, Any]) -> list[str]:
    def shown(key: str) -> str:
        value = p[key]
        if value is None:
            return "-"
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    return [f"{p['name']:<20} cpus {shown('cpus'):>3}  memory {shown('memory_mib'):>6}M  "
            f"type {shown('checkpoint_type'):<14} limit {shown('max_checkpoints'):>3}  "
            f"automatic {shown('automatic_checkpoints')}"]


@click.group()
def profile() -> None:
    """Hardware profiles: settings that new VMs and templates copy."""


@profile.command("create")
@click.argument("name")
@_settings_options
@json_option
def profile_create(name: str, as_json: bool, **options: Any) -> None:
    """A new hardware profile (unset settings fall through to the template or default)."""
    p = profiles.create(face().ctx, name, _settings(**options))
    emit(as_json, p, [f"Created hardware profile {p['name']}.", *_profile_lines(p)])


@profile.command("set")
@click.argument("name")
@_settings_options
@json_option
def profile_set(name: str, as_json: bool, **options: Any) -> None:
    """Change a profile (VMs created from it earlier keep their settings)."""
    p = profiles.update(face().ctx, name, _settings(**options))
    emit(as_json, p, [f"Updated hardware profile {p['name']}.", *_profile_lines(p)])


@profile.command("show")
@click.argument("name")
@json_option
def profile_show(name: str, as_json: bool) -> None:
    p = profiles.show(face().ctx, name)
    emit(as_json, p, [*_profile_lines(p), f"  used by templates: "
                                          f"{', '.join(p['templates']) or '(none)'}"])


@profile.command("list")
@json_option
def profile_list(as_json: bool) -> None:
    rows = profiles.listing(face().ctx)
    emit(as_json, rows, [line for p in rows for line in _profile_lines(p)]
         or ["No hardware profiles yet. Create one with: waymark profile create NAME"])


@profile.command("delete")
@click.argument("name")
@json_option
def profile_delete(name: str, as_json: bool) -> None:
    emit(as_json, profiles.delete(face().ctx, name), [f"Deleted hardware profile {name}."])


@click.group()
def template() -> None:
    """VM templates: a hardware profile, boot files and read-only disk images."""


def _template_lines(t: dict[str, Any]) -> list[str]:
    lines = [f"{t['name']}: profile {t['profile'] or '-'}, checkpoint type "
             f"{t['checkpoint_type'] or '-'}, {len(t['disks'])} disk(s), "
             f"VMs linked: {', '.join(t['vm_names']) or '(none)'}"]
    return lines + [f"  disk {d['file']}  from {d['source']}" for d in t["disks"]]


@template.command("create")
@click.argument("name")
@click.option("--profile", metavar="P", help="The hardware profile VMs made from it use.")
@click.option("--disk", "disks", multiple=True, required=True, metavar="IMAGE",
              type=click.Path(path_type=Path),
              help="A qcow2 or raw image, copied into the template. Repeatable.")
@click.option("--kernel", metavar="FILE")
@click.option("--initrd", metavar="FILE")
@click.option("--append", metavar="CMDLINE")
@click.option("--checkpoint-type", type=TYPES)
@click.option("--firmware", type=click.Choice(FIRMWARE_KINDS), default="bios",
              show_default=True, help="The firmware of VMs made from it (each gets its own "
                                      "new UEFI variable store).")
@click.option("--tpm", type=click.Choice(["on", "off"]), default="off", show_default=True,
              help="VMs made from it get a TPM (each its own new one).")
@json_option
def template_create(name: str, profile: str | None, disks: tuple[Path, ...], kernel: str | None,
                    initrd: str | None, append: str | None, checkpoint_type: str | None,
                    firmware: str, tpm: str, as_json: bool) -> None:
    """A new template; its images are copied and made read-only."""
    line = fraction_progress(f"copying the disks of template {name}")
    t = templates.create(face().ctx, name, profile=profile,
                         disks=[p.expanduser().absolute() for p in disks], kernel=kernel,
                         initrd=initrd, append=append, checkpoint_type=checkpoint_type,
                         report=lambda _what, fraction: line(fraction),
                         platform=vms.Platform(firmware=firmware, tpm=tpm == "on"))
    emit(as_json, t, [f"Created template {t['name']}. Make a VM from it with: "
                      f"waymark vm create NAME --template {t['name']}"])


@template.command("set")
@click.argument("name")
@click.option("--profile", metavar="P")
@click.option("--checkpoint-type", type=TYPES)
@click.option("--append", metavar="CMDLINE")
@json_option
def template_set(name: str, profile: str | None, checkpoint_type: str | None,
                 append: str | None, as_json: bool) -> None:
    """Change a template's settings (never its images; existing VMs keep theirs)."""
    t = templates.update(face().ctx, name, profile=profile, checkpoint_type=checkpoint_type,
                         append=append)
    emit(as_json, t, [f"Updated template {t['name']}.", *_template_lines(t)])


@template.command("show")
@click.argument("name")
@json_option
def template_show(name: str, as_json: bool) -> None:
    t = templates.show(face().ctx, name)
    emit(as_json, t, _template_lines(t))


@template.command("list")
@json_option
def template_list(as_json: bool) -> None:
    rows = templates.listing(face().ctx)
    emit(as_json, rows, [line for t in rows for line in _template_lines(t)]
         or ["No templates yet. Create one with: waymark template create NAME --disk IMAGE"])


@template.command("delete")
@click.argument("name")
@json_option
def template_delete(name: str, as_json: bool) -> None:
    emit(as_json, templates.delete(face().ctx, name), [f"Deleted template {name}."])


@click.group()
def library() -> None:
    """Library shares: where stored VMs wait, with their checkpoints, to be deployed."""


@library.command("init")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def library_init(path: Path, as_json: bool) -> None:
    """Make an empty folder (on any mounted share) a library."""
    made = library_ops.init(path)
    emit(as_json, made, [f"Created the library {made['library']}.",
                         f"Store a VM in it: waymark vm store VM --library {made['library']}"])


@library.command("list")
@click.option("--library", "library_path", required=True, metavar="PATH",
              type=click.Path(path_type=Path), help="The library share's folder.")
@json_option
def library_list(library_path: Path, as_json: bool) -> None:
    """The VMs a library holds, each with its checkpoint tree (read-only)."""
    held = library_ops.listing(face().ctx, library_path)
    lines = []
    for v in held["vms"]:
        if v["status"] != "stored" or "checkpoints" not in v:
            lines.append(f"{v['name']}  ({v['status']}: {v.get('claim') or 'no manifest'})")
            continue
        clash = f"  (not deployable here: {v['clash']})" if v["clash"] else ""
        lines.append(f"{v['name']}  {v['state']}  {len(v['checkpoints'])} checkpoint(s)  "
                     f"{human(v['bytes'])}  stored {v['stored_at']} from "
                     f"{v['source']['host']}  [{v['id'][:12]}]{clash}")
        lines += [f"    {line}" for line in library_ops.tree_lines(
            v, shutil.get_terminal_size().columns - 4)]
    emit(as_json, held, lines or [f"The library {held['library']} is empty."])
