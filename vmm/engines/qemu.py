"""The qemu engine: `-M microvm`, PVH boot of an uncompressed vmlinux, KVM or TCG."""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..console import ConsoleLog, tail
from ..errors import BoxError, EngineUnavailable
from . import network
from .base import KVM_DEVICE, Disk, Engine, LaunchSpec, ProcessVM, Share
from .fsjail import MOUNT_POINT
from .jail import SANDBOX_OPTIONS, Jail, virtiofsd_prefix
from .jail import enabled as jail_enabled
from .jail import for_box as jail_for_box
from .qemu_features import probe
from .qmp import Qmp

log = logging.getLogger(__name__)

QEMU_FIX = "install it with `sudo apt-get install qemu-system-x86` (or run `make setup`), or set BOXLITE_QEMU"
VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")

# Measured under TCG: each of these shaves boot time without weakening the sandbox.
# loglevel=1, not 0: at 0 a panic cannot raise the console level, and its message never reaches the log.
CMDLINE = (
    "console=ttyS0 quiet loglevel=1 panic=-1 tsc=reliable no_timer_check mitigations=off nokaslr "
    "8250.nr_uarts=1 i8042.noaux i8042.nokbd random.trust_cpu=on cryptomgr.notests ipv6.disable=1 "
    "audit=0 init_on_alloc=0 page_alloc.shuffle=0 "
    # Initcalls a box never needs that cost tens of ms each under TCG (measured with initcall_debug):
    # kprobe tracing, BTF registration of TCP cubic (reno remains), a KDF self-test, slab sysfs, the
    # module-signing keyring (modules are loaded unsigned), the hibernation device, trace_printk export.
    "initcall_blacklist=init_kprobe_trace,cubictcp_register,crypto_kdf108_init,slab_sysfs_init,"
    "load_system_certificate_list,snapshot_device_init,init_trace_printk_function_export"
)
# Under TCG: the x86-64-v2 baseline (images built for it run) plus RDRAND (seeds the guest RNG at boot).
# Fewer CPU features than `-cpu max` means less for the kernel to probe and patch: ~0.2 s faster boots.
# ARAT (the local APIC timer keeps running when idle): without it the guest found no one-shot timer it
# trusts, stayed on a periodic 250 Hz tick, and an idle box cost 7-8% of a host core instead of 1%.
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+rdrand,+arat"
# Under TCG, translated code is found again by its virtual address: with address-space randomization every
# exec maps the loader and libc somewhere new, and they are translated again. Without it (measured) a
# command starts about 3x faster and python about 20%. The VM isolates the box, not the guest's ASLR.
TCG_CMDLINE = "norandmaps"


def find_qemu() -> str:
    path = os.environ.get("BOXLITE_QEMU") or shutil.which("qemu-system-x86_64")
    if not path or not os.access(path, os.X_OK):
        raise EngineUnavailable(f"qemu-system-x86_64 not found: {QEMU_FIX}")
    return path


def find_virtiofsd() -> str:
    for path in (os.environ.get("BOXLITE_VIRTIOFSD"), shutil.which("virtiofsd"), *VIRTIOFSD_PATHS):
        if path and os.access(path, os.X_OK):
            return path
    raise EngineUnavailable(
        "volumes need virtiofsd, which is missing: install it with `sudo apt-get install virtiofsd` "
        "(Debian 13) or `qemu-system-x86` (Debian 12 ships /usr/lib/qemu/virtiofsd), or set BOXLITE_VIRTIOFSD"
    )


