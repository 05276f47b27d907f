"""``waymark check``: compare the catalog, the files and the journal; repair what is safe.

Findings (each names the command that fixes it):

- ``stray-file``: a file in Waymark's folders that nothing references (Hyper-V's lingering
  AVHDX). Repair removes it when Waymark made it (named ``<32 hex>.qcow2``/``.json``);
  anything else is moved to ``$WAYMARK_HOME/lost+found``. It fails closed: a file that any
  image (catalogued, stray, or made by an unfinished intent) names in its own header as its
  backing or data file is kept, even when that image's chain is broken further down, and
  the finding names the image that needs it.
- ``missing-file``: the catalog references a file that is gone. Never repaired: no data is
  invented; the fix is restoring the file or deleting what needs it.
- ``broken-backing``: an image's backing file on disk is not the one the catalog records.
- ``image-error``: ``qemu-img check`` reports corruption (or cannot read the image). Never
  repaired: only a person can judge damaged data.
- ``leaked-clusters`` (a *notice*, not an error: ``clean`` stays true): ``qemu-img check``
  reports only leaks, clusters counted as used that nothing uses, left by a process killed
  while it allocated (QEMU SIGKILLed in a live commit). No data is at risk; repair frees them
  (``qemu-img check -r leaks``) on an image of a VM whose QEMU does not run, under the VM's
  lock, and never touches an image a QEMU holds.
- ``missing-config``: a checkpoint's configuration file is gone; repair rewrites it from the
  catalog.
- ``unfinished-intent``: a journal intent that recovery could not finish; repair drives it again.
- ``missing-consolidation``/``stale-consolidation``: a disk's consolidation
  (:mod:`waymark.engine.consolidation`) whose file is gone, whose image is gone, or linked
  where it does not belong; repair relinks Now onto its real chain and forgets it (an active
  image linked to its sound consolidation is no ``broken-backing``).
- ``uncompacted``: merges left undone (a cancelled merge job): no data is at risk, the images
  only take space and depth; repair runs them.
- Templates (``templates/``, :mod:`waymark.usecases.library.templates`): a template image that is
gone or
  does not match its recorded sha256 is ``missing-file``/``image-error`` (never repaired); a
  folder no template names (a killed ``template create``) is ``stray-file``, removed by repair.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark import durable
from waymark.catalog.models import Checkpoint, Image, Template, Vm
from waymark.engine import compaction, consolidation, journal, locks, lookup, settle
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.errors import Busy, ImageError, WaymarkError
from waymark.images import qemu_img
from waymark.usecases.library import profiles

CHECKS_AT_ONCE = max(2, os.cpu_count() or 1)  # qemu-img checks run side by side
OURS = re.compile(r"^\.?[0-9a-f]{32}\.(qcow2|json|state)(\.tmp)?$")
ERROR, NOTICE = "error", "notice"  # a notice (leaked clusters) leaves the state clean
LEAKS = "leaked-clusters"


@dataclass
class Finding:
    vm: str
    kind: str
    path: str
    detail: str
    fix: str
    repaired: str | None = None
    severity: str = ERROR


@dataclass(frozen=True)
class _Break:
    """Why an image's backing chain does not open: the file ``at`` which it breaks, and why
    (``cause``), said once for every image above it."""

    at: str
    cause: str

    def detail(self, path: str) -> str:
        return self.cause if path == self.at else \
            f"the backing chain of {path} is broken at {self.at}: {self.cause}"


# what an image's own header says, read while its whole backing chain opened; or where that
# chain breaks (see :func:`_chain_infos`)
Opened = qemu_img.ImageInfo | _Break


@dataclass(frozen=True)
class _Read:
    """What qemu-img said of a VM's images, each read once: ``opened`` (:func:`_chain_infos`)
    and the ``qemu-img check`` of each image whose chain opened (:func:`_check_reports`)."""

    opened: dict[str, Opened]
    reports: dict[str, qemu_img.CheckReport | WaymarkError]


def _read_images(examined: list[Image]) -> _Read:
    opened = _chain_infos(examined)
    return _Read(opened, _check_reports(
        [i for i in examined if isinstance(opened.get(i.path), qemu_img.ImageInfo)]))


def _check_reports(images: list[Image]) -> dict[str, qemu_img.CheckReport | WaymarkError]:
    """``qemu-img check`` of each image (its own tables: one short run each, whatever lies
    below it), ``CHECKS_AT_ONCE`` runs at a time."""
    with ThreadPoolExecutor(CHECKS_AT_ONCE) as pool:
        return dict(zip([i.path for i in images], pool.map(_check_report, images), strict=True))


def _check_report(image: Image) -> qemu_img.CheckReport | WaymarkError:
    try:
        return qemu_img.check_report(Path(image.path), image.format)
    except WaymarkError as err:
        return err


def _image_findings(vm_name: str, image: Image, images: dict[str, Image],
                    read: _Read | None) -> list[Finding]:
    """What is wrong with one image; ``read`` (:func:`_read_images`) is None when a running
    QEMU writes it, so only its existence can be checked (its content is QEMU's until the VM
    stops)."""
    path = Path(image.path)
    if not path.exists():
        return [Finding(vm_name, "missing-file", image.path,
                        "the catalog needs this image but the file is gone",
                        "restore the file from a backup (Waymark will not invent its data), or "
                        f"delete the checkpoints that need it: waymark checkpoint list {vm_name}")]
    if read is None:
        return []
    if image.pinned:
        try:
            qemu_img.chain(path, image.format)
        except WaymarkError as err:
            return [Finding(vm_name, "broken-backing", image.path, err.message,
                            "repair your image's backing chain (it is yours; Waymark never "
                            "writes it)")]
        return []
    info = read.opened.get(image.path) or _chain_head(path, image.format, read.opened)
    try:
        if isinstance(info, _Break):
            raise ImageError(info.detail(image.path))
        report = read.reports.get(image.path) or qemu_img.check_report(path, image.format)
        if isinstance(report, WaymarkError):
            raise report
    except WaymarkError as err:
        return [Finding(vm_name, "image-error", image.path, err.message,
                        f"inspect it: qemu-img check -f {image.format} {image.path}")]
    return _health_findings(vm_name, image, report) + _backing_findings(vm_name, image, images,
                                                                        info)


def _chain_infos(examined: list[Image]) -> dict[str, Opened]:
    """Path -> what each image's own header says, read while its whole backing chain opened,
    or where that chain breaks (:class:`_Break`), for a VM's images that are there, not
    pinned, and no QEMU writes (``examined``).

    ``qemu-img info --backing-chain`` of each top (an image no other examined image sits on)
    reads every layer below it in one run, so a chain of N images costs one run, not N runs
    that each open the whole chain (quadratic). Only an image no top's run opened whole is
    read on its own (:func:`_on_its_own`), bottom up: one run each."""
    opened: dict[str, Opened] = {}
    below = {image.parent_id for image in examined}
    for top in (image for image in examined if image.id not in below):
        with contextlib.suppress(WaymarkError):  # then read layer by layer, below
            for entry in qemu_img.chain(Path(top.path), top.format):
                opened.setdefault(entry.filename, entry)
    for image in _bottom_up([i for i in examined if i.path not in opened]):
        opened[image.path] = _on_its_own(image, opened)
    return opened


def _bottom_up(images: list[Image]) -> list[Image]:
    """``images``, each after those of them below it in the catalog."""
    by_id = {image.id: image for image in images}
    depth: dict[str, int] = {}
    for image in images:
        walk = [image]
        while walk[-1].parent_id in by_id and walk[-1].parent_id not in depth \
                and len(walk) <= len(by_id):  # (a loop of parents in the catalog ends too)
            walk.append(by_id[str(walk[-1].parent_id)])
        base = depth.get(str(walk[-1].parent_id), -1)
        for step in reversed(walk):
            base = depth[step.id] = base + 1
    return sorted(images, key=lambda image: depth[image.id])


def _on_its_own(image: Image, opened: dict[str, Opened]) -> Opened:
    """An image whose chain no top's run opened whole: its own header, then its backing file's
    chain as ``opened`` knows it (the layers below were read first) or as one run reads it."""
    path = Path(image.path)
    if image.format != "qcow2":
        return _chain_head(path, image.format, opened)
    try:
        own = qemu_img.header(path)
    except ImageError as err:
        return _Break(image.path, err.message)
    backing = own.full_backing_filename or own.backing_filename
    if backing is None:
        return own
    below = opened.get(backing) or _chain_head(Path(backing), own.backing_format or "qcow2",
                                               opened)
    return below if isinstance(below, _Break) else own


def _chain_head(path: Path, fmt: str, opened: dict[str, Opened]) -> Opened:
    """``path``'s entry of its own chain, read in one run (every layer of it goes into
    ``opened``), or where that chain breaks (kept in ``opened`` too)."""
    try:
        chain = qemu_img.chain(path, fmt)
    except WaymarkError as err:
        opened[str(path)] = _Break(str(path), err.message)
        return opened[str(path)]
    for entry in chain:
        opened.setdefault(entry.filename, entry)
    return chain[0]


def _health_findings(vm_name: str, image: Image, report: qemu_img.CheckReport
                     ) -> list[Finding]:
    """Corruption is an error nobody repairs for you; leaks alone are a notice repair fixes."""
    if report.corruptions:
        return [Finding(vm_name, "image-error", image.path,
                        f"qemu-img check found {report.corruptions} corruption(s)"
                        + (f" and {report.leaks} leaked cluster(s)" if report.leaks else ""),
                        f"inspect it: qemu-img check -f {image.format} {image.path}; if its "
                        "data is damaged, restore it from a backup (repair never touches it)")]
    if report.leaks:
        return [Finding(vm_name, LEAKS, image.path,
                        f"{report.leaks} leaked cluster(s): space nothing uses, left by a process "
                        "killed while it wrote (no data is at risk)",
                        "waymark check --repair frees them (stop the VM first if it runs)",
                        severity=NOTICE)]
    return []


def _backing_findings(vm_name: str, image: Image, images: dict[str, Image],
                      info: qemu_img.ImageInfo) -> list[Finding]:
    want = images[image.parent_id].path if image.parent_id else None
    have = info.full_backing_filename or info.backing_filename
    if have != want:
        return [Finding(vm_name, "broken-backing", image.path,
                        f"its backing file is {have or 'none'}, the catalog says {want or 'none'}",
                        f"if the content is known to match: qemu-img rebase -u -F "
                        f"{images[image.parent_id].format if image.parent_id else 'qcow2'} "
                        f"-b {want or ''} {image.path}; otherwise restore the file")]
    return []


def _config_findings(vm_row: Vm, rows: list[Checkpoint]) -> list[Finding]:
    folder = Path(vm_row.checkpoint_dir)
    return [Finding(vm_row.name, "missing-config", str(folder / f"{c.id}.json"),
                    f"checkpoint {c.name!r} has no configuration file",
                    "waymark check --repair (rewrites it from the catalog)")
            for c in rows if not (folder / f"{c.id}.json").exists()]


def _known_paths(session: Session) -> set[str]:
    images = {i.path for i in session.scalars(select(Image))}
    configs = {str(Path(v.checkpoint_dir) / f"{c.id}.json")
               for v in session.scalars(select(Vm))
               for c in lookup.checkpoints(session, v.id)}
    memory = {c.memory_path for c in session.scalars(select(Checkpoint)) if c.memory_path}
    hardware = [v.config for v in session.scalars(select(Vm))]
    hardware += [c.config for c in session.scalars(select(Checkpoint))]
    boot = {path for h in hardware for path in (h.get("kernel"), h.get("initrd"), h.get("media"))
            if path}
    return images | configs | memory | boot


def _stray_findings(ctx: Context, session: Session, vm_ids: set[str]) -> list[Finding]:
    known = _known_paths(session) | _intent_paths(ctx) | consolidation.paths(session)
    names = {v.id: v.name for v in session.scalars(select(Vm))}
    # the VM's own folder is all ours; a checkpoint folder may be shared: only our names count
    folders = [(vm_id, ctx.vm_folder(vm_id), False) for vm_id in sorted(vm_ids)]
    folders += [(v.id, Path(v.checkpoint_dir), True) for v in session.scalars(select(Vm))
                if v.id in vm_ids]
    found: dict[str, Finding] = {}
    # run/ (sockets, logs of a running QEMU), saved/ (a saved memory state) and tpm/ (Now's
    # TPM state, waymark.qemu.tpm) are the VM's live files, checked by the commands that own
    # them: repair never deletes them
    runtime = {ctx.vm_folder(v) / sub for v in vm_ids for sub in ("run", "saved", "tpm")}
    for vm_id, folder, only_ours in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        for path in (p for p in files if not runtime & set(p.parents)):
            hidden = path.name.startswith(".") and not OURS.match(path.name)
            if str(path) in known or str(path) in found or hidden:
                continue
            if only_ours and not OURS.match(path.name):
                continue
            found[str(path)] = Finding(names.get(vm_id, vm_id), "stray-file", str(path),
                                       "no checkpoint, disk or VM references this file",
                                       "waymark check --repair")
    return list(found.values())


def _intent_paths(ctx: Context) -> set[str]:
    """Files that unfinished intents make, read or name (every path of every step, its
    ``backing`` included: :meth:`waymark.engine.steps.StepBase.paths`): never strays."""
    return {path for intent in ctx.journal.pending() for step in journal.steps_of(intent)
            for path in step.paths()}


def _backing_users(ctx: Context, session: Session, findings: list[Finding]) -> dict[str, str]:
    """Every file some image needs -> that image: what the header of each catalogued image,
    each stray file and each file of an unfinished intent names as its backing (or data) file.
    Headers only, never the chain: an image whose chain is broken further down still needs
    its own backing file."""
    images = {Path(i.path) for i in session.scalars(select(Image))}
    images |= {Path(f.path) for f in findings if f.kind == "stray-file"}
    images |= {Path(p) for p in _intent_paths(ctx)}
    return {os.path.realpath(named): str(image) for image in sorted(images)
            for named in qemu_img.named_files(image)}


def _repair_stray(ctx: Context, finding: Finding, users: dict[str, str]) -> None:
    path = Path(finding.path)
    user = users.get(os.path.realpath(path))
    if user is not None:
        finding.detail = f"{user} names it as its backing file, so it is kept"
        finding.fix = (f"repair or delete {user} first (see its finding), then: "
                       "waymark check --repair")
        return
    if OURS.match(path.name):
        durable.remove(path)
        finding.repaired = "removed"
        return
    lost = ctx.home / "lost+found"
    lost.mkdir(exist_ok=True)
    try:
        target = lost / "_".join(path.relative_to(ctx.home).parts)
    except ValueError:  # a shared checkpoint folder outside the home
        target = lost / path.name
    shutil.move(str(path), target)
    durable.fsync_dir(lost)
    finding.repaired = f"moved to {target}"


def _repair_config(session: Session, finding: Finding) -> None:
    checkpoint_id = Path(finding.path).stem
    row = session.get_one(Checkpoint, checkpoint_id)
    frozen = [{"disk_id": d, "image_id": i} for d, i in lookup.frozen(session, row.id).items()]
    description = {"checkpoint": row.id, "vm": row.vm_id, "configuration": row.config,
                   "frozen_images": frozen}
    Path(finding.path).parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(Path(finding.path),
                        json.dumps(description, indent=2, sort_keys=True).encode())
    finding.repaired = "rewritten from the catalog"


def _intent_findings(ctx: Context, vm_ids: set[str], names: dict[str, str]
                     ) -> list[Finding]:
    return [Finding(names.get(i.vm_id, i.vm_id), "unfinished-intent", f"intent {i.id}",
                    f"{i.kind} stopped at step {i.next_step} of {len(i.steps)}"
                    + (f": {i.error}" if i.error else ""),
                    "free what it needs (e.g. disk space), then: waymark check --repair")
            for i in ctx.journal.pending() if i.vm_id in vm_ids]


def run(ctx: Context, vm_id: str | None, *, repair: bool) -> list[Finding]:
    """Every finding (repaired ones say what was done). Holds each VM's lock while it looks;
    a VM whose lock a live command holds is skipped (look again when it is done)."""
    with ctx.catalog.session() as session:
        vms = [lookup.vm_by_id(session, vm_id)] if vm_id else list(session.scalars(select(Vm)))
        names = {v.id: v.name for v in vms}
    candidates = set(names)
    if vm_id is None and (ctx.home / "vms").is_dir():
        candidates |= {p.name for p in (ctx.home / "vms").iterdir()}
    held: dict[str, int] = {}
    try:
        for candidate in sorted(candidates):
            fd = locks.try_hold(ctx.home, candidate)
            if fd is not None:
                held[candidate] = fd
                if repair:
                    _finish_intents(ctx, candidate)
        found = _findings(ctx, set(held), names, repair)
        if vm_id is None:
            found += _templates(ctx, repair)
        if repair:
            _merge_uncompacted(ctx, found)
        return found
    finally:
        for fd in held.values():
            os.close(fd)


def _finish_intents(ctx: Context, vm_id: str) -> None:
    with contextlib.suppress(WaymarkError):  # reported as an unfinished intent, with its error
        settle.settle_vm(ctx, vm_id)


def _findings(ctx: Context, vm_ids: set[str], names: dict[str, str],
              repair: bool) -> list[Finding]:
    findings = _intent_findings(ctx, vm_ids, names)
    held: set[str] = set()  # the images of VMs whose QEMU runs
    with ctx.catalog.session() as session:
        for vm_row in session.scalars(select(Vm)):
            if vm_row.id in vm_ids:
                findings += _vm_findings(ctx, session, vm_row, held)
        findings += _stray_findings(ctx, session, vm_ids)
        if repair:
            _repair(ctx, session, findings, held)
    return findings


def _vm_findings(ctx: Context, session: Session, vm_row: Vm, held: set[str]) -> list[Finding]:
    """One VM's findings; adds its images to ``held`` when its QEMU runs."""
    images = lookup.images(session, vm_row.id)
    running = presence.find(presence.run_files(ctx, vm_row.id)) is not None
    in_use = _written_by_qemu(session, vm_row.id) if running else set()
    if running:
        held |= {image.path for image in images.values()}
    read = _read_images([image for image in images.values() if image.id not in in_use
                         and not image.pinned and Path(image.path).exists()])
    findings = [f for image in images.values()
                for f in _image_findings(vm_row.name, image, images,
                                         None if image.id in in_use else read)]
    findings += _config_findings(vm_row, lookup.checkpoints(session, vm_row.id))
    findings = _consolidation_findings(session, vm_row, findings)
    return findings + _compaction_findings(ctx, session, vm_row)


