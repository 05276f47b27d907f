"""The libvirt domain XML mapping (waymark.external.libvirt_domain): pure code, no files read."""

from __future__ import annotations

from pathlib import Path

import pytest

from waymark.errors import InvalidInput, TooLarge
from waymark.external.libvirt_domain import MAX_XML, NVRAM_DIR, Domain, parse, read
from waymark.model.hardware import DEFAULT_CPU_MODEL

UUID = "9172370c-4de9-4adb-9870-b729d672455f"


def xml(devices: str = "", os_: str = "", os_body: str = "", top: str = "",
        machine: str = "pc-q35-7.2", memory: str = "<memory unit='KiB'>262144</memory>") -> bytes:
    return f"""<domain type='kvm'>
  <name>dom</name><uuid>{UUID}</uuid>{memory}<vcpu placement='static'>2</vcpu>
  <os {os_}><type arch='x86_64' machine='{machine}'>hvm</type>{os_body}</os>{top}
  <devices>{devices}</devices>
</domain>""".encode()


def refused(data: bytes) -> str:
    with pytest.raises(InvalidInput) as err:
        parse(data)
    return err.value.message


def notes(domain: Domain) -> str:
    return " ".join(domain.notes)


@pytest.mark.parametrize(("memory", "mib"), [
    ("<memory unit='KiB'>262144</memory>", 256), ("<memory>524288</memory>", 512),
    ("<memory unit='GiB'>2</memory>", 2048), ("<memory unit='b'>1048577</memory>", 2),
    ("<memory unit='MB'>1000</memory>", 954)])
def test_memory_in_any_libvirt_unit_becomes_whole_mib_rounded_up(memory: str, mib: int) -> None:
    assert parse(xml(memory=memory)).memory == mib << 20


@pytest.mark.parametrize("memory", ["<memory unit='parsec'>1</memory>",
                                    "<memory unit='KiB'>-5</memory>", ""])
def test_a_memory_that_is_no_size_is_refused(memory: str) -> None:
    assert "memory" in refused(xml(memory=memory))


def test_cpus_and_a_custom_cpu_model_are_kept_host_models_become_the_named_default() -> None:
    domain = parse(xml(top="<cpu mode='custom' match='exact'><model fallback='forbid'>"
                           "Skylake-Client</model><topology sockets='1' cores='2' "
                           "threads='1'/></cpu>"))
    assert (domain.cpus, domain.cpu_model) == (2, "Skylake-Client")
    assert "cpu/topology" in [s.element for s in domain.not_carried]
    for mode in ("host-model", "host-passthrough"):
        domain = parse(xml(top=f"<cpu mode='{mode}'/>"))
        assert domain.cpu_model is None and DEFAULT_CPU_MODEL in notes(domain)
    assert "<cpu/model>" in refused(xml(top="<cpu mode='custom'><model>a,b=c</model></cpu>"))
    assert "<vcpu>" in refused(xml().replace(b">2</vcpu>", b">65</vcpu>"))


def test_one_numa_node_is_fine_two_are_refused() -> None:
    cell = "<cell id='{0}' cpus='{0}' memory='128' unit='MiB'/>"
    parse(xml(top=f"<cpu><numa>{cell.format(0)}</numa></cpu>"))
    assert "2 NUMA nodes (<cpu/numa>)" in refused(
        xml(top=f"<cpu><numa>{cell.format(0)}{cell.format(1)}</numa></cpu>"))


def test_q35_and_i440fx_machines_import_others_are_refused() -> None:
    assert parse(xml(machine="q35")).notes == []
    assert "i440fx" in notes(parse(xml(machine="pc-i440fx-7.2")))
    assert "microvm" in refused(xml(machine="microvm"))
    assert "x86_64" in refused(xml().replace(b"arch='x86_64'", b"arch='aarch64'"))


@pytest.mark.parametrize(("os_", "body", "firmware"), [
    ("", "", "bios"),
    ("firmware='efi'", "", "uefi-secure"),  # libvirt picks the enrolled Secure Boot build
    ("firmware='efi'", "<firmware><feature enabled='no' name='secure-boot'/></firmware>", "uefi"),
    ("", "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
         "<nvram>/x/d_VARS.fd</nvram>", "uefi"),
    ("", "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>",
     "uefi-secure"),
    ("", "<loader readonly='yes' secure='yes' type='pflash'>/o/CODE.fd</loader>", "uefi-secure"),
])
def test_the_firmware_and_secure_boot(os_: str, body: str, firmware: str) -> None:
    assert parse(xml(os_=os_, os_body=body)).firmware == firmware