def host_tsc_khz() -> int | None:
    """The host's TSC frequency, as the kernel reports it in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


class QemuEngine(Engine):
    def __init__(self, qemu: str, accel: str) -> None:
        self.qemu = qemu
        self.accel = accel
        self.name = f"qemu-{accel}"
        self.snapshots = True
        self.features = probe(qemu)
        self.features.require()

    def describe(self) -> str:
        return f"qemu ({'KVM' if self.accel == 'kvm' else 'TCG, software emulation'})"

    def snapshot_key(self) -> list[object]:
        st = os.stat(self.qemu)
        bios, roms_off = self.features.boot_firmware()
        return [self.name, self.qemu, st.st_size, st.st_mtime_ns, str(bios), roms_off, CMDLINE, TCG_CMDLINE, TCG_CPU]

    def argv(self, spec: LaunchSpec, fds: QemuFds, jail: Jail | None = None) -> list[str]:
        """qemu's command line; the files it uses by descriptor are in `fds` (inherited at their numbers)."""
        self.features.require((("vhost-user-fs-device",) if spec.shares else ())
                              + (("virtio-net-device",) if spec.nic else ()))
        bios, roms_off = self.features.boot_firmware()
        machine = "microvm,isa-serial=on" + (",x-option-roms=off" if roms_off else "")
        # -name: the box's id on qemu's command line (ps, and tests finding its processes).
        args = [self.qemu, "-name", spec.box_dir.name, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
        if bios is not None:
            args += ["-bios", str(bios)]
        if spec.ram_file is not None:
            if spec.shares:
                raise BoxError("a VM with virtiofs shares cannot be snapshotted: give volumes as image files")
            # A template writes its RAM through to the file (docs/snapshots.md); a restored VM maps it
            # copy-on-write, so that its pages are shared with every other VM restored from it.
            shared = "off" if spec.restore_state else "on"
            # A clone opens its template's file read-only where qemu can (8.2+): then even a compromised clone
            # cannot write the RAM its template's other clones start from.
            readonly = ",readonly=on,rom=off" if self._clone_ram_read_only(spec) else ""
            args += ["-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={spec.ram_file},"
                                f"share={shared}{readonly}"]
            machine += ",memory-backend=mem"
        elif spec.shares:
            # vhost-user-fs needs guest RAM the virtiofsd process can map.
            args += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
            machine += ",memory-backend=mem"
        args += ["-M", machine, "-m", f"{spec.memory_mib}M", "-smp", str(spec.cpus)]
        if self.accel == "kvm":
            args += ["-accel", "kvm", "-cpu", "host"]
        else:
            # A 64 MiB translation cache (default 1 GiB) saves ~25 MB RSS per box at no measured cost;
            # 32 MiB slowed guest Python by 25%.
            args += ["-accel", "tcg,tb-size=64", "-cpu", TCG_CPU]
        args += ["-global", "virtio-mmio.force-legacy=false"]
        args += ["-kernel", str(spec.vmlinux), "-initrd", str(spec.initramfs)]
        groups = [g for g, wanted in (("net", spec.nic), ("fs", spec.shares)) if wanted]
        cmdline = [CMDLINE, *spec.cmdline_extra, f"boxlite.modules={','.join(groups) or 'none'}"]
        if self.accel == "tcg":
            cmdline.append(TCG_CMDLINE)
            # Under TCG the guest TSC is the host's, and calibrating it against the emulated PIT fails
            # on some hosts (the boot then hangs waiting for timer ticks): tell the guest its frequency.
            khz = host_tsc_khz()
            if khz:
                cmdline.append(f"tsc_early_khz={khz}")
        args += ["-append", " ".join(cmdline)]
        args += ["-chardev", f"socket,id=con,fd={fds.console}", "-serial", "chardev:con"]
        args += ["-chardev", f"socket,id=ch0,fd={fds.channel}"]
        args += ["-device", "virtio-serial-device", "-device", "virtserialport,chardev=ch0,name=boxlite.0"]
        for i, (disk, disk_fds) in enumerate(zip(spec.disks, fds.disks, strict=True)):
            # Opened by the runtime and inherited: a jailed qemu needs no path to (or right on) the file.
            for fd in disk_fds:
                args += ["-add-fd", f"fd={fd},set={i + 1}"]
            ro = ",readonly=on" if disk.readonly else ""
            args += ["-drive", f"id=d{i},file=/dev/fdset/{i + 1},format={disk.format},if=none,cache=unsafe{ro}"]
            args += ["-device", f"virtio-blk-device,drive=d{i},serial={disk.serial}"]
        if spec.nic:
            # "internet": the same user network, started in a namespace whose rules filter it (network.py)
            netdev = "user,id=n0"
            for port in spec.ports:
                netdev += f",hostfwd={port.protocol}:127.0.0.1:{port.host}-:{port.guest}"
            args += ["-netdev", netdev, "-device", "virtio-net-device,netdev=n0"]
        for i, (share, sock) in enumerate(zip(spec.shares, fds.shares, strict=True)):
            args += ["-chardev", f"socket,id=fs{i},fd={sock}"]  # connected to virtiofsd by the runtime
            args += ["-device", f"vhost-user-fs-device,chardev=fs{i},tag={share.tag}"]
        if fds.monitor is not None:
            args += ["-chardev", f"socket,id=mon,fd={fds.monitor}", "-mon", "chardev=mon,mode=control"]
        if spec.restore_state is not None:
            args += ["-incoming", "defer"]
        if jail is not None:
            args += jail.qemu_options()
        return args

    def _clone_ram_read_only(self, spec: LaunchSpec) -> bool:
        return spec.restore_state is not None and self.features.private_ram_read_only()

    def jail(self, spec: LaunchSpec) -> Jail:
        return jail_for_box(spec.box_dir, self.features.has_sandbox(SANDBOX_OPTIONS))

    def launch(self, spec: LaunchSpec) -> QemuVM:
        spec.box_dir.mkdir(parents=True, exist_ok=True)
        jail = self.jail(spec)
        console = ConsoleLog(spec.console_log)
        helpers: list[subprocess.Popen[bytes]] = []
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        monitor = qemu_monitor = None
        if spec.ram_file is not None:
            monitor, qemu_monitor = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        files: list[int] = []  # descriptors qemu inherits, closed here once it has them
        proc = None
        net = None
        try:
            if spec.ram_file is not None:  # a template's new file, or one saved before the jail was on
                jail.prepare_ram_file(spec.ram_file, create=spec.restore_state is None)
            disks = [_open_disk(disk, files) for disk in spec.disks]
            state = None
            if spec.restore_state is not None:
                state = os.open(spec.restore_state, os.O_RDONLY | os.O_CLOEXEC)
                files.append(state)
            sockets = []
            if spec.shares:
                spec.socket_dir.mkdir(parents=True, exist_ok=True)
            for i, share in enumerate(spec.shares):
                sock = spec.socket_dir / f"fs{i}.sock"
                helpers.append(_start_virtiofsd(share, sock, spec.box_dir, i, jail))
                sockets.append(sock)
            shares = []
            for i, (sock, helper) in enumerate(zip(sockets, helpers, strict=True)):
                shares.append(_connect(sock, helper, spec.box_dir / f"fs{i}.log", files))
            if spec.network == "internet":
                net = network.isolate(spec.box_dir, spec.host_ports, spec.ports)
                helpers.append(net.pasta)
            fds = QemuFds(guest_end.fileno(), console.guest_end.fileno(),
                          qemu_monitor.fileno() if qemu_monitor else None, disks, shares)
            argv = self.argv(spec, fds, jail)
            bios, _ = self.features.boot_firmware()
            ram = [spec.ram_file] if spec.ram_file is not None else []
            ram_read_only = self._clone_ram_read_only(spec)
            readable = [spec.vmlinux, spec.initramfs, *([bios] if bios else []), *(ram if ram_read_only else [])]
            argv = jail.wrap(argv, spec.box_dir, readable=readable, writable=[] if ram_read_only else ram,
                             devices=(KVM_DEVICE,) if self.accel == "kvm" else ())
            # The network namespace is entered first, then the jail: each step execs the next, down to qemu.
            argv = (net.prefix if net else []) + argv
            log.debug("starting %s", " ".join(argv))
            proc = process.spawn(
                argv,
                pass_fds=tuple(fds.all() + ([state] if state is not None else []) + list(net.fds if net else ())),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(spec.box_dir / "qemu.log", "wb"),
                no_new_privs=jail_enabled(),
            )
            if qemu_monitor is not None:
                qemu_monitor.close()
                qemu_monitor = None
            qmp = Qmp(monitor) if monitor is not None else None
            if qmp is not None and state is not None:
                _restore(qmp, state)
            if net is not None:
                # While pasta started, so did qemu (and the restore): the policy's rules held from the start,
                # and the way out is there before the VM is handed over.
                net.wait_ready()
        except BaseException as exc:
            host_end.close()
            if monitor is not None:
                monitor.close()
            for helper in [proc, *helpers] if proc else helpers:
                helper.kill()
                process.reap(helper)
            if isinstance(exc, BoxError) and proc is not None:
                raise BoxError(f"{exc}; qemu said: {tail(5, spec.box_dir / 'qemu.log') or 'nothing'}") from None
            raise
        finally:
            guest_end.close()
            console.close_guest_end()
            if net is not None:
                net.close()
            if qemu_monitor is not None:
                qemu_monitor.close()
            for fd in files:
                os.close(fd)
        return QemuVM(proc, helpers, host_end, console, spec, qmp)


@dataclass(frozen=True)
class QemuFds:
    """The descriptors a qemu process inherits, by what it uses them for."""

    channel: int
    console: int
    monitor: int | None
    disks: list[list[int]]  # per disk: the descriptors of its fdset (read-only, and read-write if writable)
    shares: list[int]  # per share: a socket connected to its virtiofsd

    def all(self) -> list[int]:
        return [self.channel, self.console, *([self.monitor] if self.monitor is not None else []),
                *(fd for disk in self.disks for fd in disk), *self.shares]


def _open_disk(disk: Disk, files: list[int]) -> list[int]:
    """A disk's fdset: read-only, plus read-write for a writable disk (qemu reopens it read-only at times,
    and takes from the set the descriptor whose access mode matches)."""
    modes = [os.O_RDONLY] if disk.readonly else [os.O_RDWR, os.O_RDONLY]
    opened = []
    for mode in modes:
        try:
            fd = os.open(disk.path, mode | os.O_CLOEXEC)
        except OSError as exc:
            raise BoxError(f"cannot open the disk {disk.path}: {exc.strerror}") from None
        files.append(fd)
        opened.append(fd)
    return opened


def _connect(sock: Path, helper: subprocess.Popen[bytes], log_file: Path, files: list[int],
             timeout: float = 10.0) -> int:
    """A connection to the virtiofsd `helper` at `sock`. Its socket file exists from bind(), before listen():
    until then (or until the file appears) a connect is refused, so it is tried again while virtiofsd lives."""
    deadline = time.monotonic() + timeout
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(str(sock))
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            client.close()
            if helper.poll() is not None:
                raise BoxError(f"virtiofsd exited with {helper.returncode}: "
                               f"{log_file.read_text(errors='replace')[-1000:]}") from None
            if time.monotonic() > deadline:
                raise BoxError(f"virtiofsd did not listen at {sock} within {timeout:.0f} s: {exc}") from None
            time.sleep(0.005)
        except OSError as exc:
            client.close()
            raise BoxError(f"cannot connect to virtiofsd at {sock}: {exc}") from None
    fd = client.detach()
    files.append(fd)
    return fd


MIGRATION_TIMEOUT = 60.0  # saving is ~10 ms and loading ~40 ms (measured); a slow disk may take longer


def _ignore_shared(qmp: Qmp) -> None:
    """RAM in the shared file is not copied into the state stream: the state is small, the file is the RAM."""
    qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])


