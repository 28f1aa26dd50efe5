"""A box: one microVM, its agent channel, and the commands run in it.

A box starts as its LaunchPlan says, which the Runtime works out: restore a copy of a snapshot template's VM,
or boot (with its RAM in a file, for a VM that becomes a template). The box does not know the Runtime: what
it reports (starts, commands, its removal) goes to the callables of its BoxHooks.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import bootfail, boxstate
from .channel import Channel
from .engines.base import VM, Disk, Engine, LaunchSpec, Share
from .errors import AgentTimeout, BoxError, ConfigError, ExecError, GuestProtocolError
from .execution import ExecResult, Execution
from .images import ResolvedImage
from .kernel import BootFiles
from .options import BoxOptions, network_mode
from .protocol import T, parse_records, record_int, records
from .snapshot import Template

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)

ROOT_SERIAL = "boxlite-root"
UPPER_SERIAL = "boxlite-upper"
VOLUME_SERIAL = "boxlite-vol"  # + the volume's index: volumes given as ext4 image files
HOST_ROOT_TAG = "hostroot"
# About 2% of boots hang silently early (timer calibration): retry, each time more patient.
BOOT_WATCHDOGS = (10.0, 20.0, 40.0)
BOOT_POLL = 0.5  # how often a boot's console is read for a firmware that gave up
SETUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
DEFAULT_MAX_OUTPUT = 256 << 20
GUEST_ROOT = "/newroot"  # where the agent mounts the box root in its own namespace


@dataclass(frozen=True)
class BoxInfo:
    id: str
    name: str | None
    status: str  # "created", "running", "stopped", "crashed"
    engine: str | None
    image: str
    created: float  # seconds since the epoch


@dataclass(frozen=True)
class BoxMetrics:
    memory_total_kib: int
    memory_used_kib: int
    cpu_time_s: float  # guest user+system CPU time
    uptime_s: float
    processes: int
    exec_count: int
    host_rss_bytes: int  # what the VM's host processes hold
    host_pss_bytes: int  # the same, with pages shared between VMs (kernel image, code) split among them


@dataclass(frozen=True)
class LaunchPlan:
    """How a box's VM starts, worked out by the Runtime at each start: boot `boot` on `engine`, or restore a
    copy of `template`'s VM."""

    engine: Engine
    boot: BootFiles
    agent: str  # the digest of the agent in boot's initramfs (snapshot keys name it)
    template: Template | None = None  # restore this template's VM instead of booting
    ram_file: Path | None = None  # booting: keep the guest's RAM in this file (a VM to be saved as a template)


@dataclass(frozen=True)
class BoxHooks:
    """What a box asks of, and reports to, whoever made it (a Runtime)."""

    plan: Callable[[Box], LaunchPlan]  # how the box starts now
    # Restoring the plan's template failed with this error: the plan to boot instead, or raise.
    restore_failed: Callable[[Box, LaunchPlan, BoxError], LaunchPlan]
    started: Callable[[float, bool], None]  # the box is running: seconds its start took, whether restored
    exec_called: Callable[[], None]
    removed: Callable[[Box], None]  # its files are gone


