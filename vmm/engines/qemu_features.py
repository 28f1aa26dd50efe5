"""What a qemu binary can do, asked from the binary itself rather than guessed from its version.

Options differ between qemu releases and between distributions' builds of one release: Debian 12's qemu 7.2
boots microvm with qboot, which loads the kernel itself; Debian 13's qemu 10 boots it with SeaBIOS, which
loads the kernel through an option ROM (`pvh.bin`) and finds "No bootable device" when option ROMs are off.
Measured there under TCG, the Debian cloud kernel 6.12 started by SeaBIOS also died early in most boots
(a divide error in start_kernel), and started by the qboot that Debian 13 still ships, it booted every time.
`-help` says whether qemu was built with seccomp (`-sandbox`) and which of its options it knows;
`-object memory-backend-file,help` whether a RAM file can be opened read-only yet mapped writable (`rom`,
qemu 8.2+: a restored clone then cannot write its template's RAM file).
The probes run qemu five times (~100 ms together): their result is kept in memory per binary (path, size,
mtime), which is once per process. Not on disk: reading a cache file would save less than it costs to keep
it true across qemu upgrades.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineUnavailable

log = logging.getLogger(__name__)

#: The microvm machine's default firmware and qboot, looked up in qemu's data directories as qemu does.
MICROVM_FIRMWARE = "bios-microvm.bin"
QBOOT = "qboot.rom"
#: Machine options and devices every box needs (virtio-net and vhost-user-fs only with network/volumes).
REQUIRED_MACHINE_OPTIONS = ("isa-serial", "memory-backend")
REQUIRED_DEVICES = ("virtio-serial-device", "virtserialport", "virtio-blk-device")
PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class QemuFeatures:
    qemu: str
    machine_options: frozenset[str]  # of `-M microvm`
    devices: frozenset[str]
    firmware: Path | None  # the file `-M microvm` boots by default, None if not found
    firmware_is_seabios: bool
    qboot: Path | None
    sandbox: frozenset[str] = frozenset()  # the options of `-sandbox on,...`; empty: built without seccomp
    ram_file_options: frozenset[str] = frozenset()  # of `-object memory-backend-file`

    def has_sandbox(self, options: tuple[str, ...]) -> bool:
        """Whether `-sandbox on,<each of options>=...` is accepted."""
        return bool(self.sandbox) and set(options) <= self.sandbox

    def private_ram_read_only(self) -> bool:
        """Whether a RAM file mapped copy-on-write (share=off) can be opened read-only: `readonly=on,rom=off`
        (qemu 8.2+). Before, qemu opens it read-write, and `readonly=on` alone makes the RAM a ROM."""
        return {"readonly", "rom"} <= self.ram_file_options

    def boot_firmware(self) -> tuple[Path | None, bool]:
        """(the firmware to pass with -bios, or None for qemu's default; whether option ROMs can be off).

        qboot loads the kernel from fw_cfg itself, and without option ROMs the boot is faster; SeaBIOS needs
        the `pvh.bin` option ROM to load it. Where the default is SeaBIOS, qboot is used if qemu ships it.
        """
        roms_off = "x-option-roms" in self.machine_options
        if self.firmware is not None and not self.firmware_is_seabios:
            return None, roms_off
        if self.qboot is not None:
            return self.qboot, roms_off
        return None, False

    def describe(self) -> str:
        bios, roms_off = self.boot_firmware()
        return (f"microvm firmware {bios or self.firmware or 'not found'}"
                f"{' (SeaBIOS)' if self.firmware_is_seabios and bios is None else ''}, "
                f"option ROMs {'off' if roms_off else 'on'}")

    def missing(self, devices: tuple[str, ...] = ()) -> list[str]:
        """What of the required machine options and devices (plus `devices`) this qemu lacks."""
        lacks = [f"the microvm machine option '{o}'" for o in REQUIRED_MACHINE_OPTIONS if o not in self.machine_options]
        lacks += [f"the device '{d}'" for d in (*REQUIRED_DEVICES, *devices) if d not in self.devices]
        return lacks

    def require(self, devices: tuple[str, ...] = ()) -> None:
        lacks = self.missing(devices)
        if lacks:
            raise EngineUnavailable(
                f"{self.qemu} lacks {', '.join(lacks)}: boxes need a qemu-system-x86_64 with the microvm machine "
                "and virtio-mmio devices (Debian's qemu-system-x86 has them); install it or point BOXLITE_QEMU at one"
            )


def probe(qemu: str) -> QemuFeatures:
    """The features of `qemu`, asked once per binary version in this process."""
    st = os.stat(qemu)
    return _probe(qemu, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _probe(qemu: str, size: int, mtime_ns: int) -> QemuFeatures:
    machine = _ask(qemu, "-machine", "microvm,help")
    if not machine.startswith("microvm-machine options:"):
        raise EngineUnavailable(f"{qemu} has no microvm machine (`-machine microvm,help` said: {machine[:200]!r}): "
                                "install Debian's qemu-system-x86, or point BOXLITE_QEMU at a qemu that has it")
    data_dirs = parse_data_dirs(_ask(qemu, "-L", "help"), qemu)
    firmware = find_firmware(data_dirs, MICROVM_FIRMWARE)
    features = QemuFeatures(
        qemu=qemu,
        machine_options=parse_machine_options(machine),
        devices=parse_devices(_ask(qemu, "-device", "help")),
        firmware=firmware,
        firmware_is_seabios=firmware is not None and is_seabios(firmware),
        qboot=find_firmware(data_dirs, QBOOT),
        sandbox=parse_sandbox_options(_ask(qemu, "-help")),
        ram_file_options=parse_object_options(_ask(qemu, "-object", "memory-backend-file,help")),
    )
    log.debug("%s: microvm firmware %s (%s), qboot %s", qemu, firmware,
              "SeaBIOS" if features.firmware_is_seabios else "not SeaBIOS", features.qboot)
    return features


def _ask(qemu: str, *args: str) -> str:
    try:
        done = subprocess.run([qemu, *args], capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnavailable(f"cannot run {qemu} {' '.join(args)}: {exc}") from None
    return done.stdout


def parse_machine_options(text: str) -> frozenset[str]:
    """Option names from `-machine microvm,help` ("  x-option-roms=<bool>   - Set off to ...")."""
    return frozenset(m.group(1) for m in re.finditer(r"^\s+([\w.-]+)=<", text, re.MULTILINE))


#: `-object TYPE,help` lists options as `-machine ...,help` does.
parse_object_options = parse_machine_options


def parse_devices(text: str) -> frozenset[str]:
    """Device names from `-device help` ('name "virtio-blk-device", bus virtio-bus')."""
    return frozenset(re.findall(r'^name "([^"]+)"', text, re.MULTILINE))


def parse_sandbox_options(text: str) -> frozenset[str]:
    """The options of `-sandbox` in `-help` ("-sandbox on[,obsolete=allow|deny]...", continued on indented
    lines); empty if qemu was built without seccomp. The option "on" itself counts as one, so that a
    sandbox without sub-options is not empty."""
    match = re.search(r"^-sandbox (on.*(?:\n {5,}\[.*)*)", text, re.MULTILINE)
    if not match:
        return frozenset()
    return frozenset({"on", *re.findall(r"\[,([\w-]+)=", match.group(1))})


def parse_data_dirs(text: str, qemu: str) -> list[Path]:
    """The data directories from `-L help`, in qemu's search order (relative ones are relative to qemu's dir)."""
    base = Path(qemu).resolve().parent
    return [base / line.strip() for line in text.splitlines() if line.strip()]


def find_firmware(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        path = d / name
        if path.is_file():
            return path.resolve()
    return None


def is_seabios(firmware: Path) -> bool:
    try:
        return b"SeaBIOS" in firmware.read_bytes()
    except OSError:
        return False
