"""The `boxlite` command: manage the image cache and the runtime home, and check the host.

    boxlite images pull REF [--progress] [--insecure-registry HOST]
    boxlite images ls
    boxlite images rm REF...
    boxlite images prune [--older-than DAYS] [--max-size GB]
    boxlite cache ls | path | prune [--max-size SIZE] [--older-than DAYS] [--all]
    boxlite doctor
    boxlite setup [--no-install]

This module prints; the library it calls only logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from vmm import cache
from vmm.errors import BoxliteError
from vmm.home import Home
from vmm.log import enable_from_env

if TYPE_CHECKING:
    from vmm.images.store import IndexEntry

# ---------------------------------------------------------------- output helpers


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def ago(ts: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return "just now"


class LayerProgress:
    """One line per layer, rewritten in place: `<digest>  12.3 MB / 45.6 MB`."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.current = ""
        self.last = 0.0

    def bytes(self, layer: str, done: int, total: int) -> None:
        now = time.monotonic()
        if layer != self.current:
            if self.current:
                self.stream.write("\n")
            self.current = layer
        elif now - self.last < 0.1 and done < total:
            return
        self.last = now
        self.stream.write(f"\r{layer}  {human(done)} / {human(total)}")
        self.stream.flush()

    def message(self, text: str) -> None:
        if text.startswith("pulling "):  # the byte counter says that
            return
        if self.current:
            self.stream.write("\n")
            self.current = ""
        print(text, file=self.stream, flush=True)


# ---------------------------------------------------------------- images


def cmd_pull(args: argparse.Namespace, home: Home) -> int:
    from vmm.images import reference
    from vmm.images.pull import import_local, pull

    ref = reference.parse(args.ref)
    show = args.progress or sys.stdout.isatty()
    bar = LayerProgress() if show else None
    started = time.monotonic()
    if isinstance(ref, reference.RegistryRef):
        entry = pull(ref, home.root, insecure=args.insecure_registry,
                     progress=bar.message if bar else None, on_bytes=bar.bytes if bar else None)
    else:
        entry = import_local(ref, home.root, progress=bar.message if bar else None)
    if bar and bar.current:
        print()
    print(f"{entry.ref}\n  digest:   {entry.digest}\n  image id: {entry.image_id}\n"
          f"  ({time.monotonic() - started:.1f} s)")
    return 0


def _entry_size(home: Home, entry: IndexEntry) -> int:
    from vmm.images import base_path
    from vmm.images.store import BlobStore, disk_usage

    store = BlobStore(home.images)
    return disk_usage(base_path(home.root, entry.image_id)) + sum(disk_usage(store.path(b)) for b in entry.blobs)


def cmd_ls(args: argparse.Namespace, home: Home) -> int:
    from vmm.images.store import ImageIndex

    entries = sorted(ImageIndex(home.images).entries().values(), key=lambda e: e.last_used, reverse=True)
    rows = [("REF", "DIGEST", "SIZE", "LAST USED")]
    for e in entries:
        rows.append((e.ref, e.digest.split(":")[-1][:12], human(_entry_size(home, e)), ago(e.last_used)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _normalise(text: str) -> str:
    """The index key for what the user typed (`alpine` -> `docker.io/library/alpine:latest`)."""
    from vmm.images import reference
    from vmm.images.rootfs import DIR_PREFIX, parse_dir_spec

    if text in ("default", "") or text.startswith("sha256:"):
        return text or "default"
    if text.startswith(DIR_PREFIX):
        return f"{DIR_PREFIX}{parse_dir_spec(text)}"
    return str(reference.parse(text))


def cmd_rm(args: argparse.Namespace, home: Home) -> int:
    from vmm.images.store import ImageIndex, collect_garbage

    index = ImageIndex(home.images)
    missing = []
    for text in args.refs:
        key = _normalise(text)
        if index.remove(key) is None:
            missing.append(text)
        else:
            print(f"removed {key}")
    freed = collect_garbage(home.root)
    print(f"freed {human(freed)}")
    for text in missing:
        print(f"error: no image {text!r} in the cache (`boxlite images ls` lists them)", file=sys.stderr)
    return 1 if missing else 0


def cmd_prune(args: argparse.Namespace, home: Home) -> int:
    from vmm.images.store import ImageIndex, collect_garbage

    index = ImageIndex(home.images)
    entries = sorted(index.entries().values(), key=lambda e: e.last_used)  # least recently used first
    now = time.time()
    doomed = []
    if args.older_than is not None:
        doomed += [e for e in entries if now - e.last_used > args.older_than * 86400]
    if args.max_size is not None:
        left = [e for e in entries if e not in doomed]
        total = sum(_entry_size(home, e) for e in left)
        for e in left:
            if total <= args.max_size * 1e9:
                break
            doomed.append(e)
            total -= _entry_size(home, e)
    for e in doomed:
        index.remove(e.ref)
        print(f"removed {e.ref}")
    freed = collect_garbage(home.root)
    # Snapshot templates, volume images and the like are rebuilt on demand: those unused for a day go (or
    # --older-than). `boxlite cache prune` bounds them by size.
    max_age = 86400 * (args.older_than if args.older_than is not None else 1)
    freed += cache.evict(home.root, None, older_than_s=max_age).freed + cache.sweep(home.root)
    print(f"freed {human(freed)}")
    return 0


# ---------------------------------------------------------------- cache


def cmd_cache_ls(args: argparse.Namespace, home: Home) -> int:
    entries = sorted(cache.entries(home.root), key=lambda e: e.last_used, reverse=True)
    rows = [("KIND", "SIZE", "LAST USED", "NAME", "FOR")]
    for e in entries:
        rows.append((e.kind, cache.format_size(e.size), ago(e.last_used), e.path.name[:16], e.what or "?"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]]).rstrip())
    size = cache.home_size(home.root)
    cap = cache.cache_max(home.root, size)
    print(f"{len(entries)} entries, {cache.format_size(sum(e.size for e in entries))}; the home takes "
          f"{cache.format_size(size)} of its {cache.format_size(cap.bytes)} cap ({cap.source})")
    return 0


