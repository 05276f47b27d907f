"""The CPU models this host's QEMU offers (``qemu-system-x86_64 -cpu help``), cached.

Asked on ``vm create``/``vm set --cpu`` and at each start, never by a listing. The list is
cached in ``$WAYMARK_HOME/run/cpu-models.json`` per QEMU binary (its path, size and mtime), so an
upgraded QEMU is asked again; asking costs one short QEMU run (about 50 ms). Where no QEMU is
installed (a host that only manages images) nothing can be checked: :func:`offered` answers
None and the name's shape (:func:`waymark.model.hardware.check_cpu_model`) is all that holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from waymark import durable
from waymark.errors import Conflict, InvalidInput, ToolError
from waymark.model.hardware import DEFAULT_CPU_MODEL

QEMU = "qemu-system-x86_64"
CACHE = "cpu-models.json"
# models that run only on the host's own CPU: no TCG, and a memory state taken with them
# restores only on the same CPU
KVM_ONLY = ("host",)


def parse(help_text: str) -> frozenset[str]:
    """The model names of ``-cpu help``: its ``x86 NAME  description`` lines (the feature
    list after them is indented)."""
    return frozenset(line.split()[1] for line in help_text.splitlines()
                     if line.startswith("x86 ") and len(line.split()) > 1)


def _binary_key(path: str) -> str:
    stat = Path(path).stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def offered(cache_dir: Path, qemu: str = QEMU) -> frozenset[str] | None:
    """The CPU models ``qemu`` offers on this host; None where it is not installed."""
    binary = shutil.which(qemu)
    if binary is None:
        return None
    key, cache = _binary_key(binary), cache_dir / CACHE
    try:
        known = json.loads(cache.read_text())
        if known.get("qemu") == key:
            return frozenset(known["models"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        done = subprocess.run([binary, "-machine", "none", "-cpu", "help"], capture_output=True,
                              text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise ToolError(f"{qemu} -cpu help failed ({err}).",
                        hint="Check the QEMU installation (apt-get install qemu-system-x86).") \
            from err
    models = parse(done.stdout)
    cache_dir.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(cache, json.dumps({"qemu": key, "models": sorted(models)}).encode())
    return models


def _examples(models: frozenset[str]) -> str:
    named = [m for m in (DEFAULT_CPU_MODEL, "Skylake-Client", "EPYC", "qemu64", "max")
             if m in models]
    return ", ".join(named)


def check_offered(model: str, cache_dir: Path) -> str:
    """``model`` when this host's QEMU offers it (or no QEMU is installed to ask);
    InvalidInput naming some that it does offer otherwise."""
    models = offered(cache_dir)
    if models is not None and model not in models:
        raise InvalidInput(f"this host's QEMU has no CPU model {model!r}.",
                           hint=f"Choose one that qemu-system-x86_64 -cpu help lists, e.g. "
                                f"{_examples(models)}.")
    return model


def require(model: str, accelerator: str, cache_dir: Path, name: str) -> None:
    """Before a VM starts: its pinned model runs here, under ``accelerator``; otherwise a clear
    error (never QEMU's exit at start). A VM moved from a newer QEMU may name a model this one
    lacks."""
    try:
        check_offered(model, cache_dir)
    except InvalidInput as err:
        raise Conflict(f"VM {name!r} has the CPU model {model!r}, which this host's QEMU does "
                       "not offer.", hint=f"Give it one this QEMU has (with the VM off): "
                       f"waymark vm set {name} --cpu MODEL; {err.hint}") from err
    if model in KVM_ONLY and accelerator != "kvm":
        raise Conflict(f"VM {name!r} has the CPU model {model!r}, which runs only under KVM, "
                       f"and it would run under {accelerator}.",
                       hint=f"Choose a named model: waymark vm set {name} --cpu "
                            f"{DEFAULT_CPU_MODEL}, or --accel kvm on a host "
                            "where KVM works.")