def _repair(ctx: Context, session: Session, findings: list[Finding], held: set[str]) -> None:
    """Repair what is safe; ``held``: the images of VMs whose QEMU runs (never touched)."""
    strays = any(f.kind == "stray-file" for f in findings)
    users = _backing_users(ctx, session, findings) if strays else {}
    for finding in findings:
        if finding.kind == "stray-file":
            _repair_stray(ctx, finding, users)
        elif finding.kind == "missing-config":
            _repair_config(session, finding)
        elif finding.kind == LEAKS and finding.path not in held:
            _repair_leaks(finding)
        elif finding.kind in consolidation.PROBLEMS:
            consolidation.repair(ctx.journal, finding.path)
            finding.repaired = "Now relinked onto its real chain; the consolidation forgotten"


def _repair_leaks(finding: Finding) -> None:
    try:
        left = qemu_img.repair_leaks(Path(finding.path), "qcow2")  # only qcow2 can leak
    except WaymarkError as err:
        finding.detail += f"; freeing them failed: {err.message}"
        return
    if left != qemu_img.CheckReport():
        finding.detail += (f"; after qemu-img check -r leaks: {left.leaks} leak(s), "
                           f"{left.corruptions} corruption(s) left")
        return
    finding.repaired = "leaked clusters freed (qemu-img check -r leaks)"


