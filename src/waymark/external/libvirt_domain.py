"""A libvirt domain's XML (``virsh dumpxml``) read as a Waymark VM: pure mapping, no I/O.

The XML is untrusted input (a file someone hands over). It is read by expat with no DOCTYPE at
all (so no entity is ever declared, let alone expanded, and nothing external is fetched: libvirt
never writes one), at most :data:`MAX_XML` bytes, :data:`MAX_ELEMENTS` elements and
:data:`MAX_DEPTH` levels; every value that reaches the VM is then held to the checks of CLI
input (:mod:`waymark.model.hardware`, and ``vm create``'s own when the VM is made).

What is mapped, and the decisions taken (docs/libvirt.md says the same for users):

- every ``<disk type='file' device='disk'>`` (qcow2 or raw, virtio bus) in boot order;
  a CD-ROM or floppy drive is not carried (Waymark has no removable media yet);
- ``<memory>`` (``<currentMemory>``, the balloon's target, is not carried) and ``<vcpu>``;
- ``<cpu mode='custom'><model>``: that model; host-model and host-passthrough: Waymark's named
  default (:data:`~waymark.model.hardware.DEFAULT_CPU_MODEL`), since a memory state restores
  only on the model it was taken on;
- the machine: q35 or i440fx (``pc``) both become Waymark's q35 (virtio disks and NICs are PCI
  devices on either, so the guest finds its disks);
- UEFI (``<os firmware='efi'>`` or a pflash ``<loader>``) with its ``<nvram>`` file; Secure
  Boot's build when the loader is a Secure Boot one (``secure='yes'``, ``.ms``, ``.secboot``,
  ``.snakeoil``) or libvirt chose the firmware itself without turning the ``secure-boot``
  feature off (Debian's libvirt then picks the Microsoft-enrolled build first); the variables
  themselves come from the NVRAM file, so Secure Boot is enforced exactly when they enforce it;
- a TPM 2.0 emulated by swtpm, whose state libvirt keeps in
  ``/var/lib/libvirt/swtpm/<uuid>/tpm2/tpm2-00.permall``;
- NICs with their MACs: a bridge stays that bridge, libvirt's NAT network ``default`` becomes
  user-mode networking (NAT too), ``type='user'`` stays user-mode;
- a direct kernel boot (``<kernel>``, ``<initrd>``, ``<cmdline>``).

Anything else that changes what the guest is or may rely on is refused naming the element
(:func:`refused`), before anything is made; devices and settings that do not (a display, a
console, controllers, a balloon, ...) are listed as not carried (:class:`Skipped`).
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from xml.parsers import expat

from waymark.errors import InvalidInput, TooLarge
from waymark.model.hardware import DEFAULT_CPU_MODEL, Nic, check_bridge, check_cpu_model

MAX_XML = 1 << 20  # libvirt's domain XML is a few KiB; a 1 MiB one is no domain
MAX_ELEMENTS = 20_000
MAX_DEPTH = 32
MAX_CPUS = 64  # what vm create takes
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")  # where libvirt keeps <name>_VARS.fd
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")  # <uuid>/tpm2/tpm2-00.permall
TPM_STATE = Path("tpm2") / "tpm2-00.permall"
SECURE_LOADERS = (".ms.", ".secboot.", ".snakeoil.")
HINT = ("Remove it from the domain (virsh edit DOMAIN, or an edited copy of its XML) if the "
        "guest can do without it, then import again.")

# (units in libvirt's <memory unit=...>; KiB when none)
UNITS = {"b": 1, "bytes": 1, "KB": 10**3, "k": 1 << 10, "KiB": 1 << 10, "MB": 10**6,
         "M": 1 << 20, "MiB": 1 << 20, "GB": 10**9, "G": 1 << 30, "GiB": 1 << 30,
         "TB": 10**12, "T": 1 << 40, "TiB": 1 << 40}

# What is not carried, and why: harmless to the guest's data and boot.
IGNORED_DEVICES = {
    "graphics": "Waymark's console is the serial console (and the portal's)",
    "video": "the machine's own display adapter is used",
    "channel": "the guest agent's channel is Waymark's own",
    "controller": "Waymark's machine has its own controllers",
    "sound": "no sound device", "audio": "no sound device",
    "memballoon": "no memory balloon", "rng": "no virtio-rng device",
    "console": "the serial console is Waymark's own", "serial": "the serial console is "
    "Waymark's own", "parallel": "no parallel port", "input": "the machine's own keyboard "
    "and mouse", "emulator": "Waymark runs this host's qemu-system-x86_64",
    "watchdog": "no watchdog", "panic": "no panic notifier", "hub": "no USB hub",
    "redirdev": "no USB redirection", "smartcard": "no smartcard reader",
    "vsock": "no vsock device", "iommu": "no virtual IOMMU", "crypto": "no crypto device",
    "lease": "no lock manager lease",
}
REFUSED_DEVICES = {
    "hostdev": "a host device passed through",
    "filesystem": "a host folder shared with the guest (virtiofs, 9p)",
    "shmem": "memory shared with the host",
    "memory": "a memory device (DIMM, NVDIMM, virtio-mem)",
}
IGNORED_TOP = {
    "title": "", "description": "", "metadata": "", "on_poweroff": "", "on_reboot": "",
    "on_crash": "", "on_lockfailure": "", "seclabel": "Waymark confines QEMU its own way",
    "resource": "", "pm": "", "sysinfo": "no SMBIOS tables of its own", "genid": "",
    "clock": "the guest's clock is UTC", "features": "the machine's own (ACPI, APIC, SMM "
    "when Secure Boot needs it)", "iothreads": "", "iothreadids": "", "cputune": "",
    "memtune": "", "blkiotune": "", "numatune": "", "memoryBacking": "", "keywrap": "",
    "perf": "", "vcpus": "", "maxMemory": "no memory hotplug", "idmap": "",
}
HANDLED_TOP = {"name", "uuid", "memory", "currentMemory", "vcpu", "os", "cpu", "devices"}
NAMED = re.compile(r"[^\x00-\x1f]{1,4096}")  # a file path or name of sane length, no controls


@dataclass(frozen=True)
class Skipped:
    """An element of the domain the VM does not carry, and why."""

    element: str
    why: str


@dataclass(frozen=True)
class DomainDisk:
    """A file-backed disk: its path and the format libvirt opens it with."""

    path: Path
    fmt: str
    target: str


@dataclass
class Domain:
    """What a libvirt domain becomes. ``nvram``: the file libvirt keeps its UEFI variables in
    (None: BIOS, or a stateless loader); ``notes``: how something was mapped; ``not_carried``:
    what was left out."""

    name: str
    uuid: str | None
    memory: int  # bytes, a whole number of MiB
    cpus: int
    cpu_model: str | None  # None: Waymark's default
    machine: str
    firmware: str = "bios"
    nvram: Path | None = None
    tpm: bool = False
    disks: list[DomainDisk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    notes: list[str] = field(default_factory=list)
    not_carried: list[Skipped] = field(default_factory=list)

    def tpm_state(self, swtpm_dir: Path = SWTPM_DIR) -> Path | None:
        """Where libvirt keeps the TPM's state (None without a TPM, or without a uuid)."""
        if not self.tpm or self.uuid is None:
            return None
        return swtpm_dir / self.uuid / TPM_STATE


