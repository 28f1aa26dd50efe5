"""The one small interface every engine implements."""

from __future__ import annotations

import abc
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..options import Port


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str  # the agent finds disks by virtio-blk serial, not by probe order
    readonly: bool
    format: str = "raw"


@dataclass(frozen=True)
class Share:
    tag: str
    host: Path
    readonly: bool


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
    network: bool = False
    ports: tuple[Port, ...] = ()
    cmdline_extra: tuple[str, ...] = field(default_factory=tuple)

    @property
    def console_log(self) -> Path:
        return self.box_dir / "console.log"


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


class Engine(abc.ABC):
    name: str  # "qemu-tcg", "qemu-kvm", "libkrun"

    @abc.abstractmethod
    def launch(self, spec: LaunchSpec) -> VM:
        """Start a VM; it boots in the background and the agent says HELLO on `vm.channel`."""

    def describe(self) -> str:
        return self.name
