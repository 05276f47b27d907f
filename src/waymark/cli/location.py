"""``waymark location``: folders registered under a name for API users
(:mod:`waymark.usecases.access.locations`)."""

from __future__ import annotations

from pathlib import Path

import click

from waymark.cli.main import face
from waymark.cli.output import emit, json_option
from waymark.usecases.access import locations


@click.group()
def location() -> None:
    """Named folders (backup repositories, export folders, libraries, ISOs) for API users."""


@location.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(locations.KINDS), required=True)
@json_option
def location_add(name: str, path: Path, kind: str, as_json: bool) -> None:
    """Register a folder under NAME."""
    made = locations.add(face().ctx, name, kind, path)
    emit(as_json, made, [f"Registered {made['kind']} {made['name']} = {made['path']}."])


@location.command("remove")
@click.argument("name")
@json_option
def location_remove(name: str, as_json: bool) -> None:
    """Forget a name (the folder and its content stay)."""
    emit(as_json, locations.remove(face().ctx, name),
         [f"Removed location {name}; the folder was not touched."])


@location.command("list")
@json_option
def location_list(as_json: bool) -> None:
    rows = locations.listing(face().ctx)
    emit(as_json, rows, [f"{r['name']:<20} {r['kind']:<11} {r['path']}" for r in rows]
         or ["No locations. Register one: waymark location add NAME PATH --kind repository"])
