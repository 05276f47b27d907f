"""The test guest's boot disk layout (waymark.testguest.disk): the GPT it writes, read back the
way firmware reads it (CRCs, both copies, protective MBR), and GRUB's two patched sector numbers.
The boot disk really booting under SeaBIOS and OVMF: tests/guest/test_guest_images.py."""

from __future__ import annotations

import struct
import uuid
import zlib

import pytest

from waymark.testguest import disk, media

MIB = disk.MIB
DISK_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


def test_partitions_start_on_mib_boundaries_in_order_without_overlap() -> None:
    layout = disk.boot_layout(esp_size=30 * MIB + 1, data_size=256 * MIB)
    bios, esp, data = layout.partitions
    assert (bios.type, esp.type, data.type) == (disk.BIOS_BOOT, disk.EFI_SYSTEM, disk.LINUX_DATA)
    assert bios.start == 2048 and bios.size == 2048  # 1 MiB at 1 MiB
    assert esp.start == bios.end and esp.size == 31 * 2048  # rounded up to whole MiB
    assert data.start == esp.end and data.size == 256 * 2048
    assert all(p.start % 2048 == 0 for p in layout.partitions)
    assert layout.sectors == data.end + 2048  # a MiB for the backup GPT
    assert layout.size == layout.sectors * 512
    assert data.offset == data.start * 512
    assert layout.partition(disk.LINUX_DATA) is data


def _header(sector: bytes) -> dict[str, int | bytes]:
    fields = struct.unpack_from("<8sIIIIQQQQ16sQIII", sector)
    names = ("signature", "revision", "size", "crc", "reserved", "here", "other", "first",
             "last", "disk_id", "entries", "count", "entry_size", "array_crc")
    return dict(zip(names, fields, strict=True))


def test_gpt_reads_back_with_valid_checksums_in_both_copies() -> None:
    layout = disk.boot_layout(esp_size=20 * MIB, data_size=8 * MIB)
    head, tail = disk.gpt(layout, DISK_ID)
    assert len(head) == 34 * 512 and len(tail) == 33 * 512
    primary, backup = _header(head[512:1024]), _header(tail[-512:])
    last = layout.sectors - 1
    for header, here, other, entries in ((primary, 1, last, 2), (backup, last, 1, last - 32)):
        assert header["signature"] == b"EFI PART" and header["revision"] == 0x10000
        assert (header["here"], header["other"], header["entries"]) == (here, other, entries)
        assert (header["first"], header["last"]) == (34, last - 33)
        assert header["disk_id"] == DISK_ID.bytes_le
        assert (header["count"], header["entry_size"]) == (128, 128)
        raw = bytearray(head[512:512 + 92] if here == 1 else tail[-512:][:92])
        raw[16:20] = bytes(4)
        assert header["crc"] == zlib.crc32(raw)
    array = head[1024:]
    assert array == tail[:-512]
    assert primary["array_crc"] == zlib.crc32(array)

    entries = [struct.unpack_from("<16s16sQQQ72s", array, 128 * i) for i in range(4)]
    for (type_, unique, first, last_lba, _attrs, name), part in zip(
            entries, layout.partitions, strict=False):
        assert uuid.UUID(bytes_le=type_) == part.type
        assert uuid.UUID(bytes_le=unique) == uuid.uuid5(DISK_ID, part.name)
        assert (first, last_lba) == (part.start, part.end - 1)
        assert name.decode("utf-16-le").rstrip("\0") == part.name
    assert entries[3][0] == bytes(16)  # unused entries are zero


def test_protective_mbr_covers_the_disk() -> None:
    layout = disk.boot_layout(esp_size=MIB, data_size=MIB)
    mbr = disk.gpt(layout, DISK_ID)[0][:512]
    status, _chs, kind, _end, first, count = struct.unpack_from("<B3sB3sII", mbr, 0x1BE)
    assert (status, kind, first, count) == (0, 0xEE, 1, layout.sectors - 1)
    assert mbr[0x1CE:0x1FE] == bytes(48) and mbr[510:] == b"\x55\xaa"


def test_grub_boot_code_points_at_core_img_and_keeps_the_partition_table() -> None:
    boot_img = bytes(range(256)) * 2
    core_img = b"\x01" * 512 * 3
    mbr = bytes(0x1B8) + b"SIGN" + bytes(2) + b"\xee" * 64 + b"\x55\xaa"
    boot, core = disk.bios_boot_code(boot_img, core_img, mbr, core_sector=2048)
    assert struct.unpack_from("<Q", boot, 0x5C)[0] == 2048
    assert boot[:0x5C] == boot_img[:0x5C] and boot[0x64:440] == boot_img[0x64:440]
    assert boot[440:] == mbr[440:]  # disk signature, partition table, 0x55AA
    assert struct.unpack_from("<Q", core, 500)[0] == 2049  # diskboot loads the rest from there
    assert core[:500] == core_img[:500] and core[508:] == core_img[508:]


@pytest.mark.parametrize(("boot_img", "core_img"), [(b"x" * 511, b"x" * 1024),
                                                     (b"x" * 512, b"x" * 512)])
def test_grub_boot_code_refuses_images_of_the_wrong_size(boot_img: bytes, core_img: bytes
                                                         ) -> None:
    with pytest.raises(ValueError):
        disk.bios_boot_code(boot_img, core_img, bytes(512), 2048)


def test_esp_size_leaves_room_for_fat_and_rounds_to_mib() -> None:
    assert media.esp_size(0) == 4 * MIB
    assert media.esp_size(25 * MIB + 1) == 30 * MIB
    assert media.esp_size(26 * MIB) == 30 * MIB