def cmd_cache_path(args: argparse.Namespace, home: Home) -> int:
    print(home.root)
    return 0


def cmd_cache_prune(args: argparse.Namespace, home: Home) -> int:
    swept = cache.sweep(home.root)
    max_bytes = cache.parse_size(args.max_size, "--max-size") if args.max_size is not None else None
    if max_bytes is None and args.older_than is None and not args.all:
        max_bytes = cache.cache_max(home.root).bytes
    result = cache.evict(home.root, max_bytes, older_than_s=args.older_than * 86400 if args.older_than is not None
                         else None, everything=args.all)
    for e in result.removed:
        print(f"removed {e.kind} {e.path.name[:16]} ({cache.format_size(e.size)}, {e.what or '?'})")
    for e in result.busy:
        print(f"kept {e.kind} {e.path.name[:16]}: in use by a running process or a kept box")
    print(f"freed {cache.format_size(result.freed + swept)}; the home takes {cache.format_size(result.size_after)}")
    return 0


def add_cache_commands(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """The `cache` command, added with `add_parser` of the top-level subcommands."""
    p = add_parser("cache", help="the runtime home: snapshot templates, boot snapshots, volume images, "
                                     "ext4 bases and kernel builds, and its size cap",
                       description=f"Everything in the runtime home that is rebuilt on demand. The home is kept "
                       f"under a cap (${cache.ENV}, e.g. 10G, else cache_max in HOME/{cache.CONFIG_NAME}, else "
                       f"{cache.format_size(cache.DEFAULT_MAX)} or half the file system's room if less): the least "
                       "recently used entries no running process uses are evicted when a run ends. Pulled images "
                       "count towards the home's size; `boxlite images prune` removes those.")
    cmds = p.add_subparsers(dest="cache_command", required=True)
    cmds.add_parser("ls", help="list cache entries: kind, size on disk, last use, what each is for"
                    ).set_defaults(func=cmd_cache_ls)
    cmds.add_parser("path", help="print the runtime home's path").set_defaults(func=cmd_cache_path)
    about = ("remove entries no running process uses (default: the least recently used, until the home is under "
             "its cap), and leftovers of interrupted runs")
    prune = cmds.add_parser("prune", help=about, description=about)
    prune.add_argument("--max-size", metavar="SIZE", help="until the home is under SIZE (e.g. 2G, 500M)")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="those unused for DAYS days")
    prune.add_argument("--all", action="store_true", help="all of them")
    prune.set_defaults(func=cmd_cache_prune)


# ---------------------------------------------------------------- doctor


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn_only: bool = False  # a slow path, not a failure (no hardware KVM)

    @property
    def label(self) -> str:
        return "OK  " if self.ok else "WARN" if self.warn_only else "FAIL"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def _check(name: str, probe: Callable[[], str], fix: str = "") -> Check:
    try:
        return Check(name, True, probe())
    except BoxliteError as e:
        return Check(name, False, str(e).splitlines()[0], fix)
    except Exception as e:  # noqa: BLE001 - a diagnostic tool reports, it does not crash
        return Check(name, False, f"{type(e).__name__}: {e}", fix)


