"""``waymark vm import-libvirt`` against domains defined by a real libvirt 9.0 (a private
``libvirtd`` this module starts: tests/libvirt_host.py), and against XML written by hand for what
libvirt would not define here: the XML libvirt writes (``virsh dumpxml``, defaults filled in)
becomes a VM whose disks are pinned bases (or copies), whose UEFI variable store is the domain's
NVRAM file and whose TPM state is libvirt's swtpm state, byte for byte; anything Waymark cannot
represent is refused naming it, with nothing created. (The guest test boots an imported UEFI+TPM
domain: tests/guest/test_libvirt_import.py.)"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, query
from tests.libvirt_host import OVMF, SWTPM_DIR, Libvirt, private_libvirtd, unique

MAC = "52:54:00:4a:11:01"


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    with private_libvirtd() as daemon:
        yield daemon


def qcow2(path: Path, size: str = "64M", backing: Path | None = None) -> Path:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run(["qemu-img", "create", "-f", "qcow2", *extra, str(path), size], check=True,
                   capture_output=True)
    return path


def domain_xml(name: str, devices: str, os_: str = "", memory: str = "256",
               machine: str = "q35", extra: str = "") -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>2</vcpu>
  <os {os_}><type arch='x86_64' machine='{machine}'>hvm</type>{extra}</os>
  <features><acpi/></features>
  <devices>{devices}</devices>
</domain>"""


def disk(path: Path, fmt: str = "qcow2", dev: str = "vda", bus: str = "virtio") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='{bus}'/></disk>")


def imported(wm: Waymark, xml: str, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = wm.run("vm", "import-libvirt", "-", *args, "--json",
                                    input=xml).ok().json()
    return result


def nothing_created(wm: Waymark) -> None:
    assert wm.json("vm", "list") == []
    assert query(wm.home, "select count(*) from images") == [(0,)]
    vms = wm.home / "vms"
    assert not vms.exists() or list(vms.iterdir()) == []


# --- a real libvirt's domains -----------------------------------------------------------------

def test_a_bios_domain_becomes_a_vm_with_its_disks_pinned_its_nics_macs_and_its_kernel(
        wm: Waymark, libvirt: Libvirt, tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    system = qcow2(tmp_path / "system.qcow2", backing=base)  # a disk with its own chain
    subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "d.raw"), "8M"],
                   check=True, capture_output=True)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k" * 512)
    initrd.write_bytes(b"i" * 512)
    name = unique("wm-bios")
    xml = libvirt.define(domain_xml(
        name, disk(system) + disk(tmp_path / "d.raw", "raw", "vdb")
        + f"<interface type='network'><source network='default'/><mac address='{MAC}'/>"
          "<model type='virtio'/></interface>"
          "<interface type='bridge'><source bridge='br0'/><mac address='52:54:00:4A:11:02'/>"
          "</interface><graphics type='vnc' port='-1'/><video><model type='vga'/></video>",
        machine="pc", extra=f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
                            "<cmdline>console=ttyS0 root=/dev/vda</cmdline>"))
    assert "pc-i440fx" in xml and "<cpu mode='custom'" in xml  # libvirt's defaults filled in
    vm = imported(wm, xml)
    assert (vm["name"], vm["memory_mib"], vm["cpus"], vm["firmware"], vm["tpm"]) == \
        (name, 256, 2, "bios", False)
    assert vm["cpu_model"] == "qemu64"  # the model libvirt gave the domain
    assert (vm["kernel"], vm["initrd"], vm["append"]) == \
        (str(kernel), str(initrd), "console=ttyS0 root=/dev/vda")
    assert [(d["base_image"], d["base_pinned"]) for d in vm["disks"]] == \
        [(str(system), True), (str(tmp_path / "d.raw"), True)]
    assert vm["disks"][0]["chain_depth"] == 3  # base, system (pinned chain), the overlay
    config = query(wm.home, "select config from vms")[0][0]
    assert '"mac": "52:54:00:4a:11:01", "kind": "user"' in config
    assert '"mac": "52:54:00:4a:11:02", "kind": "bridge", "bridge": "br0"' in config
    notes = " ".join(vm["libvirt"]["notes"])
    assert "i440fx" in notes and "'default' becomes user-mode" in notes
    skipped = [s["element"] for s in vm["libvirt"]["not_carried"]]
    assert {"devices/graphics", "devices/video", "devices/controller"} <= set(skipped)
    assert wm.json("check")["findings"] == []