def _templates(ctx: Context, repair: bool) -> list[Finding]:
    """The templates' findings, under their lock (skipped while a template command holds
    it: a template being made has a folder and no row yet)."""
    if not (ctx.home / "templates").is_dir():
        return []
    try:
        with profiles.locked(ctx, timeout=0.0), ctx.catalog.session() as session:
            found = _template_findings(ctx, session)
            for finding in found:
                if repair and finding.kind == "stray-file":
                    shutil.rmtree(finding.path)
                    finding.repaired = "removed"
            return found
    except Busy:
        return []


def _template_findings(ctx: Context, session: Session) -> list[Finding]:
    """Every template's images are there and whole; every folder is a template's."""
    found = []
    folders = set()
    for row in session.scalars(select(Template)):
        folders.add(Path(row.folder).name)
        for disk in row.disks:
            path = Path(row.folder) / disk["file"]
            if not path.is_file():
                found.append(Finding(f"template {row.name}", "missing-file", str(path),
                                     "a template image is gone", "Restore the file, or delete "
                                     f"the template: waymark template delete {row.name}"))
            elif durable.sha256(path) != disk["sha256"]:
                found.append(Finding(f"template {row.name}", "image-error", str(path),
                                     "the template image does not match its sha256",
                                     "Restore the file, or make the template again"))
    root = ctx.home / "templates"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and folder.name not in folders:
            found.append(Finding("templates", "stray-file", str(folder),
                                 "a folder no template names (an interrupted template create)",
                                 "waymark check --repair removes it"))
    return found


