"""Where a VM's settings come from, after VMM's hardware profiles and templates (pure code).

At ``vm create`` each setting is taken from the first layer that has it: the VM's own options,
then the hardware profile (the one named on the command line, else the template's), then the
template, then Waymark's default. The values are *copied* into the VM with their source, so a
later change to a profile or template changes no existing VM; ``vm set`` makes a setting the
VM's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = {"checkpoint_type": "production", "memory_mib": 512, "cpus": 1,
                            "max_checkpoints": 50, "automatic_checkpoints": False}
KEYS = tuple(DEFAULTS)
Layer = tuple[str, Mapping[str, Any]]  # (source, its settings; None = not set there)


def resolve(explicit: Mapping[str, Any], profile: Layer | None = None,
            template: Layer | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The effective settings and, per setting, where it came from (``vm``, ``profile P``,
    ``template T`` or ``default``)."""
    layers = [("vm", explicit), *(layer for layer in (profile, template) if layer),
              ("default", DEFAULTS)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        source, value = next((s, found[key]) for s, found in layers
                             if found.get(key) is not None)
        values[key], sources[key] = value, source
    return values, sources