def refused(element: str, what: str, hint: str = HINT) -> InvalidInput:
    """The one refusal: names the element and says nothing was created."""
    return InvalidInput(f"the libvirt domain has {what} (<{element}>), which Waymark cannot "
                        "represent; nothing was created.", hint=hint)


# --- reading the XML --------------------------------------------------------------------------

def read(source: BinaryIO, where: str) -> bytes:
    """At most :data:`MAX_XML` bytes of ``source`` (a file or stdin); TooLarge past that."""
    data = source.read(MAX_XML + 1)
    if len(data) > MAX_XML:
        raise TooLarge(f"{where} holds more than {MAX_XML} bytes: it is no libvirt domain XML.",
                       hint="Give the output of virsh dumpxml DOMAIN.")
    return data


def parse_xml(data: bytes) -> ET.Element:
    """The element tree of ``data``, read by expat with a DOCTYPE refused (no entity is declared,
    expanded or fetched), its elements counted and its depth bounded."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    depth = [0, 0]  # current depth, elements seen

    def start(tag: str, attrs: dict[str, str]) -> None:
        depth[0] += 1
        depth[1] += 1
        if depth[0] > MAX_DEPTH or depth[1] > MAX_ELEMENTS:
            raise TooLarge(f"the XML nests deeper than {MAX_DEPTH} or holds more than "
                           f"{MAX_ELEMENTS} elements: it is no libvirt domain.",
                           hint="Give the output of virsh dumpxml DOMAIN.")
        builder.start(tag, attrs)

    def end(tag: str) -> None:
        depth[0] -= 1
        builder.end(tag)

    def doctype(*_: object) -> None:
        raise InvalidInput("the XML has a DOCTYPE (entity declarations); libvirt's never does, "
                           "and Waymark reads none.", hint="Give the output of virsh dumpxml "
                                                           "DOMAIN.")

    parser.StartDoctypeDeclHandler = doctype
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise InvalidInput(f"the libvirt domain is not well-formed XML: {err}.",
                           hint="Give the output of virsh dumpxml DOMAIN.") from err
    root = builder.close()
    if root.tag != "domain":
        raise InvalidInput(f"the XML's root element is <{root.tag}>, not a libvirt <domain>.",
                           hint="Give the output of virsh dumpxml DOMAIN.")
    return root


def parse(data: bytes) -> Domain:
    """``data`` (a domain's XML) as a :class:`Domain`; InvalidInput naming the first element
    Waymark cannot represent."""
    return _domain(parse_xml(data))


# --- the mapping ------------------------------------------------------------------------------

def _text(element: ET.Element | None, what: str) -> str:
    text = (element.text or "").strip() if element is not None else ""
    if not NAMED.fullmatch(text):
        raise InvalidInput(f"the libvirt domain's <{what}> is missing or not plain text.",
                           hint="Give the output of virsh dumpxml DOMAIN.")
    return text


def _path(value: str | None, element: str) -> Path:
    if value is None or not NAMED.fullmatch(value) or not value.startswith("/"):
        raise InvalidInput(f"the file of <{element}> ({value!r}) is not an absolute path.",
                           hint="libvirt names every file by its absolute path: give the "
                                "output of virsh dumpxml DOMAIN.")
    return Path(value)


def _domain(root: ET.Element) -> Domain:
    if root.get("type") not in ("kvm", "qemu"):
        raise refused("domain", f"the hypervisor type {root.get('type')!r}",
                      "Waymark imports QEMU/KVM domains (type='kvm' or 'qemu').")
    domain = Domain(name=_text(root.find("name"), "name"), uuid=_uuid(root.findtext("uuid")),
                    memory=_memory(root), cpus=_cpus(root), cpu_model=None, machine="")
    _partial(root, domain)
    for child in root:
        if child.tag in IGNORED_TOP:
            domain.not_carried.append(Skipped(child.tag, IGNORED_TOP[child.tag]))
        elif child.tag not in HANDLED_TOP:
            raise refused(child.tag, "a setting Waymark does not know")
    _cpu(root.find("cpu"), domain)
    _os(root.find("os"), domain)
    _devices(root.find("devices"), domain)
    return domain


def _uuid(text: str | None) -> str | None:
    """The domain's UUID in libvirt's form (it names the TPM state's folder), or None."""
    if text is None:
        return None
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError as err:
        raise InvalidInput(f"the domain's <uuid> {text!r} is not a UUID.",
                           hint="Give the output of virsh dumpxml DOMAIN.") from err


def _partial(root: ET.Element, domain: Domain) -> None:
    """Notes for a balloon below the memory and CPUs offline at boot: the VM has all of both."""
    current = root.find("currentMemory")
    if current is not None and _size(current, "currentMemory") < domain.memory:
        domain.notes.append(f"the balloon's target (<currentMemory>) is not carried: the VM "
                            f"has all its {domain.memory >> 20} MiB.")
    vcpu = root.find("vcpu")
    online = vcpu.get("current") if vcpu is not None else None
    if online is not None and online != str(domain.cpus):
        domain.notes.append(f"the VM has all {domain.cpus} CPUs online at boot, not "
                            f"<vcpu current='{online}'>.")


def _size(element: ET.Element, what: str) -> int:
    unit = element.get("unit", "KiB")
    text = (element.text or "").strip()
    if unit not in UNITS or not text.isdigit() or len(text) > 20:
        raise InvalidInput(f"the domain's <{what}> {text!r} {unit} is not a size.",
                           hint="Give the output of virsh dumpxml DOMAIN.")
    return int(text) * UNITS[unit]


def _memory(root: ET.Element) -> int:
    element = root.find("memory")
    if element is None:
        raise InvalidInput("the libvirt domain has no <memory>.",
                           hint="Give the output of virsh dumpxml DOMAIN.")
    size = _size(element, "memory")
    return -(-size // (1 << 20)) << 20  # whole MiB, rounded up


def _cpus(root: ET.Element) -> int:
    text = (root.findtext("vcpu") or "1").strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_CPUS:
        raise refused("vcpu", f"{text!r} virtual CPUs", f"Waymark gives a VM 1 to {MAX_CPUS}.")
    return int(text)


def _cpu(cpu: ET.Element | None, domain: Domain) -> None:
    if cpu is None:
        return
    numa = cpu.find("numa")
    if numa is not None and len(numa.findall("cell")) > 1:
        raise refused("cpu/numa", f"{len(numa.findall('cell'))} NUMA nodes",
                      "Waymark's VMs have one NUMA node: remove <numa> from <cpu>.")
    mode = cpu.get("mode", "custom")
    model = cpu.find("model")
    if mode == "custom" and model is not None:
        try:
            domain.cpu_model = check_cpu_model((model.text or "").strip())
        except InvalidInput as err:
            raise refused("cpu/model", f"the CPU model {model.text!r}", err.hint or HINT) from err
    elif mode in ("host-model", "host-passthrough", "maximum", "custom"):
        domain.notes.append(f"CPU mode {mode} becomes Waymark's named model "
                            f"{DEFAULT_CPU_MODEL}: a memory state restores only on the model "
                            "it was taken on (waymark vm set VM --cpu MODEL changes it).")
    else:
        raise refused("cpu", f"the CPU mode {mode!r}")
    for part in ("topology", "feature", "cache"):
        if cpu.find(part) is not None:
            domain.not_carried.append(Skipped(f"cpu/{part}", "a VM's CPUs are its model's, "
                                                             "one socket"))


def _os(os_: ET.Element | None, domain: Domain) -> None:
    if os_ is None:
        raise InvalidInput("the libvirt domain has no <os>.",
                           hint="Give the output of virsh dumpxml DOMAIN.")
    kind = os_.find("type")
    if kind is None or (kind.text or "").strip() != "hvm" or \
            kind.get("arch", "x86_64") != "x86_64":
        raise refused("os/type", "a guest that is not an x86_64 HVM guest",
                      "Waymark runs x86_64 guests (qemu-system-x86_64).")
    machine = kind.get("machine", "pc")
    domain.machine = machine
    if machine.startswith(("pc-i440fx", "pc-1.", "pc-0.")) or machine == "pc":
        domain.notes.append(f"the machine {machine} (i440fx) becomes Waymark's q35: the guest "
                            "sees a PCI Express chipset; its virtio disks and NICs are found as "
                            "before.")
    elif not (machine == "q35" or machine.startswith("pc-q35")):
        raise refused("os/type", f"the machine {machine!r}",
                      "Waymark's machine is q35 (pc-q35-7.2); domains on q35 or pc import.")
    for name, element in (("dtb", "os/dtb"), ("acpi", "os/acpi")):
        if os_.find(name) is not None:
            raise refused(element, f"a custom firmware table (<{name}>)")
    domain.kernel = _optional_path(os_, "kernel")
    domain.initrd = _optional_path(os_, "initrd")
    cmdline = os_.findtext("cmdline")
    domain.append = cmdline if cmdline else None
    _firmware(os_, domain)


def _optional_path(os_: ET.Element, name: str) -> str | None:
    text = os_.findtext(name)
    return str(_path(text.strip(), f"os/{name}")) if text and text.strip() else None


def _firmware(os_: ET.Element, domain: Domain) -> None:
    loader = os_.find("loader")
    if os_.get("firmware") != "efi" and loader is None:
        return
    if loader is not None and loader.get("type", "pflash") != "pflash":
        raise refused("os/loader", f"a {loader.get('type')} firmware loader",
                      "Waymark's UEFI firmware is a pflash one (OVMF).")
    if loader is not None and (loader.text or "").strip():
        name = Path((loader.text or "").strip()).name
        secure = loader.get("secure") == "yes" or any(s in name for s in SECURE_LOADERS)
        if not name.startswith("OVMF_CODE_4M."):
            domain.notes.append(f"the firmware {name} becomes this host's OVMF 4 MiB build "
                                "(Waymark's UEFI firmware; its variables must fit it).")
    else:  # libvirt chooses: the Secure Boot build first, unless the feature is off
        feature = os_.find("firmware/feature[@name='secure-boot']")
        secure = feature is None or feature.get("enabled") != "no"
    domain.firmware = "uefi-secure" if secure else "uefi"
    nvram = os_.find("nvram")
    if loader is not None and loader.get("stateless") == "yes":
        domain.notes.append("the stateless firmware gets a variable store of its own, made "
                            "from the firmware's template.")
        return
    source = nvram.find("source") if nvram is not None else None
    if source is not None:
        if nvram is not None and nvram.get("type", "file") != "file":
            raise refused("os/nvram", f"a {nvram.get('type')} NVRAM",
                          "Copy the variables into a file and name it with --nvram FILE.")
        domain.nvram = _path(source.get("file"), "os/nvram/source")
    elif nvram is not None and (nvram.text or "").strip():
        domain.nvram = _path((nvram.text or "").strip(), "os/nvram")
    else:
        domain.nvram = NVRAM_DIR / f"{domain.name}_VARS.fd"


def _devices(devices: ET.Element | None, domain: Domain) -> None:
    disks: list[tuple[int, int, DomainDisk]] = []
    for number, device in enumerate(devices if devices is not None else []):
        tag = device.tag
        if tag == "disk":
            found = _disk(device, domain)
            if found is not None:
                order = device.find("boot")
                rank = int(order.get("order", "0")) if order is not None and \
                    order.get("order", "").isdigit() else 1 << 30
                disks.append((rank, number, found))
        elif tag == "interface":
            domain.nics.append(_interface(device, domain))
        elif tag == "tpm":
            _tpm(device, domain)
        elif tag in IGNORED_DEVICES:
            domain.not_carried.append(Skipped(f"devices/{tag}", IGNORED_DEVICES[tag]))
        elif tag in REFUSED_DEVICES:
            raise refused(f"devices/{tag}", REFUSED_DEVICES[tag])
        else:
            raise refused(f"devices/{tag}", "a device Waymark does not know")
    domain.disks = [disk for _, _, disk in sorted(disks, key=lambda d: d[:2])]


def _disk(disk: ET.Element, domain: Domain) -> DomainDisk | None:
    device, kind = disk.get("device", "disk"), disk.get("type", "file")
    target = disk.find("target")
    dev = target.get("dev", "?") if target is not None else "?"
    where = f"disk {dev}"
    if device in ("cdrom", "floppy"):
        domain.not_carried.append(Skipped(f"devices/disk[@device='{device}'] {dev}",
                                          "Waymark has no removable media drive yet; the "
                                          "image file is not carried"))
        return None
    if device != "disk":
        raise refused("devices/disk", f"a {device} device ({where})",
                      "Waymark's disks are disk images; remove the device and import again.")
    if kind != "file":
        kinds = {"block": "a host block device", "network": "a network disk",
                "volume": "a storage pool volume", "dir": "a host folder as a disk"}
        raise refused("devices/disk", f"{kinds.get(kind, 'a ' + kind + ' disk')} ({where})",
                      "Waymark imports disks that are qcow2 or raw files; copy it into one "
                      "(qemu-img convert -O qcow2 ...) and point the domain at it, or give "
                      "its file (virsh vol-path) for a pool volume.")
    for part, what in (("encryption", "an encrypted disk (LUKS)"),
                       ("shareable", "a disk shared between VMs"),
                       ("source/slices", "a disk that is a slice of its file"),
                       ("mirror", "a disk in a block copy job (a running domain)")):
        if disk.find(part) is not None:
            raise refused(f"devices/disk/{part}", f"{what} ({where})")
    driver = disk.find("driver")
    fmt = driver.get("type", "raw") if driver is not None else "raw"
    if fmt not in ("qcow2", "raw"):
        raise refused("devices/disk/driver", f"a {fmt} disk ({where})",
                      "Convert it: qemu-img convert -O qcow2 FILE NEW.qcow2, and point the "
                      "domain at NEW.qcow2.")
    bus = (target.get("bus") if target is not None else None) or \
        ("virtio" if dev.startswith("vd") else "?")
    if bus != "virtio":
        raise refused("devices/disk/target", f"a disk on the {bus} bus ({where})",
                      "Waymark's disks are virtio-blk. A guest with virtio drivers (every "
                      "Linux; Windows with the virtio-win drivers installed) boots from one: "
                      "change the disk's bus to virtio in libvirt and import again.")
    if disk.find("readonly") is not None:
        domain.notes.append(f"the read-only {where} becomes writable (through its overlay or "
                            "copy: the file itself is never written).")
    source = disk.find("source")
    return DomainDisk(path=_path(source.get("file") if source is not None else None,
                                 "devices/disk/source"), fmt=fmt, target=dev)


NIC_KINDS = {"direct": "a macvtap NIC", "vhostuser": "a vhost-user NIC",
             "hostdev": "a host network device passed through", "vdpa": "a vDPA NIC"}


def _interface(interface: ET.Element, domain: Domain) -> Nic:
    kind = interface.get("type", "?")
    source = interface.find("source")
    mac_element = interface.find("mac")
    mac = (mac_element.get("address", "") if mac_element is not None else "").lower()
    if kind == "bridge":
        bridge = source.get("bridge") if source is not None else None
        try:
            nic = Nic(mac=mac, kind="bridge", bridge=check_bridge(bridge))
        except InvalidInput as err:
            raise refused("devices/interface/source", f"the bridge {bridge!r}",
                          err.hint or HINT) from err
    elif kind == "network" and source is not None and source.get("network") == "default":
        domain.notes.append("the NIC on libvirt's NAT network 'default' becomes user-mode "
                            "networking (NAT too; add host port forwards with --nic "
                            "user,hostfwd=...).")
        nic = Nic(mac=mac)
    elif kind == "user":
        nic = Nic(mac=mac)
    elif kind == "network":
        network = source.get("network") if source is not None else None
        raise refused("devices/interface", f"a NIC on the libvirt network {network!r}",
                      f"Waymark has user-mode networking and host bridges: change the NIC to "
                      f"type='bridge' with that network's bridge (virsh net-info {network}), "
                      "or remove it, then import again.")
    else:
        raise refused("devices/interface", NIC_KINDS.get(kind, f"a {kind} NIC"),
                      "Waymark's NICs are user-mode or on a host bridge.")
    model = interface.find("model")
    if model is not None and model.get("type", "virtio") != "virtio":
        domain.notes.append(f"the {model.get('type')} NIC ({mac}) becomes a virtio NIC.")
    try:
        nic.check()
    except InvalidInput as err:
        raise refused("devices/interface/mac", f"the MAC address {mac!r}",
                      err.hint or HINT) from err
    return nic


def _tpm(tpm: ET.Element, domain: Domain) -> None:
    backend = tpm.find("backend")
    if domain.tpm:
        raise refused("devices/tpm", "a second TPM", "Waymark's VMs have at most one TPM.")
    if backend is None or backend.get("type") != "emulator":
        kind = backend.get("type") if backend is not None else None
        raise refused("devices/tpm/backend", f"a {kind} TPM (the host's own TPM)"
                      if kind == "passthrough" else f"a {kind} TPM",
                      "Waymark's TPM is swtpm's (backend type='emulator').")
    if backend.get("version", "2.0") != "2.0":
        raise refused("devices/tpm/backend", f"a TPM {backend.get('version')}",
                      "Waymark's TPM is a TPM 2.0.")
    if backend.find("encryption") is not None:
        raise refused("devices/tpm/backend/encryption", "an encrypted TPM state",
                      "Waymark reads the TPM's state as swtpm keeps it unencrypted.")
    model = tpm.get("model", "tpm-crb")
    if model == "tpm-tis":
        domain.notes.append("the TPM's tpm-tis interface becomes CRB (tpm-crb); its state, "
                            "keys and NV indices are the same.")
    elif model != "tpm-crb":
        raise refused("devices/tpm", f"a {model} TPM", "Waymark's TPM is a tpm-crb one.")
    domain.tpm = True