def test_a_uefi_domain_with_a_tpm_keeps_its_own_variables_and_tpm_state_byte_for_byte(
        wm: Waymark, libvirt: Libvirt, tmp_path: Path) -> None:
    name = unique("wm-efi")
    xml = libvirt.define(domain_xml(
        name, disk(qcow2(tmp_path / "boot.qcow2"))
        + "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
        os_="firmware='efi'"))
    variables = tmp_path / "vars.fd"  # the domain's own: the template with a boot entry's bytes
    store = bytearray((OVMF / "OVMF_VARS_4M.ms.fd").read_bytes())
    store[0x30000:0x30010] = b"libvirt's own..."
    variables.write_bytes(bytes(store))
    libvirt.give_state(name, variables, tpm=True)
    permall = SWTPM_DIR / libvirt.uuid(name) / "tpm2" / "tpm2-00.permall"
    vm = imported(wm, xml, "--copy")
    assert (vm["firmware"], vm["tpm"]) == ("uefi-secure", True)  # libvirt's choice: Secure Boot
    assert content_sha256(vm["firmware_variables"]["active_image"]) == file_sha256(variables)
    ours = wm.home / "vms" / vm["id"] / "tpm" / "tpm2-00.permall"
    assert ours.read_bytes() == permall.read_bytes()
    assert not vm["disks"][0]["base_pinned"]  # --copy: a standalone copy
    assert wm.json("check")["findings"] == []


def test_a_domain_that_never_started_gets_the_firmwares_template_but_never_a_new_tpm(
        wm: Waymark, libvirt: Libvirt, tmp_path: Path) -> None:
    name = unique("wm-new")
    features = "<firmware><feature enabled='no' name='secure-boot'/></firmware>"
    plain = libvirt.define(domain_xml(name, disk(qcow2(tmp_path / "a.qcow2")),
                                      os_="firmware='efi'", extra=features))
    vm = imported(wm, plain)
    assert vm["firmware"] == "uefi"  # Secure Boot turned off in the domain
    assert content_sha256(vm["firmware_variables"]["active_image"]) == \
        file_sha256(OVMF / "OVMF_VARS_4M.fd")
    assert "never started" in " ".join(vm["libvirt"]["notes"])
    with_tpm = unique("wm-notpm")
    xml = libvirt.define(domain_xml(
        with_tpm, "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"))
    refused = wm.run("vm", "import-libvirt", "-", input=xml)
    assert refused.returncode == 3, refused
    assert f"{SWTPM_DIR / libvirt.uuid(with_tpm)}" in refused.stderr
    assert "lose every key" in refused.stderr
    assert [v["name"] for v in wm.json("vm", "list")] == [name]  # nothing more created


@pytest.mark.parametrize(("device", "element"), [
    ("<filesystem type='mount'><source dir='/tmp'/><target dir='share'/></filesystem>",
     "<devices/filesystem>"),
    ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
     "<source file='{boot}'/><target dev='sda' bus='sata'/></disk>", "<devices/disk/target>"),
    ("<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
     "<source dev='/dev/null'/><target dev='vdb' bus='virtio'/></disk>", "<devices/disk>"),
    ("<interface type='direct'><source dev='lo' mode='bridge'/></interface>",
     "<devices/interface>"),
    ("<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>",
     "<devices/tpm/backend>"),
])
def test_a_domain_with_what_waymark_cannot_represent_is_refused_naming_it_nothing_created(
        wm: Waymark, libvirt: Libvirt, tmp_path: Path, device: str, element: str) -> None:
    boot = qcow2(tmp_path / "boot.qcow2")
    xml = libvirt.define(domain_xml(unique("wm-no"), disk(boot) + device.format(boot=boot)))
    refused = wm.run("vm", "import-libvirt", "-", input=xml)
    assert refused.returncode == 2, refused
    assert element in refused.stderr and "nothing was created" in refused.stderr
    nothing_created(wm)


# --- XML written by hand: what libvirt would not define here ------------------------------------

def test_two_numa_nodes_and_a_hostdev_are_refused_naming_them(wm: Waymark,
                                                              tmp_path: Path) -> None:
    numa = domain_xml("numa", "").replace(
        "<features>", "<cpu><numa><cell id='0' cpus='0' memory='128' unit='MiB'/>"
                      "<cell id='1' cpus='1' memory='128' unit='MiB'/></numa></cpu><features>")
    hostdev = domain_xml("hostdev", "<hostdev mode='subsystem' type='pci'><source>"
                                    "<address bus='0x01' slot='0x00'/></source></hostdev>")
    for xml, element in ((numa, "<cpu/numa>"), (hostdev, "<devices/hostdev>")):
        refused = wm.run("vm", "import-libvirt", "-", input=xml)
        assert refused.returncode == 2 and element in refused.stderr, refused
    nothing_created(wm)


