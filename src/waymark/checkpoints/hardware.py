"""A VM's hardware configuration: what a checkpoint records and apply restores."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# Pinned, never an alias (q35, host): a saved memory state only restores on the machine it
# was taken on (a later issue runs these; they are stored from the start).
MACHINE = "pc-q35-7.2"
CPU_MODEL = "qemu64"

CHECKPOINT_TYPES = ("disabled", "production", "productiononly", "standard")


class Nic(BaseModel):
    """A virtio NIC: user-mode networking (optional host port forwards) or a host bridge."""

    kind: str = "user"  # user | bridge
    bridge: str | None = None
    mac: str
    forwards: list[str] = Field(default_factory=list)  # hostfwd rules, e.g. tcp::2222-:22


class HardwareConfig(BaseModel):
    """Hardware of a VM. ``disks`` lists the attached disk ids, in bus order."""

    memory_mib: int = Field(ge=16)
    cpus: int = Field(ge=1, le=64)
    machine: str = MACHINE
    cpu_model: str = CPU_MODEL
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: list[str] = Field(default_factory=list)
    nics: list[Nic] = Field(default_factory=list)

    @classmethod
    def load(cls, data: dict[str, Any]) -> HardwareConfig:
        return cls.model_validate(data)

    def dump(self) -> dict[str, Any]:
        return self.model_dump()
