"""The VMM jail: how a box's qemu is confined on the host (docs/security-vmm.md).

Four parts, each applied when the host allows it and reported by `status()` (`boxlite doctor`) when not:

- seccomp: qemu's own filter (`-sandbox on,...`: no obsolete syscalls, no setuid/setgid, no fork/exec,
  no scheduler or resource changes);
- no_new_privs: set in the child before its first exec (vmm/process.py), kept by everything it execs;
- an unprivileged uid when the runner is root: each box its own uid (and gid) in a range nothing else
  uses, plus one group shared by jailed VMMs, the group of template RAM files (see `ram_file_mode`);
- a mount namespace holding only what the VM needs: qemu's /usr (binaries, libraries, firmware), a few
  device nodes, the kernel and initramfs, the box's own directory and the RAM file of its snapshot
  (read-only for a restored clone where qemu can open it so), all at their host paths (a template and
  its restored clones see the same paths). Disks, sockets and the snapshot state reach qemu as open file
  descriptors, not as paths. When the runner is not root, the namespace is made inside an unprivileged
  user namespace whose only uid is the runner's.

virtiofsd has its own sandbox; when the runner is root it runs as another uid of the range, root of a user
namespace of its own only (`virtiofsd_prefix`, fsjail.py).

The namespace and the uid change are made by util-linux tools exec'd in turn by the child, so that the
process the runtime started *is* qemu (its pid, exit status and memory are qemu's): `unshare` (a private
mount namespace), `sh` running mount/pivot_root (the new root), `setpriv` (the uid, no capabilities, and
the parent-death signal again: the kernel clears it when the uid changes, and a VMM must not outlive its
runner). qemu's `-runas` is not used for that reason: it drops the uid after start-up, and the
parent-death signal with it.

`BOXLITE_JAIL=0` turns the jail off (debugging, the A/B benchmark); it is on by default.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..errors import BoxError, ConfigError
from .qemu_features import QemuFeatures

log = logging.getLogger(__name__)

ENV = "BOXLITE_JAIL"
UID_ENV = "BOXLITE_JAIL_UID_BASE"
# systemd leaves 0x70000000-0x7ffeffff unassigned (docs/UIDS-GIDS.md); boxes take uids BASE+1..BASE+UID_SPAN
# and the group BASE is shared by all jailed VMMs.
DEFAULT_UID_BASE = 0x70000000
UID_SPAN = 1 << 24
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# The filter's options a qemu must know for the jail to use it.
SANDBOX_OPTIONS = tuple(option.partition("=")[0] for option in SECCOMP.split(","))
ROOT_DIR = "jail"  # below the box directory: the mount point of the new root, inside the namespace only
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
# qemu's own files: on Debian everything is below /usr, the rest are links into it (merged /usr).
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64")
TOOLS = ("unshare", "mount", "umount", "pivot_root", "setpriv")
TOOLS_PACKAGES = "util-linux and mount"
FSJAIL = Path(__file__).with_name("fsjail.py")  # virtiofsd's jail step, run as a script (its docstring)


def enabled() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("1", "on", "yes", "true", ""):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    raise ConfigError(f"{ENV}={value!r}: say 1 (the default: qemu runs confined) or 0 (not confined, for debugging)")


def uid_base() -> int:
    raw = os.environ.get(UID_ENV)
    if raw is None:
        return DEFAULT_UID_BASE
    try:
        base = int(raw, 0)
    except ValueError:
        base = -1
    if not 1000 <= base <= 0xFFFFFFFE - UID_SPAN:
        raise ConfigError(f"{UID_ENV}={raw!r}: give the first of {UID_SPAN + 1} unused uids (and gids), "
                          f"e.g. {DEFAULT_UID_BASE:#x}")
    return base


@functools.lru_cache(maxsize=1)
def namespace_problem() -> str | None:
    """Why qemu cannot get a mount namespace and a uid of its own here, or None (asked once per process)."""
    problem = _namespace_problem()
    if problem and os.geteuid() == 0:
        log.warning("qemu runs as root, without a mount namespace: %s", problem)
    return problem


def _box_uid(base: int, key: str) -> int:
    """A uid in BASE+1..BASE+UID_SPAN from `key`: no allocation to keep or release. Two of n keys in use at
    once share a uid with odds of about n^2 / 2^25 (1 in 300 000 for 10 boxes, 1 in 3 000 for 100)."""
    return base + 1 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % UID_SPAN


@functools.lru_cache(maxsize=32)
def _idmap_problem(device: int, source: str) -> str | None:
    done = subprocess.run([sys.executable, "-I", "-S", str(FSJAIL), "--probe", source], capture_output=True,
                          text=True, timeout=30)
    if done.returncode:
        problem = f"no idmapped mount of {source} ({done.stderr.strip()[:200] or done.returncode})"
        log.warning("virtiofsd runs as root for %s: %s", source, problem)
        return problem
    return None


def idmap_problem(source: Path) -> str | None:
    """Why virtiofsd cannot serve `source` unprivileged here, or None (asked once per file system)."""
    return _idmap_problem(os.stat(source).st_dev, str(source))


def _user_namespace_limits() -> str:
    """The sysctls that allow or forbid unprivileged user namespaces, as this kernel has them."""
    said = []
    for name in ("kernel/unprivileged_userns_clone", "user/max_user_namespaces",
                 "kernel/apparmor_restrict_unprivileged_userns"):
        try:
            said.append(f"{name.replace('/', '.')}={Path('/proc/sys', name).read_text().strip()}")
        except OSError:
            pass
    return ", ".join(said) or "no user namespace sysctls found"


def _namespace_problem() -> str | None:
    tools = [t for t in TOOLS if not process.which(t)]
    if tools:
        return f"{', '.join(tools)} missing: install {TOOLS_PACKAGES}"
    command = [*_unshare(), "true"]
    try:  # a container without CAP_SYS_ADMIN has root but no mount namespaces
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(command)}` failed: {exc}"
    if not done.returncode:
        return None
    if os.geteuid() == 0:
        return f"`unshare --mount` failed ({done.stderr.strip()[:200]}): run with CAP_SYS_ADMIN"
    return (f"the kernel refuses an unprivileged user namespace ({done.stderr.strip()[:200]}; "
            f"{_user_namespace_limits()}): allow them (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces>0) or run as root; qemu sees the file system your uid sees")


def _unshare() -> list[str]:
    """The command that makes qemu's mount namespace: as root, a mount namespace; else inside a user
    namespace whose root is the runner (the only uid it maps), which may mount there and nowhere else."""
    user = ["--user", "--map-root-user"] if os.geteuid() != 0 else []
    return ["unshare", *user, "--mount", "--propagation", "private"]


@dataclass(frozen=True)
class Part:
    """One part of the jail: whether it is active here, and what it does or why it is missing."""

    name: str
    active: bool
    detail: str


def status(features: QemuFeatures) -> list[Part]:
    """What the jail of a box's qemu (whose probed `features` these are) is on this host."""
    seccomp_available = features.has_sandbox(SANDBOX_OPTIONS)
    if not enabled():
        return [Part("all", False, f"turned off by {ENV}=0: qemu runs with the runner's uid and file system")]
    problem = namespace_problem()
    root = os.geteuid() == 0
    parts = [
        Part("seccomp", seccomp_available,
             f"qemu -sandbox {SECCOMP}" if seccomp_available
             else "this qemu was built without seccomp (no -sandbox): install Debian's qemu-system-x86"),
        Part("no_new_privs", True, "set before qemu and virtiofsd start"),
        Part("template RAM", features.private_ram_read_only(),
             "a restored box's qemu opens its template's RAM file read-only (readonly=on,rom=off)"
             if features.private_ram_read_only() else
             "a restored box's qemu opens its template's RAM file read-write (this qemu has no rom= option, "
             "8.2+): a compromised one could change what later clones of its template start from"),
    ]
    view = "qemu sees /usr, its kernel, its box directory and its snapshot's RAM file only"
    if not root:
        parts.append(Part("uid", True, f"qemu runs as your uid {os.geteuid()} (not root: no change needed)"))
        parts.append(Part("mount namespace", problem is None,
                          problem or f"{view} (in a user namespace whose root is your uid, no capabilities)"))
        parts.append(Part("virtiofsd", True, "its own seccomp filter; your uid"))
        return parts
    if problem:
        parts.append(Part("uid", False, f"qemu runs as root: {problem}"))
        parts.append(Part("mount namespace", False, problem))
        parts.append(Part("virtiofsd", False, f"runs as root, with its own seccomp filter and namespace sandbox: "
                                              f"{problem}"))
        return parts
    base = uid_base()
    parts.append(Part("uid", True, f"each box's qemu its own uid in {base + 1}..{base + UID_SPAN} "
                                   f"(set {UID_ENV} to move the range)"))
    parts.append(Part("mount namespace", True, view))
    parts.append(Part("virtiofsd", True, "its own seccomp filter and namespace sandbox (its root is the shared "
                                         "directory), as another uid of the range, root of a user namespace "
                                         "only; as root where a share's file system has no idmapped mounts"))
    return parts


