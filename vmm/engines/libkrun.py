"""The libkrun engine: a KVM (Linux) or Hypervisor.framework (macOS) microVM inside a child process.

The guest is the same as under qemu (our kernel, our initramfs, the agent as PID 1); only the plumbing
differs: the channel is vsock (the agent connects to CID 2, libkrun bridges that port to a unix socket on
which the host listens), the network is passt on a virtio-net device, volumes are libkrun's own virtiofs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import process
from ..console import tail
from ..errors import BoxError, EngineUnavailable, LibkrunError
from . import libkrun_ffi as ffi
from . import network
from .base import VM, Engine, LaunchSpec, ProcessVM

log = logging.getLogger(__name__)

VSOCK_PORT = 1024  # the agent connects to this port on CID 2 (boxlite.vsock= on the command line)
CONNECT_TIMEOUT = 30.0  # hardware-virtualised boots take well under a second; this is for loaded hosts
# No TCG-specific tuning here (libkrun always runs on KVM/HVF). console=hvc0 is libkrun's implicit
# virtio console, the one krun_set_console_output writes to a file.
CMDLINE = "console=hvc0 quiet loglevel=1 panic=-1 reboot=k cryptomgr.notests random.trust_cpu=on audit=0"
GUEST_NET = ("10.0.2.15", "24", "10.0.2.2", "10.0.2.3")  # address, prefix, gateway, DNS: what the agent sets
GUEST_MAC = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
SUN_PATH_MAX = 107


@dataclass(frozen=True)
class Plan:
    """What the launcher does, and the host-side objects it needs."""

    calls: list[list[Any]]
    channel_path: Path
    disk_serials: dict[str, str]  # the serial the runtime asked for -> the one the guest sees


def guest_disk_serial(path: Path) -> str:
    """The virtio-blk serial libkrun gives a disk: not block_id, but kvmtool's "st_dev st_rdev st_ino" digits
    (src/devices/src/virtio/block/device.rs, build_device_id), cut to VIRTIO_BLK_ID_BYTES (20)."""
    st = path.stat()
    return f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20]


def cmdline(spec: LaunchSpec, port: int) -> str:
    groups = ["vsock"] + [g for g, wanted in (("net", spec.nic), ("fs", spec.shares)) if wanted]
    return " ".join([CMDLINE, *spec.cmdline_extra, f"boxlite.vsock={port}", f"boxlite.modules={','.join(groups)}"])


def check_spec(spec: LaunchSpec, lib: ffi.Libkrun | None) -> None:
    """Refuse, before anything starts, what libkrun cannot honour."""
    for disk in spec.disks:
        if disk.format not in ffi.DISK_FORMAT:
            raise EngineUnavailable(f"libkrun cannot open {disk.format} disk images ({disk.path}): use raw or qcow2")
    for port in spec.ports:
        if port.protocol != "tcp":
            raise EngineUnavailable(
                f"port {port.host}:{port.guest}/{port.protocol}: the libkrun engine forwards tcp ports only; "
                "use engine='qemu' for udp"
            )
    if any(s.tree is not None for s in spec.shares):
        raise EngineUnavailable(
            "the host image is not available on the libkrun engine (its virtiofs server shares one directory "
            "and cannot build the masked view of the host): use engine='qemu', or another image"
        )
    if spec.nic and platform.system() != "Linux":
        raise EngineUnavailable(
            "network=True on libkrun needs passt, which is Linux-only: use network=False on macOS"
        )
    if lib is not None:
        if spec.nic and not lib.has("krun_add_net_unixstream"):
            raise EngineUnavailable(f"this libkrun ({lib.path}) has no krun_add_net_unixstream: upgrade libkrun")
        if any(s.readonly for s in spec.shares) and not lib.has("krun_add_virtiofs3"):
            raise EngineUnavailable(
                f"this libkrun ({lib.path}) cannot share a volume read-only (no krun_add_virtiofs3, which makes "
                "its host-side virtiofs server refuse writes): upgrade libkrun, or share the volume rw"
            )
    _check_kernel_config(spec)


def _check_kernel_config(spec: LaunchSpec, boot: Path = Path("/boot")) -> None:
    release = spec.vmlinux.parent.name.rsplit("-", 1)[0]  # kernels/<release>-<key>/vmlinux (vmm.kernel)
    problem = kernel_problem(release, boot)
    if problem:
        raise EngineUnavailable(problem)


def kernel_problem(release: str, boot: Path = Path("/boot")) -> str | None:
    """Why libkrun cannot boot this kernel, or None.

    On x86_64 libkrun announces its virtio-mmio devices on the kernel command line (virtio_mmio.device=),
    which only kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES understand (Debian's cloud kernel is
    not); without it the guest finds no disk and no channel. The config is checked where the host has it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None  # aarch64 describes devices in the device tree
    config = boot / f"config-{release}"
    try:
        text = config.read_text(errors="replace")
    except OSError:
        log.debug("no %s: cannot check CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", config)
        return None
    if "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y" not in text:
        return (
            f"the guest kernel {release} lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, which libkrun needs on x86_64 "
            "to announce its devices: set BOXLITE_KERNEL to a kernel built with it (Fedora's kernels are), "
            "or use engine='qemu'"
        )
    return None


