"""A VM's hardware configuration: what a checkpoint records and apply restores.

Plain dataclasses (no pydantic): this is on every command's import path, and ``waymark
checkpoint list`` has a 300 ms budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Pinned, never an alias (q35, host): a saved memory state only restores on the machine it
# was taken on.
MACHINE = "pc-q35-7.2"
CPU_MODEL = "qemu64"

CHECKPOINT_TYPES = ("disabled", "production", "productiononly", "standard")


@dataclass
class Nic:
    """A virtio NIC: user-mode networking (optional host port forwards) or a host bridge."""

    mac: str
    kind: str = "user"  # user | bridge
    bridge: str | None = None
    forwards: list[str] = field(default_factory=list)  # hostfwd rules, e.g. tcp::2222-:22


@dataclass
class HardwareConfig:
    """Hardware of a VM. ``disks`` lists the attached disk ids, in bus order."""

    memory_mib: int
    cpus: int
    machine: str = MACHINE
    cpu_model: str = CPU_MODEL
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: list[str] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)

    @classmethod
    def load(cls, data: dict[str, Any]) -> HardwareConfig:
        fields = dict(data)
        fields["nics"] = [Nic(**nic) for nic in fields.get("nics", [])]
        fields["disks"] = list(fields.get("disks", []))
        return cls(**fields)

    def dump(self) -> dict[str, Any]:
        return asdict(self)