@dataclass(frozen=True)
class Jail:
    """The confinement of one box's qemu. `for_box()` makes it; qemu.py asks it for qemu options, file
    modes, and the argv prefix that starts qemu inside it."""

    seccomp: bool
    uid: int | None  # None: keep the runner's uid
    group: int | None  # the group shared by jailed VMMs (template RAM files)
    mount_root: Path | None  # None: no mount namespace
    user_namespace: bool = False  # the runner is not root: the mount namespace is in a user namespace

    def qemu_options(self) -> list[str]:
        return ["-sandbox", SECCOMP] if self.seccomp else []

    def prepare_ram_file(self, path: Path, create: bool) -> None:
        """Make `path` (`create`: a new template's) a RAM file every jailed qemu of its template can open
        (qemu 7.2 opens it read-write even to map it copy-on-write): the runner's, read-write for the jail
        group only. A new one is made here in any mount namespace: qemu finds it bound there."""
        if self.group is None and not (create and self.mount_root is not None):
            return
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o660 if self.group is not None else 0o600)
        try:
            if self.group is not None:
                os.fchown(fd, -1, self.group)
                os.fchmod(fd, 0o660)
        finally:
            os.close(fd)

    def wrap(self, argv: list[str], box_dir: Path, readable: Iterable[Path], writable: Iterable[Path],
             devices: Iterable[str] = ()) -> list[str]:
        """`argv` run in the jail: `readable` files bound read-only at their paths, `writable` ones
        read-write (the RAM file), `box_dir` read-only, and `devices` beside the usual few."""
        prefix: list[str] = []
        readable = list(readable)
        if self.uid is not None:
            for path in readable:
                st = os.stat(path)
                if not (st.st_mode & 0o004 or st.st_gid == self.group and st.st_mode & 0o040):  # a RAM file
                    raise BoxError(f"qemu runs as uid {self.uid} in its jail and cannot read {path}: make it "
                                   f"readable by others (`chmod o+r {path}`), or turn the jail off ({ENV}=0)")
        if self.mount_root is not None:
            self.mount_root.mkdir(exist_ok=True)
            script = _root_script(self.mount_root, box_dir, readable, list(writable),
                                  (*DEVICES, *devices), argv[0])
            prefix = [*_unshare(), "sh", "-c", script, "boxlite-jail"]
        if self.uid is not None:
            groups = [self.group, *(os.stat(d).st_gid for d in devices)]
            prefix += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}",
                       f"--groups={','.join(str(g) for g in groups)}", "--inh-caps=-all", "--bounding-set=-all",
                       "--nnp", "--pdeathsig=SIGKILL", "--"]
        elif self.user_namespace:  # root of its user namespace: the capabilities it had there go
            prefix += ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--nnp", "--pdeathsig=SIGKILL", "--"]
        return [*prefix, *argv]