def plan(spec: LaunchSpec, channel_path: Path, net_fd: int | None, log_level: int, port: int = VSOCK_PORT) -> Plan:
    """The libkrun calls for `spec`, in order (the context id is implicit: the launcher supplies it)."""
    kernel_format = ffi.KERNEL_FORMAT_ELF if spec.vmlinux.read_bytes()[:4] == b"\x7fELF" else ffi.KERNEL_FORMAT_RAW
    calls: list[list[Any]] = [
        ["krun_set_log_level", log_level],
        ["krun_create_ctx"],
        ["krun_set_vm_config", min(spec.cpus, 255), spec.memory_mib],
        ["krun_set_kernel", str(spec.vmlinux), kernel_format, str(spec.initramfs), cmdline(spec, port)],
        ["krun_set_console_output", str(spec.console_log)],
    ]
    serials: dict[str, str] = {}
    for disk in spec.disks:
        calls.append(["krun_add_disk2", disk.serial, str(disk.path), ffi.DISK_FORMAT[disk.format], disk.readonly])
        serials[disk.serial] = guest_disk_serial(disk.path)
    if len(set(serials.values())) != len(serials):
        raise BoxError(f"two disks get the same libkrun serial ({serials}): they are the same file")
    for share in spec.shares:
        if share.readonly:
            # shm_size 0: no DAX window. read_only is enforced by libkrun's virtiofs server on the host.
            calls.append(["krun_add_virtiofs3", share.tag, str(share.host), 0, True])
        else:
            calls.append(["krun_add_virtiofs", share.tag, str(share.host)])
    if net_fd is not None:
        calls.append(["krun_add_net_unixstream", None, net_fd, GUEST_MAC, ffi.NET_FEATURES, 0])
    # listen=false: the guest connects, libkrun connects to the unix socket the host listens on.
    calls.append(["krun_add_vsock_port2", port, str(channel_path), False])
    calls.append(["krun_start_enter"])
    return Plan(calls, channel_path, serials)


def passt_argv(binary: str, fd: int, spec: LaunchSpec) -> list[str]:
    """passt on a socket it is handed, with the addresses the agent configures (QEMU's user-net layout,
    so the guest side is the same on every engine); ports bound on 127.0.0.1 only, like the qemu engine."""
    address, prefix, gateway, dns = GUEST_NET
    argv = [binary, "--foreground", "--quiet", "--ipv4-only", "--fd", str(fd), "--address", address,
            "--netmask", prefix, "--gateway", gateway, "--dns-forward", dns]
    for port in spec.ports:
        argv += ["--tcp-ports", f"127.0.0.1/{port.host}:{port.guest}"]
    return argv


def find_passt() -> str:
    path = os.environ.get("BOXLITE_PASST") or shutil.which("passt")
    if not path:
        raise EngineUnavailable(
            "network=True on libkrun needs passt: `sudo dnf install passt` / `sudo apt-get install passt`, "
            "or use network=False"
        )
    return path


def log_level() -> int:
    level = os.environ.get("BOXLITE_LOG", "").lower()
    return ffi.LOG_LEVEL.get(level, ffi.LOG_LEVEL["error"])