def doctor_checks(home: Home) -> list[Check]:
    from vmm import engines, kernel
    from vmm.engines import network
    from vmm.engines.qemu import find_qemu, find_virtiofsd
    from vmm.engines.qemu_features import probe

    checks = []
    kvm = engines.kvm_status()
    checks.append(Check("KVM", kvm.usable, f"{kvm.kind}: {kvm.reason}",
                        "" if kvm.usable else "none needed: VMs run under TCG (slower); see docs/engines.md",
                        warn_only=True))
    checks.append(_check("engine", lambda: engines.select("auto").describe(), "install qemu: `sudo boxlite setup`"))
    checks.append(_check("qemu", lambda: f"{find_qemu()} ({_version([find_qemu(), '--version'])}); "
                                         f"{probe(find_qemu()).describe()}",
                         "sudo apt-get install qemu-system-x86 (or set BOXLITE_QEMU)"))
    checks.append(_check("kernel", lambda: str(kernel.find_kernel().image),
                         "sudo apt-get install linux-image-cloud-amd64 (or set BOXLITE_KERNEL)"))
    checks.append(_check("virtiofsd", find_virtiofsd,
                         "Debian 13: sudo apt-get install virtiofsd; Debian 12: it comes with qemu-system-x86"))
    checks += _jail_checks()
    busybox = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else "")
    checks.append(Check("busybox", bool(busybox), busybox or "not found", "sudo apt-get install busybox-static"))
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    checks.append(Check("mkfs.ext4", bool(mkfs), mkfs or "not found", "sudo apt-get install e2fsprogs"))
    checks.append(_check("network", network.readiness,
                         "sudo boxlite setup (apt-get install passt nftables); without it, boxes need "
                         "network='full' or 'none'"))
    checks.append(_cache_check(home))
    checks.append(_home_check(home))
    checks.append(_snapshot_check(home))
    return checks


def _jail_checks() -> list[Check]:
    """Which parts of the VMM jail are active, and why any is not: a warning, not a failure."""
    from vmm.engines import jail
    from vmm.engines.qemu import find_qemu
    from vmm.engines.qemu_features import probe

    try:
        parts = jail.status(probe(find_qemu()))
    except BoxliteError as exc:
        return [Check("jail", False, str(exc).splitlines()[0], "see the qemu check above", warn_only=True)]
    return [Check(f"jail: {p.name}", p.active, p.detail, "see docs/security-vmm.md", warn_only=True) for p in parts]


def _snapshot_check(home: Home) -> Check:
    from vmm import engines

    try:
        engine = engines.select("auto")
    except BoxliteError as exc:
        return Check("snapshots", False, f"no engine: {exc}", "see the engine check above", warn_only=True)
    templates = [p for p in home.templates.iterdir() if (p / "template.json").exists()]
    size = sum(f.stat().st_blocks * 512 for p in templates for f in p.iterdir())
    if not engine.snapshots:
        return Check("snapshots", False, f"not with {engine.name}: boxes are booted (scope=test ones ahead of need)",
                     "none needed; engine='qemu' has them", warn_only=True)
    return Check("snapshots", True, f"{engine.name}: boxes are restored from boot snapshots, scope=test ones from "
                                    f"templates ({len(templates)} cached, {human(size)} on disk)")


def _home_check(home: Home, largest: int = 3) -> Check:
    """The home's size against its cap, and the entries that take the most."""
    size = cache.home_size(home.root)
    try:
        cap = cache.cache_max(home.root, size)
    except BoxliteError as exc:
        return Check("home", False, str(exc), f"fix ${cache.ENV} or {home.root / cache.CONFIG_NAME}")
    top = sorted(cache.entries(home.root), key=lambda e: e.size, reverse=True)[:largest]
    detail = (f"{cache.format_size(size)} of its {cache.format_size(cap.bytes)} cap ({cap.source})"
              + ("; largest: " + ", ".join(f"{e.kind} {e.path.name[:12]} {cache.format_size(e.size)}"
                                           for e in top) if top else ""))
    return Check("home", size <= cap.bytes, detail, "`boxlite cache prune`, or raise the cap: "
                 f"${cache.ENV}=20G or cache_max in {home.root / cache.CONFIG_NAME}", warn_only=True)