def virtiofsd_prefix(jail: Jail, box_dir: Path, index: int, source: Path, sock: Path, readonly: bool
                     ) -> list[str] | None:
    """The argv prefix that starts virtiofsd for `source` (share `index` of the box) unprivileged and makes
    its listening socket at `sock` (fsjail.py); None where it runs with the runner's uid: the runner is not
    root (nothing to drop), the jail is off, or the file system has no idmapped mounts.

    Its uid is not its qemu's: a qemu with the same uid could ptrace it and use its capabilities."""
    if jail.uid is None or idmap_problem(source) is not None:
        return None
    uid = _box_uid(uid_base(), f"{box_dir}/fs{index}")
    return [sys.executable, "-I", "-S", str(FSJAIL), str(source), str(sock), str(uid), str(uid),
            "1" if readonly else "0", "--"]


def for_box(box_dir: Path, seccomp_available: bool) -> Jail:
    """The jail of the box in `box_dir` on this host (all off with BOXLITE_JAIL=0)."""
    if not enabled():
        return Jail(False, None, None, None)
    if namespace_problem():
        return Jail(seccomp_available, None, None, None)
    if os.geteuid() != 0:
        return Jail(seccomp_available, None, None, box_dir / ROOT_DIR, user_namespace=True)
    base = uid_base()
    return Jail(seccomp_available, _box_uid(base, str(box_dir)), base, box_dir / ROOT_DIR)