def _restore(qmp: Qmp, state: int) -> None:
    """Load the device state from `state`, a descriptor qemu inherited (a jailed qemu may not spawn `cat`)."""
    _ignore_shared(qmp)
    qmp.execute("migrate-incoming", uri=f"fd:{state}")
    qmp.wait_migration(MIGRATION_TIMEOUT)


def _start_virtiofsd(share: Share, sock: Path, box_dir: Path, index: int, jail: Jail) -> subprocess.Popen[bytes]:
    """virtiofsd for share `index` of the box in `box_dir`, listening at `sock`: unprivileged in a user
    namespace of its own where the jail allows it (fsjail.py), else with the runner's uid."""
    binary = find_virtiofsd()
    help_text = _help_text(binary)
    source, wrapper, extra = share.host, [], []
    jailed = virtiofsd_prefix(jail, box_dir, index, share.host, sock, share.readonly or share.tree is not None)
    if share.tree is not None:
        wrapper = _composed_tree_wrapper(share)
    if jailed is not None:
        # The share (read-only if it is) is at fsjail's mount point, and the socket its descriptor.
        source, wrapper = Path(MOUNT_POINT), [*wrapper, *jailed]
    elif share.readonly and share.tree is None:
        # Enforced on the host: the guest controls its own mount flags, so they prove nothing.
        if os.geteuid() == 0 and shutil.which("unshare"):
            # A read-only bind of the directory in a mount namespace of the server's own. Bound onto another
            # directory, not onto itself: the server's socket may live below the shared directory (a runtime
            # home inside the project) and must stay writable.
            view = box_dir / f"view{index}"
            view.mkdir(parents=True, exist_ok=True)
            source = view
            script = 'mount --bind -o ro "$0" "$1" && shift && exec "$@"'
            wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(share.host),
                       str(view)]
        elif "--readonly" in help_text:
            extra = ["--readonly"]
        else:
            raise EngineUnavailable(
                f"cannot share {share.host} read-only: this virtiofsd has no --readonly and binding it read-only "
                "needs root; run as root, install a newer virtiofsd, or share the volume read-write"
            )
    socket_arg = [] if jailed is not None else [f"--socket-path={sock}"]
    # A composed view of the host (the host image's root) is read by everything the box runs: let the guest
    # cache it. Volumes are not cached: the host may change their files while the box runs.
    cached = share.tree is not None
    if "--shared-dir" in help_text:  # the Rust virtiofsd (Debian 13)
        argv = [binary, *socket_arg, f"--shared-dir={source}", f"--cache={'always' if cached else 'never'}", *extra]
        if os.geteuid() != 0:
            argv.append("--sandbox=none")
        if "--seccomp" in help_text and jail_enabled():
            argv.append("--seccomp=kill")  # its default; said, so that no setting elsewhere weakens it
        if "--no-announce-submounts" in help_text:
            # Announced mount points (its default) reach the agent's virtiofs mount as automount points it
            # cannot follow: every path below one (the host image's binds, a mount inside a volume) failed
            # with EREMOTE ("Object is remote"). Unannounced, they read as part of the one shared tree.
            argv.append("--no-announce-submounts")
    else:  # the C virtiofsd bundled with qemu 7.2
        argv = [binary, *socket_arg, "-o", f"source={source}", "-o", f"cache={'always' if cached else 'none'}"]
        if jailed is not None:
            # Its default raises the descriptor limit to 1M: a user namespace may not raise the hard limit.
            argv.append("--rlimit-nofile=0")
    argv = [*wrapper, *argv]
    log.debug("starting %s", " ".join(argv))
    return process.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(box_dir / f"fs{index}.log", "wb"), no_new_privs=jail_enabled())