def _cache_check(home: Home) -> Check:
    from vmm.images import base_path
    from vmm.images.ext4 import is_valid_base
    from vmm.images.store import ImageIndex

    if not os.access(home.root, os.W_OK):
        return Check("cache", False, f"{home.root} is not writable", "fix its owner, or set BOXLITE_HOME")
    entries = list(ImageIndex(home.images).entries().values())
    # A missing base is not broken: evicted under the home's cap, it is rebuilt on next use.
    bases = [base_path(home.root, e.image_id) for e in entries]
    broken = [e.ref for e, base in zip(entries, bases, strict=True) if base.exists() and not is_valid_base(base)]
    partial = list((home.images / "blobs" / "partial").glob("*"))
    free = shutil.disk_usage(home.root).free
    detail = f"{home.root}: {len(entries)} images, {len(partial)} partial downloads, {human(free)} free"
    if broken:
        return Check("cache", False, detail + f"; bases damaged: {', '.join(broken)}",
                     "they are rebuilt on next use; or `boxlite images rm REF`")
    if free < 2e9:
        return Check("cache", False, detail, "free disk space: `boxlite cache prune --max-size 2G`, "
                                             "`boxlite images prune --max-size 5`")
    return Check("cache", True, detail)


def cmd_doctor(args: argparse.Namespace, home: Home) -> int:
    checks = doctor_checks(home)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.label}  {c.name.ljust(width)}  {c.detail}")
        if not c.ok and c.fix:
            print(f"      {' ' * width}  fix: {c.fix}")
    # no hardware KVM is a slow path, not a failure: everything else must pass
    if all(c.ok or c.warn_only for c in checks):
        slow = [c.name for c in checks if not c.ok]
        print("ready: this host runs boxes" + (f" (with warnings: {', '.join(slow)})" if slow else ""))
        return 0
    print("not ready: fix what FAIL says above, then run `boxlite doctor` again")
    return 1


# ---------------------------------------------------------------- setup

SETUP_MISSING_PACKAGES = 3  # exit status: system packages are missing and were not installed


def cmd_setup(args: argparse.Namespace, home: Home) -> int:
    """The one command after `pip install`: system packages, the default image, its boot snapshot, doctor."""
    from vmm import agent, engines, hostpackages

    def step(text: str) -> None:
        print(f"\n== {text}", flush=True)

    user = _sudo_user()
    os.environ["BOXLITE_HOME"] = str(home.root)  # what resolves the home by itself (a checkout's agent) uses it too
    try:
        kvm = engines.kvm_status()
        print(f"virtualization: {'KVM' if kvm.usable else 'none usable, VMs run under TCG (slower)'} ({kvm.reason})")
        step("system packages")
        # The wheel ships the agent; a checkout or an sdist compiles it, which needs a C toolchain.
        agent_ships = bool(os.environ.get("BOXLITE_AGENT")) or agent.PACKAGED.is_file()
        groups = (hostpackages.RUNTIME,) if agent_ships else (hostpackages.RUNTIME, hostpackages.AGENT)
        install = hostpackages.is_root() and not args.no_install
        if not hostpackages.ensure(groups, install, lambda text: print(text, flush=True)):
            print("then run `boxlite setup` again", file=sys.stderr)
            return SETUP_MISSING_PACKAGES
        step("the default image")
        _setup_image(home)
        step("its boot snapshot")
        _setup_boot_snapshot(home)
        step("boxlite doctor")
        return cmd_doctor(args, home)
    except KeyboardInterrupt:
        # Images, kernels and snapshots are built beside their final place and renamed in when whole.
        print("\ninterrupted: nothing half-built is kept; run `boxlite setup` again (if apt-get was interrupted, "
              "`sudo dpkg --configure -a` first)", file=sys.stderr)
        return 130
    finally:
        if user is not None:
            _hand_over(home, user)


def _sudo_user() -> pwd.struct_passwd | None:
    """The user who ran `sudo boxlite setup`, or None (not root, or root itself)."""
    uid = os.environ.get("SUDO_UID", "")
    if os.geteuid() != 0 or not uid.isdigit() or int(uid) == 0:
        return None
    try:
        return pwd.getpwuid(int(uid))
    except KeyError:
        return None


def _setup_home(args: argparse.Namespace) -> Path | None:
    """`sudo boxlite setup` prepares the home of the user who ran sudo (sudo set $HOME to root's)."""
    user = _sudo_user() if args.command == "setup" and args.home is None else None
    home: Path | None = args.home
    if user is None or os.environ.get("BOXLITE_HOME"):
        return home
    return Path(user.pw_dir) / ".cache" / "pytest-boxlite"