def _fstab_path(path: str) -> str:
    """`path` as an fstab field: whitespace and backslashes octal-escaped."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _root_script(root: Path, box_dir: Path, readable: list[Path], writable: list[Path], devices: tuple[str, ...],
                 binary: str) -> str:
    """The shell script that builds the new root on a tmpfs at `root`, pivots into it and execs "$@".

    The binds are one `mount -a` of an fstab the runtime writes beside the root (`jail.fstab`): one process
    for all of them, where a `mount` each cost ~2 ms apiece under load."""
    q = shlex.quote
    r = str(root)
    dirs: list[str] = ["/proc", "/.old"]
    files: list[str] = []
    fstab: list[str] = []
    bound: list[str] = []
    links: list[str] = []

    def covered(path: str) -> bool:
        return any(path == b or path.startswith(b + "/") for b in bound)

    def bind(path: str, options: str) -> None:
        if os.path.isdir(path):
            dirs.append(path)
        else:
            dirs.append(os.path.dirname(path))
            files.append(path)
        fstab.append(f"{_fstab_path(path)} {_fstab_path(r + path)} none bind,{options} 0 0")
        bound.append(path)

    qemu_dir = os.path.dirname(os.path.realpath(binary))
    for path in (*SYSTEM, qemu_dir):  # qemu_dir: a qemu of its own (BOXLITE_QEMU) outside /usr
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            links.append(f"ln -s {q(os.readlink(path))} {q(r + path)}")
        elif os.path.isdir(path) and not covered(path):
            bind(path, "ro,nosuid")
    bind(str(box_dir), "ro,nosuid,nodev,noexec")
    for path in map(str, readable):
        if not covered(path):
            bind(path, "ro,nosuid,nodev,noexec")
    for path in map(str, writable):
        bind(path, "rw,nosuid,nodev,noexec")
    for dev in devices:
        bind(dev, "rw,nosuid,noexec")
    # umount reads /proc/self/mountinfo: /proc is there while the old root is detached, then goes. A bind
    # of the host's, not a new one: a user namespace may not mount a proc of a pid namespace it does not own.
    fstab.append(f"/proc {_fstab_path(r)}/proc none rbind 0 0")
    fstab_file = root.with_name(root.name + ".fstab")
    fstab_file.write_text("\n".join(fstab) + "\n")
    lines = ["set -e", f"mount -t tmpfs -o mode=0755,size=1m boxlite-jail {q(r)}",
             "mkdir -p " + " ".join(q(r + d) for d in sorted(set(dirs))),
             *links, *(f": > {q(r + f)}" for f in files),
             f"mount -a -T {q(str(fstab_file))}",
             f"cd {q(r)}", "pivot_root . .old", "umount -l /.old", "umount -l /proc", "rmdir /proc /.old",
             "mount -o remount,ro,bind /", 'exec "$@"']
    return "\n".join(lines)


__all__ = ["ENV", "Jail", "Part", "SANDBOX_OPTIONS", "SECCOMP", "enabled", "for_box", "status"]