def _consolidation_findings(session: Session, vm_row: Vm, findings: list[Finding]
                            ) -> list[Finding]:
    """``findings`` with the VM's consolidations known (:mod:`waymark.engine.consolidation`):
    an active image linked to its sound consolidation (its header names it) has no broken
    backing; a consolidation whose file or image is gone, or linked where it does not belong,
    is a finding repair falls back from (Now relinked onto its real chain)."""
    links = consolidation.links(session, vm_row.id)
    kept = [f for f in findings if not _linked(f, links)]
    return kept + [Finding(vm_row.name, p.kind, p.path, p.detail, "waymark check --repair "
                           "(relinks Now onto its real chain and forgets the consolidation; "
                           "the next consolidation builds a new one)")
                   for p in consolidation.problems(session, vm_row.id)]


def _linked(finding: Finding, links: dict[str, str]) -> bool:
    """Whether ``finding`` on an active image is its consolidation's doing: a backing file
    that is the consolidation it is linked to, or an unreadable chain because that
    consolidation's file is gone (its own finding says so, and repair relinks the image)."""
    backing = links.get(finding.path)
    if backing is None:
        return False
    if finding.kind == "broken-backing":
        return _names(finding.path, backing)
    return finding.kind == "image-error" and not Path(backing).is_file()