@functools.lru_cache(maxsize=4)
def _help_text(binary: str) -> str:
    """What a virtiofsd accepts (C or Rust flavour, --readonly): asked once, not at every boot."""
    return subprocess.run([binary, "--help"], capture_output=True, text=True).stdout


def _composed_tree_wrapper(share: Share) -> list[str]:
    """Build `share.tree` on `share.host` in a private mount namespace that only the file server sees."""
    tree = share.tree
    assert tree is not None
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise EngineUnavailable(
            "the host image needs root here: its read-only view of the host is built with bind mounts in a "
            "private mount namespace; run as root, or use another image"
        )
    q = shlex.quote
    root = str(share.host)
    lines = ["set -e", f"mount -t tmpfs -o mode=0755 boxlite-view {q(root)}", f"touch {q(root)}/.boxlite-empty"]
    for path in tree.binds:
        lines.append(f"mkdir -p {q(root + path)} && mount --bind -o ro {q(path)} {q(root + path)}")
    for path, target in tree.symlinks:
        lines.append(f"ln -s {q(target)} {q(root + path)}")
    for path in tree.dirs:
        lines.append(f"mkdir -p {q(root + path)}")
    for path in tree.masks:
        # An empty read-only tmpfs over a directory, the empty file over a file: nothing to read below.
        masked = q(root + path)
        lines.append(f"if [ -d {masked} ]; then mount -t tmpfs -o ro,mode=0755,size=4k none {masked}; "
                     f"elif [ -e {masked} ]; then mount --bind -o ro {q(root)}/.boxlite-empty {masked}; fi")
    lines.append(f"mount -o remount,ro {q(root)}")
    lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh"]


