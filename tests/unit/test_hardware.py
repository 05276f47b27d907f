"""A VM's hardware configuration: the CD drive's media and the boot order, checked as strictly
as every other field, whoever wrote them (the CLI, or storage others may write)."""

from __future__ import annotations

from typing import Any

import pytest

from waymark.errors import InvalidInput
from waymark.model.hardware import (
    DEFAULT_BOOT_ORDER,
    HardwareConfig,
    check_boot_order,
    parse_boot_order,
)


def offered(path: str) -> bool:
    return path.startswith("/srv/isos/")


def config(**fields: Any) -> dict[str, Any]:
    return {"memory_mib": 128, "cpus": 1, **fields}


def test_an_older_configuration_loads_with_an_empty_drive_and_the_default_order() -> None:
    hardware = HardwareConfig.load_checked(config(), offered)
    assert (hardware.media, hardware.boot_order) == (None, list(DEFAULT_BOOT_ORDER))
    assert hardware.dump()["boot_order"] == ["disk", "cdrom"]


@pytest.mark.parametrize("text", ["disk", "cdrom,disk", "network,cdrom,disk"])
def test_a_boot_order_names_known_devices_once_each(text: str) -> None:
    assert parse_boot_order(text) == text.split(",")


@pytest.mark.parametrize(("order", "says"), [
    (["disk", "floppy"], "'floppy', which is no boot device"),
    (["disk", "disk"], "a device twice"), ([], "no device"),
    ("disk", "'disk', which is no list of devices"), (None, "which is no list"),
    ([{"x": 1}], "which is no boot device"), (["disk,bootindex=0"], "no boot device")])
def test_any_other_boot_order_is_refused(order: Any, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        check_boot_order(order)
    with pytest.raises(InvalidInput, match=says):
        HardwareConfig.load_checked(config(boot_order=order), offered)


def test_an_offered_iso_is_kept_and_any_other_plain_path_leaves_the_drive_empty() -> None:
    kept = HardwareConfig.load_checked(config(media="/srv/isos/debian.iso"), offered)
    assert kept.media == "/srv/isos/debian.iso"
    emptied = HardwareConfig.load_checked(config(media="/etc/shadow"), offered)
    assert emptied.media is None


@pytest.mark.parametrize("media", ["debian.iso", "/srv/isos/a.iso\n-device x", "/srv/isos/\0",
                                   "/srv/isos/" + "a" * 5000, 7, ["/srv/isos/a.iso"]])
def test_media_that_is_no_plain_absolute_path_is_refused(media: Any) -> None:
    with pytest.raises(InvalidInput, match="not an absolute path"):
        HardwareConfig.load_checked(config(media=media), offered)


def test_the_cli_check_refuses_an_iso_the_rule_does_not_allow() -> None:
    with pytest.raises(InvalidInput, match="not one this VM may boot"):
        HardwareConfig(memory_mib=128, cpus=1, media="/etc/shadow").check(offered)