def _names(image: str, backing: str) -> bool:
    """Whether ``image``'s header names ``backing`` as its backing file."""
    try:
        header = qemu_img.header(Path(image))
    except WaymarkError:
        return False
    return (header.full_backing_filename or header.backing_filename) == backing


def _compaction_findings(ctx: Context, session: Session, vm_row: Vm) -> list[Finding]:
    left = compaction.pending_steps(session, vm_row.id)
    if not left or any(i.kind == compaction.MARKER for i in ctx.journal.pending(vm_row.id)):
        return []
    return [Finding(vm_row.name, "uncompacted", str(ctx.vm_folder(vm_row.id)),
                    f"{left} merge step(s) left undone (a merge job was cancelled)",
                    "waymark check --repair runs them (so does the next checkpoint delete)")]


def _merge_uncompacted(ctx: Context, findings: list[Finding]) -> None:
    with ctx.catalog.session() as session:
        names = {v.name: v.id for v in session.scalars(select(Vm))}
    for finding in findings:
        if finding.kind != "uncompacted" or finding.vm not in names:
            continue
        vm_id = names[finding.vm]
        with ctx.catalog.session() as session:
            compaction.mark(session, vm_id)
        try:
            settle.settle_vm(ctx, vm_id)
            finding.repaired = "merged"
        except WaymarkError as err:
            finding.detail += f"; merging failed: {err.message}"


def _written_by_qemu(session: Session, vm_id: str) -> set[str]:
    """The active images of a VM whose QEMU runs."""
    return {d.active_image_id for d in lookup.disks(session, vm_id).values()
            if d.active_image_id is not None}


def as_dicts(findings: list[Finding]) -> list[dict[str, str | None]]:
    return [asdict(f) for f in findings]
