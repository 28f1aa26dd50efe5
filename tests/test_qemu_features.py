"""The qemu feature probes: parsing recorded help output of qemu 7.2 (Debian 12) and 10.0 (Debian 13), the
firmware decision, and one real probe of this machine's qemu."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pytest

from vmm.engines.jail import SANDBOX_OPTIONS
from vmm.engines.qemu import find_qemu
from vmm.engines.qemu_features import (
    QemuFeatures,
    find_firmware,
    parse_devices,
    parse_machine_options,
    parse_object_options,
    parse_sandbox_options,
    probe,
)
from vmm.errors import EngineUnavailable

DATA = Path(__file__).parent / "data" / "qemu"


@pytest.mark.parametrize("release", ["7.2", "10.0"])
def test_recorded_help_parses(release: str) -> None:
    machine = parse_machine_options((DATA / release / "machine-microvm.txt").read_text())
    devices = parse_devices((DATA / release / "device.txt").read_text())
    assert {"x-option-roms", "isa-serial", "memory-backend", "pit", "rtc"} <= machine
    assert {"virtio-serial-device", "virtserialport", "virtio-blk-device", "virtio-net-device",
            "vhost-user-fs-device", "virtio-blk-pci"} <= devices
    assert "microvm" not in machine and "bus" not in devices  # only names, nothing of the descriptions
    assert features(machine, devices).missing(("vhost-user-fs-device", "virtio-net-device")) == []


@pytest.mark.parametrize("release", ["7.2", "10.0"])
def test_recorded_help_has_the_jails_seccomp_filter(release: str) -> None:
    assert parse_sandbox_options((DATA / release / "help.txt").read_text()) == set(SANDBOX_OPTIONS)
    # A qemu built without seccomp has no -sandbox line at all.
    assert parse_sandbox_options("-serial dev  redirect the serial port\n-name string\n") == frozenset()


@pytest.mark.parametrize(("release", "read_only"), [("7.2", False), ("10.0", True)])
def test_a_clone_opens_the_ram_file_read_only_from_qemu_8_2(release: str, read_only: bool) -> None:
    options = parse_object_options((DATA / release / "memory-backend-file.txt").read_text())
    assert {"mem-path", "share", "readonly"} <= options  # 7.2 has readonly=, but it makes the RAM a ROM
    assert QemuFeatures("qemu", frozenset(), frozenset(), None, False, None,
                        ram_file_options=options).private_ram_read_only() is read_only


def test_qemu_10_has_options_7_2_lacks() -> None:
    old = parse_machine_options((DATA / "7.2" / "machine-microvm.txt").read_text())
    new = parse_machine_options((DATA / "10.0" / "machine-microvm.txt").read_text())
    assert new - old == {"aux-ram-share", "shim", "smp-cache"}


def features(machine: Collection[str] = frozenset({"x-option-roms", "isa-serial", "memory-backend"}),
             devices: Collection[str] = frozenset({"virtio-serial-device", "virtserialport", "virtio-blk-device"}),
             firmware: Path | None = None, seabios: bool = False, qboot: Path | None = None) -> QemuFeatures:
    return QemuFeatures("/opt/qemu/bin/qemu-system-x86_64", frozenset(machine), frozenset(devices), firmware,
                        seabios, qboot)


def test_missing_device_names_the_qemu_and_what_it_lacks() -> None:
    with pytest.raises(EngineUnavailable, match=r"/opt/qemu/bin/qemu-system-x86_64 lacks the device "
                                                r"'vhost-user-fs-device'.*BOXLITE_QEMU"):
        features().require(("vhost-user-fs-device",))
    with pytest.raises(EngineUnavailable, match="lacks the microvm machine option 'memory-backend'"):
        features(machine={"isa-serial"}).require()


def test_firmware_decision(tmp_path: Path) -> None:
    qboot, seabios = tmp_path / "qemu" / "qboot.rom", tmp_path / "seabios" / "bios-microvm.bin"
    for path, data in ((qboot, b"\x55\xaa qboot has no name in it"), (seabios, b"...SeaBIOS (version %s)...")):
        path.parent.mkdir()
        path.write_bytes(data)
    (tmp_path / "qemu" / "bios-microvm.bin").symlink_to("qboot.rom")
    # Debian 12: the default microvm firmware is qboot, which loads the kernel itself: option ROMs off.
    default = find_firmware([tmp_path / "qemu", tmp_path / "seabios"], "bios-microvm.bin")
    assert default == qboot
    assert features(firmware=default, qboot=qboot).boot_firmware() == (None, True)
    # Debian 13: the default is SeaBIOS (it needs the option ROM that loads the kernel); qboot is shipped.
    assert features(firmware=seabios, seabios=True, qboot=qboot).boot_firmware() == (qboot, True)
    # SeaBIOS and nothing else: keep the option ROMs, or it finds "No bootable device".
    assert features(firmware=seabios, seabios=True).boot_firmware() == (None, False)
    described = features(firmware=seabios, seabios=True).describe()
    assert described == f"microvm firmware {seabios} (SeaBIOS), option ROMs on"
    # A qemu without x-option-roms: nothing to switch off.
    assert features(machine={"isa-serial", "memory-backend"}, firmware=default).boot_firmware() == (None, False)


def test_probe_of_this_machines_qemu() -> None:
    qemu = find_qemu()
    found = probe(qemu)
    assert found is probe(qemu)  # asked once per binary
    assert found.missing(("vhost-user-fs-device", "virtio-net-device")) == []
    assert found.firmware is not None and found.firmware.is_file()
    bios, roms_off = found.boot_firmware()
    assert roms_off and (bios is None or bios.name == "qboot.rom")
