"""Engine selection: what can run VMs on this host, and which one a box gets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineUnavailable
from .base import Engine

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"
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


def select(name: str = "auto") -> Engine:
    """The engine for `name` ("auto", "qemu", "qemu-kvm", "qemu-tcg", "libkrun"), or EngineUnavailable."""
    from .qemu import QemuEngine, find_qemu

    if name == "libkrun":
        raise EngineUnavailable(
            "engine 'libkrun' is not available in this version; use engine='qemu' (or 'auto')"
        )
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


__all__ = ["Engine", "KvmStatus", "kvm_status", "select"]
