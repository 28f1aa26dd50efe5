"""Why a VM never reached its agent, read from its console: the words for a BoxError, with what to try."""

from __future__ import annotations

import re

NO_KERNEL = "No bootable device"  # SeaBIOS, when nothing loaded a kernel for it
_PANIC = re.compile(r"Kernel panic - not syncing: ([^\n]*)")
_OOPS = re.compile(r"(?:Oops|BUG): ([^\n]*)")
_FIRMWARE_ONLY = re.compile(r"^\s*(?:SeaBIOS \(version [^)]*\)|Booting from ROM\.*)?\s*$")
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|.)")  # SeaBIOS clears the screen first


def firmware_gave_up(console: str) -> bool:
    """The firmware said it has nothing to boot: waiting longer or booting again cannot help."""
    return NO_KERNEL in console


def explain(console: str, stopped: bool) -> str:
    """What the console of a VM that never reached its agent shows. `stopped`: the VM process has ended."""
    if firmware_gave_up(console):
        return ("the firmware found no kernel to boot (SeaBIOS: 'No bootable device'): this qemu did not load "
                "the guest kernel; check that its firmware files are installed (qemu-system-data), or point "
                "BOXLITE_QEMU at another qemu; `boxlite doctor` shows which qemu and firmware are used")
    panic = _PANIC.search(console)
    if panic:
        return (f"the guest kernel panicked while booting ({panic.group(1).strip()}): check the kernel "
                "(BOXLITE_KERNEL) and its modules (BOXLITE_KERNEL_MODULES), or try another one")
    oops = _OOPS.search(console)
    if oops:
        return (f"the guest kernel crashed while booting ({oops.group(1).strip()}): try another kernel "
                "(BOXLITE_KERNEL) or another qemu (BOXLITE_QEMU)")
    lines = [line for line in _ESCAPES.sub("", console).splitlines() if not line.startswith("[qemu]")]
    if all(_FIRMWARE_ONLY.match(line) for line in lines):
        where = ("the firmware ran, but the kernel printed nothing" if any(line.strip() for line in lines)
                 else "the console stayed empty: neither the firmware nor the kernel printed anything")
        return (f"{where}{' before the VM stopped' if stopped else ''}; the kernel may have crashed before "
                "its console came up: try another kernel (BOXLITE_KERNEL) or qemu (BOXLITE_QEMU), and see "
                "docs/troubleshooting.md")
    if stopped:
        return "the VM stopped before its agent started: see the console lines below"
    return ("the kernel started but its agent never answered: the initramfs or its modules may not fit this "
            "kernel (BOXLITE_KERNEL_MODULES); see the console lines below")