class QemuVM(ProcessVM):
    def __init__(self, proc: subprocess.Popen[bytes], helpers: list[subprocess.Popen[bytes]], channel: socket.socket,
                 console: ConsoleLog, spec: LaunchSpec, qmp: Qmp | None = None) -> None:
        super().__init__(proc, helpers, channel, spec)
        self.console = console
        self.qmp = qmp

    def save(self, state: Path) -> None:
        if self.qmp is None:
            raise BoxError("this VM was not started for snapshots (LaunchSpec.ram_file)")
        # Not stopped first: the migration pauses the VM at its end, and restored copies start running.
        tmp = state.with_name(state.name + ".tmp")
        _ignore_shared(self.qmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self.qmp.send_fd("state", fd)  # written by qemu through a descriptor: a jailed qemu cannot open it
        finally:
            os.close(fd)
        self.qmp.execute("migrate", uri="fd:state")
        self.qmp.wait_migration(MIGRATION_TIMEOUT)
        os.replace(tmp, state)

    def kill(self) -> None:
        super().kill()
        if self.qmp is not None:
            self.qmp.close()

    def console_tail(self, lines: int = 30) -> str:
        if self.proc.poll() is not None:
            self.console.join()  # the panic message may still be on its way
        text = self.console.tail(lines)
        qemu_log = tail(5, self.spec.box_dir / "qemu.log")
        return text + (f"\n[qemu] {qemu_log}" if qemu_log else "")