def test_a_raw_disk_whose_file_is_qcow2_is_refused(wm: Waymark, tmp_path: Path) -> None:
    """A raw disk's content is the guest's: one that looks like a qcow2 header (which could
    name any host file as its backing file) is never opened as qcow2."""
    sneaky = qcow2(tmp_path / "sneaky.img", backing=qcow2(tmp_path / "host-secret.qcow2"))
    refused = wm.run("vm", "import-libvirt", "-", input=domain_xml("raw", disk(sneaky, "raw")))
    assert refused.returncode == 8, refused
    assert "declared raw but its file is qcow2" in refused.stderr
    nothing_created(wm)


def test_an_nvram_that_is_not_this_firmwares_size_is_refused(wm: Waymark, tmp_path: Path) -> None:
    """A 2 MiB build's 128 KiB variables do not fit the 4 MiB build's flash."""
    small = tmp_path / "small_VARS.fd"
    small.write_bytes((OVMF / "OVMF_VARS.fd").read_bytes())
    xml = domain_xml("small", "", extra=(
        f"<loader readonly='yes' type='pflash'>{OVMF / 'OVMF_CODE.fd'}</loader>"
        f"<nvram>{small}</nvram>"))
    refused = wm.run("vm", "import-libvirt", "-", input=xml)
    assert refused.returncode == 8, refused
    assert "131072-byte raw file" in refused.stderr and "540672" in refused.stderr
    nothing_created(wm)


def test_the_xml_is_read_as_untrusted_input(wm: Waymark, tmp_path: Path) -> None:
    laughs = ('<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa">'
              '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><domain type="kvm">'
              "<name>&b;</name></domain>")
    refused = wm.run("vm", "import-libvirt", "-", input=laughs)
    assert refused.returncode == 2 and "DOCTYPE" in refused.stderr, refused
    big = tmp_path / "big.xml"
    big.write_text(domain_xml("big", "<!--" + "x" * (1 << 20) + "-->"))
    refused = wm.run("vm", "import-libvirt", str(big))
    assert refused.returncode == 2 and "more than 1048576 bytes" in refused.stderr, refused
    missing = wm.run("vm", "import-libvirt", str(tmp_path / "none.xml"))
    assert missing.returncode == 3 and "none.xml" in missing.stderr, missing
    nothing_created(wm)


def test_a_domain_name_waymark_refuses_asks_for_name(wm: Waymark, tmp_path: Path) -> None:
    xml = domain_xml("bad/name", "")
    refused = wm.run("vm", "import-libvirt", "-", input=xml)
    assert refused.returncode == 2 and "--name" in refused.stderr, refused
    assert imported(wm, xml, "--name", "good")["name"] == "good"


def test_a_domain_still_running_is_refused(wm: Waymark, tmp_path: Path) -> None:
    """A QEMU that holds a disk open for writing (qemu-io here, as a running domain's QEMU)."""
    held = qcow2(tmp_path / "held.qcow2")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(held)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # qemu-io has the image open once it waits for a command
        refused = wm.run("vm", "import-libvirt", "-", input=domain_xml("running", disk(held)))
    finally:
        holder.communicate(b"quit\n", timeout=10)
    assert refused.returncode == 5, refused
    assert "in use by a running QEMU" in refused.stderr and "virsh shutdown" in refused.stderr
    nothing_created(wm)
    assert imported(wm, domain_xml("running", disk(held)))["name"] == "running"  # once shut down


def test_state_kept_elsewhere_is_named_with_nvram_and_tpm_state(wm: Waymark,
                                                                tmp_path: Path) -> None:
    """A session libvirt's files, or files handed over with the XML."""
    tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
    xml = domain_xml("handed", tpm, os_="firmware='efi'").replace(
        "<name>", "<uuid>9172370c-4de9-4adb-9870-b729d672455f</uuid><name>")
    variables = tmp_path / "handed_VARS.fd"
    variables.write_bytes((OVMF / "OVMF_VARS_4M.fd").read_bytes()[::-1])  # not the template
    state = tmp_path / "tpm2-00.permall"
    state.write_bytes(b"a TPM state, as swtpm keeps it")
    no_tpm = domain_xml("plain", "")
    refused = wm.run("vm", "import-libvirt", "-", "--tpm-state", str(state), input=no_tpm)
    assert refused.returncode == 2 and "no TPM" in refused.stderr, refused
    missing = wm.run("vm", "import-libvirt", "-", "--nvram", str(tmp_path / "gone.fd"),
                     "--tpm-state", str(state), input=xml)
    assert missing.returncode == 3 and "gone.fd does not exist" in missing.stderr, missing
    nothing_created(wm)
    vm = imported(wm, xml, "--nvram", str(variables), "--tpm-state", str(state))
    assert content_sha256(vm["firmware_variables"]["active_image"]) == file_sha256(variables)
    assert (wm.home / "vms" / vm["id"] / "tpm" / "tpm2-00.permall").read_bytes() == \
        state.read_bytes()