def test_a_firmware_other_than_ovmfs_4_mib_build_is_named_in_a_note() -> None:
    ovmf = "<loader type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>"
    assert parse(xml(os_body=ovmf)).notes == []
    other = parse(xml(os_body="<loader type='pflash'>/opt/fw/CODE.fd</loader>"))
    assert "CODE.fd becomes this host's OVMF" in notes(other)


def test_the_nvram_is_the_domains_own_file_or_where_libvirt_keeps_it() -> None:
    assert parse(xml()).nvram is None
    assert parse(xml(os_="firmware='efi'")).nvram == NVRAM_DIR / "dom_VARS.fd"
    given = "<loader type='pflash'>/o/CODE.fd</loader><nvram template='/t'>/v/mine.fd</nvram>"
    assert parse(xml(os_body=given)).nvram == Path("/v/mine.fd")
    source = "<loader type='pflash'>/o/C.fd</loader><nvram type='file'><source file='/v/s.fd'/>" \
             "</nvram>"
    assert parse(xml(os_body=source)).nvram == Path("/v/s.fd")
    assert "os/nvram" in refused(xml(os_body="<loader type='pflash'>/o/C.fd</loader><nvram "
                                             "type='network'><source protocol='nbd'/></nvram>"))
    assert "<os/loader>" in refused(xml(os_body="<loader type='rom'>/o/bios.bin</loader>"))
    assert "not an absolute path" in refused(xml(os_body="<loader type='pflash'>/o/C.fd</loader>"
                                                         "<nvram>relative.fd</nvram>"))


def test_a_tpm_2_emulator_is_kept_and_its_state_is_libvirts() -> None:
    tpm = "<tpm model='{}'><backend type='emulator' version='{}'/></tpm>"
    domain = parse(xml(tpm.format("tpm-crb", "2.0")))
    assert domain.tpm and domain.tpm_state() == Path(
        f"/var/lib/libvirt/swtpm/{UUID}/tpm2/tpm2-00.permall")
    assert "CRB" in notes(parse(xml(tpm.format("tpm-tis", "2.0"))))
    assert "TPM 1.2" in refused(xml(tpm.format("tpm-tis", "1.2")))
    assert "passthrough TPM" in refused(xml("<tpm model='tpm-tis'><backend type='passthrough'>"
                                            "<device path='/dev/tpm0'/></backend></tpm>"))
    assert "encrypted TPM state" in refused(xml(
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><encryption secret='x'/>"
        "</backend></tpm>"))
    assert "second TPM" in refused(xml(tpm.format("tpm-crb", "2.0") * 2))


DISK = ("<disk type='{kind}' device='{device}'><driver name='qemu' type='{fmt}'/>"
        "<source file='/d/{name}'/><target dev='{dev}' bus='{bus}'/>{extra}</disk>")


def disk(name: str = "a.qcow2", kind: str = "file", device: str = "disk", fmt: str = "qcow2",
         dev: str = "vda", bus: str = "virtio", extra: str = "") -> str:
    return DISK.format(kind=kind, device=device, fmt=fmt, name=name, dev=dev, bus=bus,
                       extra=extra)


def test_disks_in_boot_order_cdroms_not_carried() -> None:
    domain = parse(xml(disk("a.qcow2") + disk("b.raw", fmt="raw", dev="vdb",
                                              extra="<boot order='1'/>")
                       + disk("c.iso", device="cdrom", fmt="raw", dev="sda", bus="sata")))
    assert [(d.path.name, d.fmt) for d in domain.disks] == [("b.raw", "raw"), ("a.qcow2", "qcow2")]
    assert any("cdrom" in s.element for s in domain.not_carried)


@pytest.mark.parametrize(("device", "said"), [
    (disk(kind="block"), "a host block device"),
    (disk(kind="network"), "a network disk"),
    (disk(kind="volume"), "a storage pool volume"),
    (disk(fmt="vmdk"), "a vmdk disk"),
    (disk(bus="sata", dev="sda"), "the sata bus"),
    (disk(bus="scsi", dev="sda"), "the scsi bus"),
    (disk(extra="<encryption format='luks'/>"), "encrypted disk (LUKS)"),
    (disk(extra="<shareable/>"), "shared between VMs"),
    (disk(device="lun"), "a lun device"),
    ("<hostdev mode='subsystem' type='pci'/>", "host device passed through"),
    ("<interface type='vhostuser'/>", "vhost-user NIC"),
    ("<interface type='network'><source network='lan'/></interface>", "network 'lan'"),
    ("<interface type='bridge'><source bridge='br0;rm'/></interface>", "the bridge 'br0;rm'"),
    ("<interface type='user'><mac address='zz:54:00:00:00:01'/></interface>", "MAC address"),
    ("<filesystem type='mount'/>", "host folder shared"),
    ("<teleporter/>", "a device Waymark does not know"),
])
def test_what_waymark_cannot_represent_is_refused_naming_it(device: str, said: str) -> None:
    message = refused(xml(device))
    assert said in message and "nothing was created" in message


