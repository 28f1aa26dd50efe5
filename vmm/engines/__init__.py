"""Engine selection: what can run VMs on this host, and which one a box gets."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EngineUnavailable
from .base import KVM_DEVICE, Engine

if TYPE_CHECKING:
    from .libkrun_ffi import Libkrun

log = logging.getLogger(__name__)

KVM_FIX = (
    "add your user to the kvm group (`sudo usermod -aG kvm $USER`, then log in again) "
    "or use engine='qemu-tcg' (software emulation, slower)"
)


@dataclass(frozen=True)
class KvmStatus:
    usable: bool  # hardware KVM that can boot a stock kernel
    kind: str  # "hardware", "pvm", "missing", "no-access", "unknown"
    reason: str


def kvm_status() -> KvmStatus:
    if not os.path.exists(KVM_DEVICE):
        return KvmStatus(False, "missing", f"{KVM_DEVICE} does not exist (no KVM module loaded, or not exposed here)")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return KvmStatus(False, "no-access", f"no read/write access to {KVM_DEVICE}: {KVM_FIX}")
    modules = Path("/sys/module")
    # PVM (nested clouds) exposes /dev/kvm but cannot boot stock kernels.
    if (modules / "kvm_pvm").exists():
        return KvmStatus(False, "pvm", "/dev/kvm is PVM (kvm_pvm), which cannot boot stock kernels")
    if (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists():
        return KvmStatus(True, "hardware", "hardware KVM (kvm_intel/kvm_amd)")
    return KvmStatus(False, "unknown", "/dev/kvm is present but no kvm_intel/kvm_amd module is loaded")


@dataclass(frozen=True)
class EngineStatus:
    """Whether an engine can run VMs on this host, and if not, why (with the fix)."""

    name: str
    usable: bool
    reason: str


def hvf_status() -> tuple[bool, str]:
    """macOS: Hypervisor.framework is usable when `sysctl kern.hv_support` says 1."""
    try:
        out = subprocess.run(["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot ask sysctl for kern.hv_support: {exc}"
    if out.strip() == "1":
        return True, "Hypervisor.framework"
    return False, "Hypervisor.framework is not available (kern.hv_support is not 1)"


def hardware_virtualization() -> tuple[bool, str]:
    if platform.system() == "Darwin":
        return hvf_status()
    kvm = kvm_status()
    return kvm.usable, kvm.reason


def libkrun_status() -> tuple[EngineStatus, Libkrun | None]:
    """(EngineStatus, the loaded library or None). The library is only dlopened, never started here."""
    from . import libkrun_ffi

    try:
        lib = libkrun_ffi.load()
    except EngineUnavailable as exc:
        return EngineStatus("libkrun", False, str(exc)), None
    missing = lib.missing()
    if missing:
        return EngineStatus("libkrun", False, f"{lib.path} lacks {', '.join(missing)}: upgrade libkrun"), None
    hw, why = hardware_virtualization()
    if not hw:
        return EngineStatus("libkrun", False, f"no hardware virtualization: libkrun needs KVM or HVF ({why})"), None
    return EngineStatus("libkrun", True, f"{lib.path} on {why}"), lib


def report() -> list[EngineStatus]:
    """Every engine and whether it can run here (for `boxlite doctor`)."""
    from .qemu import find_qemu

    statuses = [libkrun_status()[0]]
    try:
        qemu = find_qemu()
    except EngineUnavailable as exc:
        return statuses + [EngineStatus("qemu-kvm", False, str(exc)), EngineStatus("qemu-tcg", False, str(exc))]
    kvm = kvm_status()
    statuses.append(EngineStatus("qemu-kvm", kvm.usable, f"{qemu} with {kvm.reason}" if kvm.usable else kvm.reason))
    statuses.append(EngineStatus("qemu-tcg", True, f"{qemu} (software emulation, slower)"))
    return statuses


def select(name: str = "auto", kernel_release: str | None = None) -> Engine:
    """The engine for `name` ("auto", "qemu", "qemu-kvm", "qemu-tcg", "libkrun"), or EngineUnavailable.

    `auto` prefers libkrun (where it loads, hardware virtualization works and it can boot the guest kernel
    `kernel_release`), then qemu+KVM, then qemu+TCG.
    """
    from .qemu import QemuEngine, find_qemu

    if name in ("auto", "libkrun"):
        from .libkrun import LibkrunEngine, kernel_problem

        status, lib = libkrun_status()
        problem = kernel_problem(kernel_release) if status.usable and kernel_release else None
        if problem:  # `auto` then goes on to qemu; asking for libkrun by name gets the reason
            status = EngineStatus("libkrun", False, problem)
        if status.usable:
            return LibkrunEngine(lib)
        if name == "libkrun":
            raise EngineUnavailable(f"engine 'libkrun' cannot run here: {status.reason}")
        log.debug("libkrun not used: %s", status.reason)
    qemu = find_qemu()
    kvm = kvm_status()
    if name == "qemu-kvm" or (name in ("auto", "qemu") and kvm.usable):
        if not kvm.usable:
            raise EngineUnavailable(f"engine 'qemu-kvm' cannot run here: {kvm.reason}")
        return QemuEngine(qemu, accel="kvm")
    if name in ("auto", "qemu"):
        _notice_tcg(kvm)
    return QemuEngine(qemu, accel="tcg")


_noticed = False


def _notice_tcg(kvm: KvmStatus) -> None:
    global _noticed
    if not _noticed:
        _noticed = True
        log.warning("no usable hardware KVM (%s): VMs run under QEMU TCG, emulated and slower", kvm.reason)


__all__ = ["Engine", "EngineStatus", "KvmStatus", "kvm_status", "report", "select"]