def _hand_over(home: Home, user: pwd.struct_passwd) -> None:
    """Give the home root just filled to the user who ran sudo, who runs the boxes. Image root trees keep their
    owners (root and the image's users): ext4 bases are built from them as they are."""
    for top, dirs, files in os.walk(home.root):
        dirs[:] = [d for d in dirs if d != "rootfs"]
        for name in [*dirs, *files]:
            os.lchown(os.path.join(top, name), user.pw_uid, user.pw_gid)
    os.lchown(home.root, user.pw_uid, user.pw_gid)
    for path in home.root.parents:  # what setup made on the way inside the user's home (~/.cache)
        if path.stat().st_uid != 0 or not path.is_relative_to(user.pw_dir) or path == Path(user.pw_dir):
            break
        os.lchown(path, user.pw_uid, user.pw_gid)
    print(f"{home.root} handed over to {user.pw_name}")


def _setup_image(home: Home) -> None:
    from vmm.images import resolve_image

    started = time.monotonic()
    image = resolve_image("default", home.root, progress=lambda text: print(text, flush=True))
    print(f"default image: {image.digest} ({time.monotonic() - started:.1f} s)")


def _setup_boot_snapshot(home: Home) -> None:
    """A box of the default options, started once: its first start boots and saves the boot snapshot that
    later boxes of those options restore."""
    from vmm import BoxOptions, Runtime

    started = time.monotonic()
    with Runtime(home.root, progress=lambda text: print(text, flush=True)) as runtime:
        with runtime.create(BoxOptions()) as box:
            box.exec("true", timeout=60)
        metrics = runtime.metrics()
    how = "restored from it" if metrics.templates_built == 0 else "saved it, then restored a box from it"
    print(f"boot snapshot: {how} ({time.monotonic() - started:.1f} s)" if metrics.restores
          else f"boot snapshot: none (this engine boots every box; {time.monotonic() - started:.1f} s)")


# ---------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="boxlite", description="pytest-boxlite: image cache, runtime home and host "
                                                             "checks")
    p.add_argument("--home", type=Path, default=None, help="runtime home (default: $BOXLITE_HOME, else "
                   "$XDG_CACHE_HOME/pytest-boxlite, else ~/.cache/pytest-boxlite)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    sub = p.add_subparsers(dest="command", required=True)
    images = sub.add_parser("images", help="the image cache").add_subparsers(dest="images_command", required=True)
    pull = images.add_parser("pull", help="pull an image (or import an oci:/docker-archive: one)")
    pull.add_argument("ref")
    pull.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
    pull.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                      help="allow plain http to this registry (also $BOXLITE_INSECURE_REGISTRIES)")
    pull.set_defaults(func=cmd_pull)
    images.add_parser("ls", help="list cached images").set_defaults(func=cmd_ls)
    rm = images.add_parser("rm", help="remove images from the cache")
    rm.add_argument("refs", nargs="+", metavar="REF")
    rm.set_defaults(func=cmd_rm)
    about = ("remove images by age or total size, and cache entries (snapshot templates, volume images...) unused "
             "for a day; not an alias of `boxlite cache prune`, which bounds the whole home by size")
    prune = images.add_parser("prune", help=about, description=about)
    prune.add_argument("--older-than", type=float, metavar="DAYS",
                       help="remove images, snapshot templates and volume images unused for DAYS days")
    prune.add_argument("--max-size", type=float, metavar="GB",
                       help="remove least recently used images until the cache is under GB gigabytes")
    prune.set_defaults(func=cmd_prune)
    add_cache_commands(sub.add_parser)
    sub.add_parser("doctor", help="check that this host can run boxes").set_defaults(func=cmd_doctor)
    setup = sub.add_parser("setup", help="get this host ready: system packages (apt-get, as root), the default "
                                         "image and its boot snapshot, then doctor",
                           description="Installs the missing system packages (as root; otherwise prints the "
                                       "apt-get command and what each package is for, and exits with status 3), "
                                       "builds the default image and its boot snapshot, and ends with `boxlite "
                                       "doctor` (exit status 0: ready, 1: not ready or a step failed).")
    setup.add_argument("--no-install", action="store_true",
                       help="print the apt-get command for missing packages instead of running it")
    setup.set_defaults(func=cmd_setup)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not enable_from_env():  # $BOXLITE_LOG wins over -v
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                                format="%(levelname)s %(name)s: %(message)s")
        home = Home(_setup_home(args))
        return int(args.func(args, home))
    except BoxliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the cache is intact (a pull resumes where it stopped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