class Box:
    """A microVM. Create it with `Runtime.create()`; `with box:` starts it and stops it at the end."""

    def __init__(self, box_id: str, options: BoxOptions, image: ResolvedImage, created: float, directory: Path,
                 hooks: BoxHooks, status: str = "created", engine_name: str | None = None,
                 saved: bool = False) -> None:
        """`saved`: its state is on disk already (a box found again); else it is written now."""
        self.id = box_id
        self.options = options
        self.image = image
        self.created = created
        self.status = status
        self.engine_name = engine_name
        self.exec_count = 0
        self._dir = directory
        self._hooks = hooks
        self._vm: VM | None = None
        self._channel: Channel | None = None
        self._lock = threading.RLock()
        self._plan: LaunchPlan | None = None  # what the running VM was started from
        self._template: Template | None = None  # restored from this template instead of booted
        self.warm_execution: Execution | None = None  # the template's running command, taken over
        if not saved:
            self._save()

    # -- state on disk --------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def persistent(self) -> bool:
        return self.options.disk_size_gb is not None

    @property
    def ephemeral(self) -> bool:
        """True if the box's files go when it stops (auto_remove, and no persistent disk to keep)."""
        return self.options.auto_remove and not self.persistent

    def _save(self) -> None:
        boxstate.save(self._dir, boxstate.BoxState(self.id, self.options, self.image, self.created, self.status,
                                                   self.engine_name))

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Box:
        """Start the VM (restored from a snapshot, or booted, as the runtime decides) and wait until its agent
        is ready. Idempotent."""
        with self._lock:
            if self.status == "running":
                return self
            if self.status == "removed":
                raise BoxError(f"box {self.id} was removed; create a new one")
            if self._vm is not None:  # restarting after a crash: release what the dead VM left
                self._teardown(self._vm, self._channel)
                self._vm = self._channel = None
            plan = self._hooks.plan(self)
            started = time.monotonic()
            if plan.template is not None:
                try:
                    self._restore(plan, plan.template)
                except BoxError as exc:
                    plan = self._hooks.restore_failed(self, plan, exc)
            if plan.template is None:
                self._boot(plan)
            self._plan = plan
            self.engine_name = plan.engine.name
            self.status = "running"
            self._save()
            seconds = time.monotonic() - started
            self._hooks.started(seconds, plan.template is not None)
            how = f"restored from template {plan.template.key[:12]}" if plan.template else "booted"
            log.info("box %s %s on %s (%.3f s)", self.id, how, plan.engine.name, seconds)
            return self

    def _boot(self, plan: LaunchPlan) -> None:
        spec = self._launch_spec(plan)
        for attempt, watchdog in enumerate(BOOT_WATCHDOGS, 1):
            vm = plan.engine.launch(spec)
            channel = Channel(vm.channel, self._lost_error_factory(vm))
            try:
                self._handshake(vm, channel, watchdog)
            except AgentTimeout:
                log.warning("box %s: no agent after %.0f s (attempt %d), rebooting", self.id, watchdog, attempt)
                self._teardown(vm, channel)
                continue
            except BaseException:
                self._teardown(vm, channel)
                raise
            self._vm, self._channel, self._template = vm, channel, None
            return
        tail = vm.console_tail()
        raise BoxError(f"box {self.id} did not boot after {len(BOOT_WATCHDOGS)} attempts: "
                       f"{bootfail.explain(tail, stopped=False)}", tail)

    def _restore(self, plan: LaunchPlan, template: Template) -> None:
        """Start a copy of the template's VM: its RAM copy-on-write, its own channel, console and identity."""
        vm = plan.engine.launch(self._launch_spec(plan))
        channel = Channel(vm.channel, self._lost_error_factory(vm), first_stream=template.next_stream)
        try:
            self._request(vm, channel, T.RESUME, self._identity(), "resume from its snapshot")
            if template.warm is not None:
                self.warm_execution = Execution(channel, template.warm.args, None, state=template.warm)
        except BaseException:
            self._teardown(vm, channel)
            raise
        self._vm, self._channel, self._template = vm, channel, template

    def _launch_spec(self, plan: LaunchPlan) -> LaunchSpec:
        disks = []
        shares = []
        if self.image.tree is None:
            assert self.image.base is not None  # an image is a base or a tree
            disks.append(Disk(self.image.base, ROOT_SERIAL, readonly=True))
        for i, vol in enumerate(self.options.volumes):
            if Path(vol.host).is_file():  # an ext4 image: a read-only disk
                disks.append(Disk(Path(vol.host), f"{VOLUME_SERIAL}{i}", readonly=True))
            else:  # a cow volume is read-only on the host too: the box's writes go to its own overlay
                shares.append(Share(f"vol{i}", Path(vol.host), vol.mode != "rw"))
        if self.image.tree is not None:  # the root is a view of the host, shared read-only
            view = self._dir / "hostview"
            view.mkdir(parents=True, exist_ok=True)
            shares.append(Share(HOST_ROOT_TAG, view, readonly=True, tree=self.image.tree))
        if self.persistent:
            disks.append(Disk(self._upper_disk(), UPPER_SERIAL, readonly=False, format="qcow2"))
        template = plan.template
        return LaunchSpec(
            box_dir=self._dir, vmlinux=plan.boot.vmlinux, initramfs=plan.boot.initramfs, cpus=self.options.cpus,
            memory_mib=self.options.memory_mib, disks=tuple(disks), shares=tuple(shares),
            network=network_mode(self.options.network), ports=self.options.ports, host_ports=self.options.host_ports,
            ram_file=template.ram if template else plan.ram_file,
            restore_state=template.state if template else None,
        )

    def _upper_disk(self) -> Path:
        """The persistent upper layer: an empty ext4 made on the host (no root), kept as qcow2."""
        path = self._dir / "disk.qcow2"
        if path.exists():
            return path
        raw = self._dir / "disk.raw"
        size = f"{self.options.disk_size_gb}G"
        for argv in (["mkfs.ext4", "-q", "-F", "-L", "boxlite-upper", str(raw), size],
                     ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path) + ".tmp"]):
            try:
                done = subprocess.run(argv, capture_output=True, text=True)
            except FileNotFoundError:
                raise BoxError(f"{argv[0]} is missing: install e2fsprogs and qemu-utils "
                               "(`sudo boxlite setup`)") from None
            if done.returncode:
                raise BoxError(f"creating the box disk failed: {' '.join(argv)}: {done.stderr.strip()}")
        os.replace(str(path) + ".tmp", path)
        raw.unlink()
        return path

    def _await_hello(self, vm: VM, channel: Channel, watchdog: float) -> T:
        """The agent's first frame; AgentTimeout after `watchdog` s (a hang: worth another boot), BoxError
        saying what the console shows if the VM stopped or its firmware gave up (another boot cannot help)."""
        deadline = time.monotonic() + watchdog
        while True:
            try:
                return channel.control(max(0.0, min(BOOT_POLL, deadline - time.monotonic())))[0]
            except AgentTimeout:
                if time.monotonic() >= deadline:
                    raise
                tail = vm.console_tail()
                if bootfail.firmware_gave_up(tail):
                    raise BoxError(f"box {self.id} did not boot: {bootfail.explain(tail, stopped=False)}",
                                   tail) from None
            except GuestProtocolError:
                raise
            except BoxError as exc:  # the VM ended before its agent began
                tail = vm.console_tail()
                raise BoxError(f"box {self.id} did not boot: {bootfail.explain(tail, stopped=True)}", tail) from exc

    def _handshake(self, vm: VM, channel: Channel, watchdog: float) -> None:
        kind = self._await_hello(vm, channel, watchdog)
        if kind != T.HELLO:
            raise GuestProtocolError(f"box {self.id}: the agent began with {kind.name}, not HELLO")
        upper = vm.disk_serial(UPPER_SERIAL) if self.persistent else "tmpfs"
        root = f"virtiofs:{HOST_ROOT_TAG}" if self.image.tree is not None else vm.disk_serial(ROOT_SERIAL)
        items: list[tuple[str, bytes | str | int]] = [("r", root), ("w", upper)]
        for i, vol in enumerate(self.options.volumes):
            if Path(vol.host).is_file():
                items.append(("d", f"{vm.disk_serial(f'{VOLUME_SERIAL}{i}')}\0{vol.guest}\0{vol.mode}"))
            else:
                items.append(("v", f"vol{i}\0{vol.guest}\0{vol.mode}"))
        if self.options.network != "none":
            items.append(("n", "1"))
        self._request(vm, channel, T.SETUP, items + self._identity(), "set up")

    def _identity(self) -> list[tuple[str, bytes | str | int]]:
        """Name, wall clock and fresh entropy: given at boot, and again to every VM restored from a snapshot."""
        now = time.time_ns()
        return [("h", self.options.name or f"box-{self.id[:8]}"), ("t", f"{now // 10**9}.{now % 10**9:09d}"),
                ("R", os.urandom(64))]

    def _request(self, vm: VM, channel: Channel, kind: T, items: list[tuple[str, bytes | str | int]],
                 doing: str) -> None:
        """SETUP or RESUME: the agent answers READY, or ERROR with what failed."""
        channel.send(kind, 0, records(items))
        try:
            answer, payload = channel.control(SETUP_TIMEOUT)
        except AgentTimeout:
            raise BoxError(f"box {self.id}: the agent did not {doing} within {SETUP_TIMEOUT:.0f} s",
                           vm.console_tail()) from None
        if answer == T.ERROR:
            raise BoxError(f"box {self.id} could not {doing}: {payload[:1000].decode(errors='replace')}",
                           vm.console_tail())
        if answer != T.READY:
            raise GuestProtocolError(f"box {self.id}: the agent answered {kind.name} with {answer.name}")

    def snapshot(self, state: Path) -> int:
        """Save the running VM, booted with a LaunchPlan's `ram_file` (its RAM is in that file), with its
        devices in `state`; then discard the box. Returns the next free stream id. The caller has left no
        command with output in flight. (Runtime.template() builds templates with it.)"""
        with self._lock:
            vm, channel = self._vm, self._running_channel()
            if vm is None or self._plan is None or self._plan.ram_file is None:
                raise BoxError(f"box {self.id} was not booted to be saved: Runtime.template() makes such boxes")
            channel.request(T.PING, T.PONG)  # every frame sent before it has reached the agent
            next_stream = channel.next_stream()
            vm.save(state)
            self._vm = self._channel = None
            self.status = "stopped"
            self._teardown(vm, channel)
            self._remove_files()
            return next_stream

    def _lost_error_factory(self, vm: VM) -> Callable[[str, bool], BaseException]:
        def lost(reason: str, protocol: bool) -> BaseException:
            if protocol:
                vm.kill_async()  # a guest that breaks the protocol is not talked to again
                return GuestProtocolError(f"box {self.id}: the guest broke the protocol ({reason}); the box was "
                                          "stopped", vm.console_tail())
            code = vm.wait(2.0)
            if code is not None and self.status == "running":
                self.status = "crashed"
            tail = vm.console_tail()
            panic = re.search(r"Kernel panic - not syncing: ([^\n]*)", vm.console_tail(400))
            if panic:
                reason = f"the guest kernel panicked ({panic.group(1).strip()})"
            return BoxError(f"box {self.id}: {reason}" + (f" (VM exit code {code})" if code is not None else ""), tail)
        return lost

    @staticmethod
    def _teardown(vm: VM, channel: Channel | None) -> None:
        vm.kill()
        if channel is not None:
            channel.close()

    def stop(self) -> None:
        """Power the VM off (SIGKILL if it does not within a few seconds). Idempotent.

        A box with nothing to write back (no persistent disk, no rw volume) is killed at once: its guest
        would spend CPU on an orderly poweroff that changes nothing."""
        with self._lock:
            vm, channel = self._vm, self._channel
            if vm is None:
                return
            self._vm = self._channel = None
            if self.status == "running":
                self.status = "stopping"  # the channel's end is expected now, not a crash
            try:
                if channel is not None and channel.error is None and self._writes_back:
                    channel.send(T.SHUTDOWN, 0)
                    vm.wait(STOP_TIMEOUT)
            except BoxError:
                pass
            finally:
                self._teardown(vm, channel)
            if self.status == "stopping":
                self.status = "stopped"
            if self.ephemeral:
                self._remove_files()
            else:
                self._save()

    @property
    def _writes_back(self) -> bool:
        return self.persistent or any(v.mode == "rw" for v in self.options.volumes)

    def remove(self) -> None:
        """Stop the box and delete everything it has on disk (its persistent disk too)."""
        self.stop()
        self._remove_files()

    def _remove_files(self) -> None:
        if self.status != "removed":
            shutil.rmtree(self._dir, ignore_errors=True)
            self.status = "removed"
            self._hooks.removed(self)

    def __enter__(self) -> Box:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def info(self) -> BoxInfo:
        return BoxInfo(self.id, self.options.name, self.status, self.engine_name, self.image.ref, self.created)

    def __repr__(self) -> str:
        return f"<Box {self.id[:12]} {self.status} image={self.image.ref}>"

    # -- commands -------------------------------------------------------------------------------------
    def _running_channel(self) -> Channel:
        channel = self._channel
        if channel is None or self.status != "running":
            raise BoxError(f"box {self.id} is {self.status}: start() it first")
        if channel.error is not None:
            raise channel.error
        return channel

    def spawn(self, cmd: str | Iterable[str], *args: str, env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: str | None = None, _root: str = "image") -> Execution:
        """Start a command and return at once; stream with `.stdout`, `.stderr`, `.stdin`, then `.wait()`."""
        argv = (cmd, *args) if isinstance(cmd, str) else (*cmd, *args)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"exec needs a command and string arguments, got {argv!r}")
        merged = dict(e.split("=", 1) for e in self.image.config.env if "=" in e)
        merged.update(self.options.env)
        merged.update(env or {})
        items: list[tuple[str, bytes | str | int]] = [("a", a) for a in argv]
        items += [("e", f"{k}={v}") for k, v in merged.items()]
        items.append(("c", cwd or self.options.working_dir or self.image.config.working_dir or "/"))
        # The agent's own root has no /etc/passwd: its tools run as uid 0.
        default_user = "0:0" if _root == "agent" else self.options.user or self.image.config.user or "root"
        items.append(("u", user or default_user))
        items.append(("r", _root))
        channel = self._running_channel()
        execution = Execution(channel, argv, records(items))
        self.exec_count += 1
        self._hooks.exec_called()
        return execution

    def exec(self, cmd: str | Iterable[str], *args: str, env: Mapping[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, stdin: bytes | str | None = None,
             timeout: float | None = None, max_output: int = DEFAULT_MAX_OUTPUT) -> ExecResult:
        """Run a command to its end and collect its output (like `subprocess.run(capture_output=True)`).

        `timeout` kills it and raises ExecTimeout; more than `max_output` bytes of output kills it and
        raises OutputLimitExceeded. A command that cannot start raises ExecError.
        """
        execution = self.spawn(cmd, *args, env=env, cwd=cwd, user=user)
        if stdin is not None:
            feeder = threading.Thread(target=_feed, args=(execution, stdin), daemon=True)
            feeder.start()
        stdout, stderr = execution.communicate(timeout=timeout, max_output=max_output, close_stdin=stdin is None)
        code = execution.wait()
        return ExecResult(execution.args, code, stdout, stderr)

    def metrics(self) -> BoxMetrics:
        channel = self._running_channel()
        recs = parse_records(channel.request(T.STAT, T.STAT))

        def number(key: str) -> int:
            return record_int(recs, key) or 0

        total = number("m")
        return BoxMetrics(
            memory_total_kib=total, memory_used_kib=max(0, total - number("f")),
            cpu_time_s=number("u") / 100, uptime_s=number("t") / 100, processes=number("n"),
            exec_count=self.exec_count, host_rss_bytes=self._vm.rss_bytes() if self._vm else 0,
            host_pss_bytes=self._vm.pss_bytes() if self._vm else 0,
        )

    def ping(self, data: bytes = b"") -> bytes:
        """One round trip through the agent (what `bench/` measures)."""
        return self._running_channel().request(T.PING, T.PONG, data)

    # -- files ----------------------------------------------------------------------------------------
    def copy_in(self, src: str | os.PathLike[str], dest: str) -> None:
        """Copy a host file or directory to `dest` in the box (created, or replaced if it exists)."""
        src = Path(src)
        if not src.exists():
            raise FileNotFoundError(f"copy_in: {src} does not exist on the host")
        parent, name = _split_guest_path(dest)
        self._tool("mkdir", "-p", GUEST_ROOT + parent)
        execution = self.spawn("/bin/busybox", "tar", "-x", "-f", "-", "-C", GUEST_ROOT + parent, _root="agent")
        writer = threading.Thread(target=_write_tar, args=(execution, src, name), daemon=True)
        writer.start()
        _, stderr = execution.communicate(close_stdin=False)
        writer.join()
        if execution.wait() != 0:
            raise ExecError(f"copy_in to {dest} failed: {stderr[-500:].decode(errors='replace')}")

    def copy_out(self, src: str, dest: str | os.PathLike[str], max_bytes: int = 4 << 30) -> None:
        """Copy a file or directory at `src` in the box to `dest` on the host.

        What the guest sends is checked: only regular files, directories and symlinks that stay inside
        `dest`, at most `max_bytes` in all.
        """
        parent, name = _split_guest_path(src)
        dest = Path(dest)
        execution = self.spawn("/bin/busybox", "tar", "-c", "-f", "-", "-C", GUEST_ROOT + parent, name,
                               _root="agent")
        execution.stdin.close()
        staging = Path(dest.parent) / f".boxlite-copy-{self.id[:8]}-{os.getpid()}"
        staging.mkdir(parents=True)
        try:
            stream = _ChunkReader(execution.stdout, max_bytes)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        _check_member(member, name)
                        tar.extract(member, staging, filter="data")
            except (tarfile.TarError, ValueError) as exc:
                broken: Exception | None = exc
                execution.kill()
            else:
                broken = None
            stderr = execution.stderr.read()
            code = execution.wait()
            if code > 0:  # tar's own complaint (no such file) says more than the archive it cut short
                raise ExecError(f"copy_out of {src} failed: {stderr[-500:].decode(errors='replace')}")
            if broken is not None:
                raise GuestProtocolError(f"copy_out of {src}: the box sent an unsafe or broken archive: {broken}")
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(staging / name, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _tool(self, *argv: str) -> None:
        execution = self.spawn("/bin/busybox", *argv, _root="agent")
        _, stderr = execution.communicate()
        if execution.wait() != 0:
            raise ExecError(f"{' '.join(argv)} failed in the box: {stderr[-500:].decode(errors='replace')}")


def _feed(execution: Execution, data: bytes | str) -> None:
    try:
        execution.stdin.write(data)
        execution.stdin.close()
    except (BrokenPipeError, BoxError, ValueError):
        pass  # the command ended (or the box did) before reading all of it, as with a pipe


def _write_tar(execution: Execution, src: Path, name: str) -> None:
    try:
        with tarfile.open(fileobj=_StdinWriter(execution), mode="w|") as tar:
            tar.add(src, arcname=name)
        execution.stdin.close()
    except (BrokenPipeError, BoxError):
        pass


class _StdinWriter(io.RawIOBase):
    def __init__(self, execution: Execution) -> None:
        self._execution = execution

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        return self._execution.stdin.write(bytes(data))


class _ChunkReader(io.RawIOBase):
    """A file over an output iterator, refusing more than `limit` bytes."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = b""
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        if not self._buf:
            self._buf = next(self._chunks, b"")
            self._left -= len(self._buf)
            if self._left < 0:
                raise ValueError("the archive is larger than max_bytes")
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _split_guest_path(path: str) -> tuple[str, str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{path!r}: paths in the box must be absolute")
    norm = posixpath.normpath(path)
    if norm == "/" or ".." in path.split("/"):
        raise ConfigError(f"{path!r}: give a file or directory below /, without '..'")
    parent, name = posixpath.split(norm)
    return parent, name


def _check_member(member: tarfile.TarInfo, top: str) -> None:
    if not (member.isfile() or member.isdir() or member.issym()):
        raise ValueError(f"{member.name}: only files, directories and symlinks are copied")
    if member.name != top and not member.name.startswith(top + "/"):
        raise ValueError(f"{member.name} is outside {top}")
