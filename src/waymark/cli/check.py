"""``waymark check``: find (and with --repair fix) what the catalog and the files disagree on."""

from __future__ import annotations

import sys

import click

from waymark.cli.main import face
from waymark.cli.output import emit, json_option
from waymark.usecases import check as checking


@click.command("check")
@click.argument("vm_ref", metavar="[VM]", required=False)
@click.option("--repair", is_flag=True,
              help="Fix what is safe: finish or roll back interrupted operations, remove "
                   "unreferenced files Waymark made. Never deletes data anything needs.")
@json_option
def check(vm_ref: str | None, repair: bool, as_json: bool) -> None:
    """Compare the catalog, the image files and the journal. Exit 0 only when all is clean
    (notices, such as leaked clusters, leave it clean)."""
    findings = checking.run(face().ctx, face().vm_id(vm_ref) if vm_ref else None,
                            repair=repair)
    open_ = [f for f in findings if f.repaired is None and f.severity == checking.ERROR]
    notices = [f for f in findings if f.repaired is None and f.severity == checking.NOTICE]
    lines = []
    for f in findings:
        state = f"REPAIRED ({f.repaired})" if f.repaired else f.kind.upper()
        if f.severity == checking.NOTICE and not f.repaired:
            state += " (notice)"
        lines.append(f"{state}  [{f.vm}] {f.path}\n    {f.detail}")
        if not f.repaired:
            lines.append(f"    fix: {f.fix}")
    lines.append("All clean." if not open_ else f"{len(open_)} problem(s) left.")
    if notices:
        lines.append(f"{len(notices)} notice(s): nothing at risk, see above.")
    emit(as_json, {"clean": not open_, "findings": checking.as_dicts(findings)}, lines)
    if open_:
        sys.exit(1)