class LibkrunEngine(Engine):
    name = "libkrun"

    def __init__(self, lib: ffi.Libkrun | None = None, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.lib = lib  # the parent only inspects which calls exist; the launcher child makes them
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return "libkrun (" + ("Hypervisor.framework" if platform.system() == "Darwin" else "KVM") + ")"

    def launch(self, spec: LaunchSpec) -> VM:
        check_spec(spec, self.lib)
        spec.box_dir.mkdir(parents=True, exist_ok=True)
        spec.console_log.write_bytes(b"")
        spec.socket_dir.mkdir(parents=True, exist_ok=True)
        channel_path = spec.socket_dir / "channel.sock"
        if len(str(channel_path)) > SUN_PATH_MAX:
            raise BoxError(f"{channel_path} is too long for a unix socket: use a shorter BOXLITE_HOME")
        helpers: list[subprocess.Popen[bytes]] = []
        listener = _listen(channel_path)
        proc: subprocess.Popen[bytes] | None = None
        try:
            net_fd = self._start_passt(spec, helpers) if spec.nic else None
            try:
                the_plan = plan(spec, channel_path, net_fd, log_level())
                proc, config_w, status_r = self._spawn(spec, [] if net_fd is None else [net_fd])
            finally:
                if net_fd is not None:
                    os.close(net_fd)  # the launcher has its own copy
            with os.fdopen(config_w, "wb") as config:
                config.write(json.dumps({"calls": the_plan.calls}).encode())
            channel = _await_guest(proc, listener, status_r, self.connect_timeout, spec)
        except BaseException:
            for helper in ([proc] if proc else []) + helpers:
                helper.kill()
                process.reap(helper)
            raise
        finally:
            listener.close()
            channel_path.unlink(missing_ok=True)
        return LibkrunVM(proc, helpers, channel, spec, the_plan.disk_serials)

    @staticmethod
    def _start_passt(spec: LaunchSpec, helpers: list[subprocess.Popen[bytes]]) -> int:
        """passt on one end of a socketpair; the other end's fd (for the launcher) is returned.
        network="internet": passt runs in the namespace of the policy (vmm/engines/network.py), where its
        ports are forwarded from the host by pasta."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        net = None
        try:
            argv = passt_argv(find_passt(), theirs.fileno(), spec)
            fds = [theirs.fileno()]
            if spec.network == "internet":
                net = network.isolate(spec.box_dir, spec.host_ports, spec.ports)
                helpers.append(net.pasta)
                argv, fds = net.prefix + argv, fds + list(net.fds)
            log.debug("starting %s", " ".join(argv))
            helpers.append(process.spawn(argv, pass_fds=tuple(fds), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=open(spec.box_dir / "passt.log", "wb")))
            if net is not None:
                net.wait_ready()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if net is not None:
                net.close()
        return ours.detach()

    @staticmethod
    def _spawn(spec: LaunchSpec, fds: list[int]) -> tuple[subprocess.Popen[bytes], int, int]:
        """The launcher child, and our ends of its config pipe (write) and status pipe (read)."""
        config_r, config_w = os.pipe()
        status_r, status_w = os.pipe()
        env = dict(os.environ)
        # The launcher imports this package: make it importable however the parent found it.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "vmm.engines.krun_launcher", str(config_r), str(status_w)]
        log.debug("starting %s", " ".join(argv))
        try:
            proc = process.spawn(argv, pass_fds=(config_r, status_w, *fds), env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=open(spec.box_dir / "libkrun.log", "wb"))
        except BaseException:
            os.close(config_w)
            os.close(status_r)
            raise
        finally:
            os.close(config_r)
            os.close(status_w)
        return proc, config_w, status_r


def _listen(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    return listener


def _await_guest(proc: subprocess.Popen[bytes], listener: socket.socket, status_r: int, timeout: float,
                 spec: LaunchSpec) -> socket.socket:
    """The agent's connection, or the launcher's error, or its exit, or a timeout: whichever comes first."""
    status = os.fdopen(status_r, "rb", buffering=0)
    deadline = time.monotonic() + timeout
    pending = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BoxError(f"the guest agent did not connect within {timeout:.0f} s", _console(spec))
            watched: list[socket.socket | io.FileIO] = [listener, status]
            ready, _, _ = select.select(watched, [], [], left)
            if listener in ready:
                conn, _ = listener.accept()
                return conn
            if status in ready:
                data = status.read(4096)
                if not data:  # the launcher has ended: libkrun exited before the guest connected
                    code = process.reap(proc)
                    raise BoxError(f"libkrun exited with status {code} before the guest agent connected",
                                   _console(spec))
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    _raise_reported(json.loads(line))
    finally:
        status.close()


def _raise_reported(message: dict[str, Any]) -> None:
    if "error" not in message:
        return
    if "call" in message:
        raise LibkrunError(message["call"], int(message["errno"]))
    raise EngineUnavailable(message["error"])


def _console(spec: LaunchSpec, lines: int = 30) -> str:
    text = tail(lines, spec.console_log)
    krun_log = tail(5, spec.box_dir / "libkrun.log")
    return text + (f"\n[libkrun] {krun_log}" if krun_log else "")


class LibkrunVM(ProcessVM):
    """The launcher process (which became the VM) and passt, if the VM has a network."""

    def __init__(self, proc: subprocess.Popen[bytes], helpers: list[subprocess.Popen[bytes]],
                 channel: socket.socket, spec: LaunchSpec, disk_serials: dict[str, str]) -> None:
        super().__init__(proc, helpers, channel, spec)
        self.disk_serials = disk_serials

    def disk_serial(self, serial: str) -> str:
        return self.disk_serials.get(serial, serial)

    def console_tail(self, lines: int = 30) -> str:
        return _console(self.spec, lines)
