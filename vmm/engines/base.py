"""The one small interface every engine implements."""

from __future__ import annotations

import abc
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import process
from ..errors import EngineUnavailable
from ..options import Port

KVM_DEVICE = "/dev/kvm"
SOCKET_PATH_BUDGET = 90  # sun_path holds 107 bytes; names like "/fs12.sock" must still fit


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str  # the agent finds disks by virtio-blk serial, not by probe order
    readonly: bool
    format: str = "raw"


@dataclass(frozen=True)
class ComposedTree:
    """A directory tree made on the host for one share, out of chosen host paths only.

    The engine builds it in a private mount namespace of the file server: an empty read-only root, each
    of `binds` bound read-only at its own path, `symlinks` (path, target) recreated, each of `masks`
    covered by an empty file or directory, `dirs` created empty (mount points the guest needs).
    What is not listed is not there: the guest cannot reach it whatever it does with its own kernel.
    """

    binds: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...] = ()
    masks: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Share:
    tag: str
    host: Path  # the shared directory; for a composed tree, an empty directory it is built on
    readonly: bool
    tree: ComposedTree | None = None


@dataclass(frozen=True)
class LaunchSpec:
    """Everything an engine needs to boot one VM."""

    box_dir: Path
    vmlinux: Path
    initramfs: Path
    cpus: int
    memory_mib: int
    disks: tuple[Disk, ...]
    shares: tuple[Share, ...] = ()
    network: str = "none"  # a NETWORK_MODES value of vmm.options
    ports: tuple[Port, ...] = ()
    host_ports: tuple[int, ...] = ()  # host loopback ports reachable from an "internet" VM
    cmdline_extra: tuple[str, ...] = field(default_factory=tuple)
    # Snapshots: guest RAM in this file, written through (a template) or mapped copy-on-write (a restore) ...
    ram_file: Path | None = None
    # ... restoring the device state saved in this file instead of booting.
    restore_state: Path | None = None

    @property
    def nic(self) -> bool:
        """Whether the VM has a network interface (its policy aside)."""
        return self.network != "none"

    @property
    def console_log(self) -> Path:
        return self.box_dir / "console.log"

    @property
    def socket_dir(self) -> Path:
        """Where the VM's unix sockets go: the box directory, unless its path is too long for a socket
        address (108 bytes; a deep runtime home, e.g. under pytest's tmp_path), then a short one in /tmp."""
        if len(str(self.box_dir)) <= SOCKET_PATH_BUDGET:
            return self.box_dir
        return Path(tempfile.gettempdir()) / f"boxlite-{os.getuid()}" / self.box_dir.name[:16]


class VM(abc.ABC):
    """A running VM: its channel socket, its console, its end."""

    channel: socket.socket
    pid: int

    @abc.abstractmethod
    def poll(self) -> int | None:
        """The exit code once the VM process has ended, else None."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the VM to end; its exit code, or None if still running."""

    @abc.abstractmethod
    def kill(self) -> None:
        """End the VM now and release every helper process."""

    @abc.abstractmethod
    def kill_async(self) -> None:
        """Send the VM process SIGKILL without waiting (safe from any thread)."""

    @abc.abstractmethod
    def console_tail(self, lines: int = 30) -> str:
        """The last lines the guest wrote to its console."""

    @abc.abstractmethod
    def rss_bytes(self) -> int:
        """Host memory held by the VM's processes."""

    @abc.abstractmethod
    def pss_bytes(self) -> int:
        """The VM's processes' proportional share of host memory (pages shared with other VMs split)."""

    def save(self, state: Path) -> None:
        """Save the running VM's device state to `state` (its RAM is already in the spec's `ram_file`);
        the VM is left paused, to be killed. Engines without snapshots raise EngineUnavailable."""
        raise EngineUnavailable(f"{type(self).__name__} cannot save snapshots")

    def disk_serial(self, serial: str) -> str:
        """The virtio-blk serial the guest sees for the disk launched with `serial` (the agent finds disks
        by serial). Engines that cannot set serials (libkrun derives them from the file) override this."""
        return serial


class Engine(abc.ABC):
    name: str  # "qemu-tcg", "qemu-kvm", "libkrun"
    snapshots = False  # can save a running VM and restore it (LaunchSpec.ram_file / restore_state)

    @abc.abstractmethod
    def launch(self, spec: LaunchSpec) -> VM:
        """Start a VM; it boots in the background and the agent says HELLO on `vm.channel`."""

    def describe(self) -> str:
        return self.name

    def snapshot_key(self) -> list[object]:
        """What a VM saved by this engine depends on besides the box's options, kernel and agent (its binary,
        the guest command line, the CPU model): part of every snapshot template's key."""
        return [self.name]


class ProcessVM(VM):
    """A VM that is one host process plus helper processes (passt, virtiofsd): their common lifecycle."""

    def __init__(self, proc: subprocess.Popen[bytes], helpers: list[subprocess.Popen[bytes]],
                 channel: socket.socket, spec: LaunchSpec) -> None:
        self.proc = proc
        self.helpers = helpers
        self.channel = channel
        self.pid = proc.pid
        self.spec = spec

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        for proc in (self.proc, *self.helpers):
            if proc.poll() is None:
                proc.kill()
        for proc in (self.proc, *self.helpers):
            process.reap(proc)
        self.channel.close()
        if self.spec.socket_dir != self.spec.box_dir:
            shutil.rmtree(self.spec.socket_dir, ignore_errors=True)

    def kill_async(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def rss_bytes(self) -> int:
        return self._sum_field("status", "VmRSS:")

    def pss_bytes(self) -> int:
        return self._sum_field("smaps_rollup", "Pss:")

    def _sum_field(self, proc_file: str, field: str) -> int:
        total = 0
        for proc in (self.proc, *self.helpers):
            try:
                for line in Path(f"/proc/{proc.pid}/{proc_file}").read_text().splitlines():
                    if line.startswith(field):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total