def test_unknown_top_level_settings_are_refused_harmless_ones_listed_as_not_carried() -> None:
    qemu = "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'/>"
    assert "<qemu:commandline>" in refused(xml(top=qemu))
    assert "<launchSecurity>" in refused(xml(top="<launchSecurity type='sev'/>"))
    domain = parse(xml("<graphics type='spice'/><video/><channel type='unix'/><rng/>"
                       "<serial type='pty'/><console type='pty'/><memballoon model='virtio'/>",
                       top="<clock offset='utc'/><on_crash>destroy</on_crash>"))
    skipped = {s.element for s in domain.not_carried}
    assert {"clock", "on_crash", "devices/graphics", "devices/video", "devices/channel",
            "devices/rng", "devices/serial", "devices/console", "devices/memballoon"} <= skipped


def test_nics_keep_their_macs() -> None:
    domain = parse(xml("<interface type='bridge'><mac address='52:54:00:AA:00:01'/>"
                       "<source bridge='br0'/><model type='e1000'/></interface>"
                       "<interface type='network'><mac address='52:54:00:aa:00:02'/>"
                       "<source network='default'/></interface>"
                       "<interface type='user'><mac address='52:54:00:aa:00:03'/></interface>"))
    assert [(n.kind, n.bridge, n.mac) for n in domain.nics] == [
        ("bridge", "br0", "52:54:00:aa:00:01"), ("user", None, "52:54:00:aa:00:02"),
        ("user", None, "52:54:00:aa:00:03")]
    assert "e1000" in notes(domain) and "'default' becomes user-mode" in notes(domain)


def test_a_direct_kernel_boot_is_kept() -> None:
    domain = parse(xml(os_body="<kernel>/b/vmlinuz</kernel><initrd>/b/initrd</initrd>"
                               "<cmdline>console=ttyS0</cmdline>"))
    assert (domain.kernel, domain.initrd, domain.append) == ("/b/vmlinuz", "/b/initrd",
                                                             "console=ttyS0")
    assert "os/kernel" in refused(xml(os_body="<kernel>vmlinuz</kernel>"))


def test_the_xml_is_parsed_as_untrusted_input() -> None:
    entity = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
              b"<domain type='kvm'><name>&e;</name></domain>")
    assert "DOCTYPE" in refused(entity)
    assert "not well-formed" in refused(b"<domain type='kvm'><name>x</domain>")
    assert "not well-formed" in refused(b"<domain type='kvm'><name>&undefined;</name></domain>")
    assert "<network>" in refused(b"<network/>")
    with pytest.raises(TooLarge):
        parse(b"<domain>" + b"<a>" * 40 + b"</a>" * 40 + b"</domain>")
    with pytest.raises(TooLarge):
        parse(b"<domain>" + b"<a/>" * 30_000 + b"</domain>")
    assert "hypervisor type 'xen'" in refused(xml().replace(b"type='kvm'", b"type='xen'"))


def test_read_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.xml"
    big.write_bytes(b" " * (MAX_XML + 1))
    with big.open("rb") as file, pytest.raises(TooLarge):
        read(file, str(big))
    big.write_bytes(b" " * MAX_XML)
    with big.open("rb") as file:
        assert len(read(file, str(big))) == MAX_XML


def test_a_balloon_and_offline_cpus_are_noted_a_uuid_is_checked() -> None:
    domain = parse(xml(memory="<memory unit='MiB'>512</memory><currentMemory unit='MiB'>256"
                              "</currentMemory>").replace(b"placement='static'",
                                                          b"current='1'"))
    assert "all its 512 MiB" in notes(domain) and "all 2 CPUs online" in notes(domain)
    assert parse(xml().replace(UUID.encode(), UUID.upper().encode())).uuid == UUID
    assert "not a UUID" in refused(xml().replace(UUID.encode(), b"../../etc"))
