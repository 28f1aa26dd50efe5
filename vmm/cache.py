"""The runtime home as a bounded cache.

What the runtime can rebuild on demand is a cache *entry*: snapshot templates and boot snapshots
(`templates/<key>/`), volume images (`images/volumes/<fp>.ext4`), ext4 bases of images (`images/bases/<id>.ext4`)
and kernel builds (`kernels/<release>-<key>/`). Each has a use lock beside it, `<entry>.use`:

- a process using the entry holds a shared flock on it (a Runtime, until it is closed), and sets its mtime
  when it starts to: that mtime is the entry's last use;
- eviction takes it exclusive and non-blocking, so what a live process uses is skipped, and removes the
  entry and its lock files while holding it.

The home is capped (`BOXLITE_CACHE_MAX`, else `cache_max` in `$BOXLITE_HOME/config.yaml`, else
`DEFAULT_MAX`, less on a small file system): before a template or a volume image is saved, and when a Runtime
closes, the least recently used entries are evicted until the whole home fits. Pulled images (blobs, the
default image's tree) count towards the home's size but are not evicted here: `boxlite images rm/prune`.

Work left by interrupted processes (`*.tmp-*` builds, `.staging-*` trees) is removed once its owner is gone:
its build lock is free, or the pid in its name is dead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV = "BOXLITE_CACHE_MAX"
CONFIG_NAME = "config.yaml"  # in the runtime home: `cache_max: 10G`
CONFIG_KEYS = ("cache_max",)  # what the home's config.yaml may set
DEFAULT_MAX = 10 << 30
# On a small file system the default is this share of what the home may take (its size plus the free space).
DEFAULT_SHARE = 0.5
USE_SUFFIX = ".use"
BUILD_SUFFIX = ".lock"  # the build locks of snapshot.py, kernel.py and images/ext4.py
# Leftovers whose owner cannot be known (no lock, no pid in the name) go when they are this old.
ORPHAN_AGE_S = 3600.0

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_T = TypeVar("_T")


def parse_size(text: str | int, what: str = "a size") -> int:
    """Bytes in `10G`, `500M`, `1.5GiB`, `4096` (binary units: 1G = 1 GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size: write a number with a unit, e.g. 10G or 500M")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class Cap:
    bytes: int
    source: str  # where it was set: the environment, the config file, or the default


def cache_max(home: Path, size: int | None = None) -> Cap:
    """The cap on the home's size: `$BOXLITE_CACHE_MAX`, else `cache_max` in the home's config.yaml, else
    DEFAULT_MAX, or half of what the home's file system holds for it (its size plus the free space) if less.
    `size`: the home's, if the caller has just measured it."""
    configured = configured_max(home)
    if configured is not None:
        return configured
    size = home_size(home) if size is None else size
    room = int((size + shutil.disk_usage(home).free) * DEFAULT_SHARE)
    if room < DEFAULT_MAX:
        return Cap(room, f"default: {DEFAULT_SHARE:.0%} of the room on the file system")
    return Cap(DEFAULT_MAX, "default")


def configured_max(home: Path) -> Cap | None:
    """The cap the user set, if any; ConfigError naming the fix if it is not a size."""
    if os.environ.get(ENV):
        return Cap(parse_size(os.environ[ENV], f"${ENV}"), f"${ENV}")
    config = Path(home) / CONFIG_NAME
    if config.exists():
        import yaml

        try:
            data = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{config} is not readable YAML ({exc}): fix or remove it") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config} must be a mapping, e.g. `cache_max: 10G`")
        unknown = sorted(str(key) for key in data if key not in CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{config}: unknown key {unknown[0]!r} (known: {', '.join(CONFIG_KEYS)}): fix or "
                              "remove it")
        if data.get("cache_max") is not None:
            return Cap(parse_size(data["cache_max"], f"cache_max in {config}"), str(config))
    return None


# ---------------------------------------------------------------- sizes


def disk_size(path: Path) -> int:
    """Bytes `path` takes on disk (st_blocks: RAM files are sparse), all of a directory's files included."""
    return sum(size for _, size in _files(path, set()))


def _files(path: Path, seen: set[tuple[int, int]], skip: frozenset[str] = frozenset()) -> Iterator[tuple[Path, int]]:
    """(path, bytes on disk) of `path` and everything below it, except the real paths in `skip`."""
    if skip and str(path) in skip:
        return
    try:
        st = path.lstat()
    except OSError:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            children = list(os.scandir(path))
        except OSError:
            return
        yield path, st.st_blocks * 512
        for child in children:
            yield from _files(Path(child.path), seen, skip)
    elif (st.st_dev, st.st_ino) not in seen:  # hard links count once
        if st.st_nlink > 1:
            seen.add((st.st_dev, st.st_ino))
        yield path, st.st_blocks * 512


def home_size(home: Path, skip: frozenset[str] = frozenset()) -> int:
    """The home's bytes on disk, its parts included when they are links to elsewhere (tests share images);
    `skip`: real paths left out (measured already)."""
    seen: set[tuple[int, int]] = set()
    return sum(size for child in _children(Path(home)) for _, size in _files(child.resolve(), seen, skip))


def survey(home: Path) -> tuple[int, list[Entry]]:
    """The home's bytes on disk and its cache entries (as `entries()`), in one walk of it."""
    found = entries(home)
    rest = home_size(home, skip=frozenset(os.path.realpath(entry.path) for entry in found))
    return rest + sum(entry.size for entry in found), found


# ---------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    kind: str  # template, boot snapshot, volume, base or kernel
    path: Path  # the directory or file
    what: str  # what it is for
    size: int  # bytes on disk
    last_used: float

    @property
    def use_lock(self) -> Path:
        return use_lock(self.path)

    @property
    def build_lock(self) -> Path:
        return Path(str(self.path) + BUILD_SUFFIX)


def use_lock(path: Path) -> Path:
    return Path(str(path) + USE_SUFFIX)


def _last_used(path: Path) -> float:
    """The mtime of its use lock; for entries without one (made by earlier versions), of the entry."""
    for marker in (use_lock(path), path):
        try:
            return marker.stat().st_mtime
        except OSError:
            continue
    return 0.0


def note(path: Path) -> str:
    """What the users of an entry wrote into its use lock (see Holds.hold)."""
    try:
        return use_lock(path).read_text(errors="replace").strip()[:200]
    except OSError:
        return ""


def entries(home: Path) -> list[Entry]:
    """Every finished cache entry of the home, least recently used first."""
    home = Path(home)
    found = []
    templates = home / "templates"
    for path in _children(templates):
        meta_file = path / "template.json"
        if not path.is_dir() or ".tmp-" in path.name or not meta_file.exists():
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
        kind = "boot snapshot" if meta.get("boot") else "template"
        found.append(Entry(kind, path, str(meta.get("about", "")) or note(path), disk_size(path),
                           _last_used(path)))
    refs = _refs_by_image(home)
    for path in _children(home / "images" / "bases"):
        if path.suffix == ".ext4" and not path.name.startswith("."):
            what = ", ".join(refs.get(path.stem, ())) or note(path) or "(no image refers to it)"
            found.append(Entry("base", path, what, disk_size(path), _last_used(path)))
    for path in _children(home / "images" / "volumes"):
        if path.suffix == ".ext4" and not path.name.startswith("."):
            found.append(Entry("volume", path, note(path), disk_size(path), _last_used(path)))
    for path in _children(home / "kernels"):
        if path.is_dir() and not path.name.startswith("."):
            found.append(Entry("kernel", path, f"kernel {path.name.rsplit('-', 1)[0]}", disk_size(path),
                               _last_used(path)))
    return sorted(found, key=lambda e: e.last_used)


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _refs_by_image(home: Path) -> dict[str, list[str]]:
    from .images.store import ImageIndex

    refs: dict[str, list[str]] = {}
    for entry in ImageIndex(home / "images").entries().values():
        refs.setdefault(entry.image_id.partition(":")[2], []).append(entry.ref)
    return refs


# ---------------------------------------------------------------- use locks

# filelock (>= 3.12, the project's floor) has no shared locks: these are flock(2) locks on `<entry>.use`.
# A lock file is removed with its entry, so whoever locked it must check that the file it locked is still
# the one at that path (else it locked a removed file, and tries again).


def _flock(path: Path, flags: int) -> int | None:
    """An open descriptor of `path` (created if missing) holding flock `flags`; None if LOCK_NB and busy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed (by an eviction) between open and flock


def touch(path: Path, what: str = "") -> None:
    """Record a use of the entry at `path` now, without holding it (for callers without a Runtime; the
    runtime that boots with the entry holds it)."""
    lock = use_lock(path)
    with open(lock, "a") as f:
        if what and f.tell() == 0:
            f.write(what[:200])
    os.utime(lock)


class Holds:
    """The entries one user (a Runtime) is using: each with its use lock held shared, until `release()`."""

    def __init__(self, root: Path | None = None) -> None:
        """`root`: the home whose entries are held (paths elsewhere are not cache entries); None: any path."""
        self._root = root
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def hold(self, path: Path, what: str = "") -> None:
        """Mark `path` (an entry, or where one is about to be built) as used now and in use until release.
        `what` (what it is for) is written into a new lock file, for `boxlite cache ls`."""
        if self._root is not None and not path.is_relative_to(self._root):
            return
        key = str(path)
        with self._lock:
            if key in self._fds:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _flock(use_lock(path), fcntl.LOCK_SH)
            assert fd is not None
            if what and os.fstat(fd).st_size == 0:
                os.pwrite(fd, what.encode()[:200], 0)
            os.utime(fd)
            self._fds[key] = fd

    def holds(self, path: Path) -> bool:
        with self._lock:
            return str(path) in self._fds

    def held(self, get: Callable[[], _T], entry: Callable[[_T], Path | None],
             what: Callable[[_T], str] | None = None) -> _T:
        """`get()` (which finds or builds a cache entry), with the entry at `entry(result)` held (`what(result)`:
        what it is for, as in hold()). One evicted between `get()` and the hold is got again, now held."""
        value = get()
        path = entry(value)
        if path is None or self.holds(path):
            return value
        self.hold(path, what(value) if what else "")
        return value if path.exists() else get()

    def drop(self, path: Path) -> None:
        """Stop holding `path`, and remove its use lock if the entry is not there (its build failed or
        was skipped) and nobody else holds it."""
        with self._lock:
            fd = self._fds.pop(str(path), None)
        if fd is None:
            return
        os.close(fd)
        if not path.exists():
            _remove_unused_lock(use_lock(path), path)

    def release(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ---------------------------------------------------------------- eviction


@dataclass(frozen=True)
class Evicted:
    removed: list[Entry]
    busy: list[Entry]  # wanted gone but in use (or being built) by a live process, or a stopped box's base
    size_before: int
    size_after: int

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def remove_entry(entry: Entry) -> bool:
    """Remove `entry` unless a live process uses it or builds it; True if it is gone."""
    fd = _flock(entry.use_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return False
    try:
        build = FileLock(str(entry.build_lock))
        try:
            build.acquire(timeout=0)
        except Timeout:
            return False
        try:
            existed = entry.path.exists()
            if entry.path.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                entry.path.unlink(missing_ok=True)
            # Who waits on a template's build lock holds its use lock: nobody. Bases and volumes are built by
            # callers that hold nothing yet, but are put in place with an atomic replace: two builds at once
            # (one on the removed lock file, one on a new one) only cost time. A kernel build renames a
            # directory into place, which two builds at once could not both do: its lock file stays.
            if entry.kind != "kernel":
                entry.build_lock.unlink(missing_ok=True)
        finally:
            build.release()
        entry.use_lock.unlink(missing_ok=True)
        if existed:
            log.info("evicted %s %s (%s, %s)", entry.kind, entry.path.name, entry.what, format_size(entry.size))
        return existed
    finally:
        os.close(fd)


def evict(home: Path, max_bytes: int | None, need: int = 0, older_than_s: float | None = None,
          everything: bool = False, surveyed: tuple[int, list[Entry]] | None = None) -> Evicted:
    """Remove the least recently used entries not in use until the home plus `need` bytes fits in
    `max_bytes` (None: no size limit), and those unused for `older_than_s` seconds; with `everything`, all
    entries not in use. `surveyed`: the home's `survey()`, if the caller has just made it."""
    from .images.store import referenced_by_boxes

    home = Path(home)
    before, found = survey(home) if surveyed is None else surveyed
    total = before
    removed, busy = [], []
    now = time.time()
    kept_boxes = referenced_by_boxes(home)  # a stopped persistent box starts again on the base it was made on
    for entry in found:
        old = older_than_s is not None and now - entry.last_used >= older_than_s
        if not (everything or old or (max_bytes is not None and total + need > max_bytes)):
            continue
        if os.path.realpath(entry.path) in kept_boxes:
            busy.append(entry)
        elif remove_entry(entry):
            removed.append(entry)
            total -= entry.size
        else:
            busy.append(entry)
    return Evicted(removed, busy, before, total)


def make_room(home: Path, need: int) -> None:
    """Evict what would leave the home over its cap once `need` more bytes are saved into it (0: at the end
    of a run). Failing to is logged, not raised: the cache is an optimisation."""
    try:
        surveyed = survey(home)
        cap = cache_max(home, surveyed[0])
        if surveyed[0] + need <= cap.bytes:
            return
        result = evict(home, cap.bytes, need, surveyed=surveyed)
    except (OSError, ConfigError) as exc:
        log.warning("could not make room in the runtime home %s: %s", home, exc)
        return
    if result.size_after + need > cap.bytes:
        log.warning("the runtime home %s takes %s, over its cap of %s (%s): the rest is in use or is images "
                    "(`boxlite images prune`); raise the cap with $%s or cache_max in %s", home,
                    format_size(result.size_after), format_size(cap.bytes), cap.source, ENV, Path(home) / CONFIG_NAME)


# ---------------------------------------------------------------- leftovers of interrupted work


def owner_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_name(prefix: str) -> str:
    """A name for temporary work that says whose it is: `<prefix><pid>-<random>`."""
    return f"{prefix}{os.getpid()}-{os.urandom(6).hex()}"


def _pid_in(name: str, prefix: str) -> int | None:
    match = re.match(re.escape(prefix) + r"(\d+)-", name)
    return int(match.group(1)) if match else None


def _old(path: Path) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > ORPHAN_AGE_S
    except OSError:
        return False


def _remove(path: Path) -> int:
    size = disk_size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    log.info("removed %s, left by an interrupted run (%s)", path, format_size(size))
    return size


def _built_under_lock(path: Path, lock: Path) -> int:
    """Remove `path`, the temporary output of a build done under `lock`, unless the build still runs."""
    try:
        with FileLock(str(lock)).acquire(timeout=0):
            return _remove(path) if path.exists() else 0
    except Timeout:
        return 0


def _orphans(home: Path) -> Iterable[tuple[Path, Path | None, int | None]]:
    """(leftover, the build lock its owner holds or None, its owner's pid or None)."""
    for path in _children(home / "templates"):
        if ".tmp-" in path.name:
            yield path, Path(str(path).split(".tmp-")[0] + BUILD_SUFFIX), None
    for directory in (home / "images" / "bases", home / "images" / "volumes"):
        for path in _children(directory):
            match = re.match(r"\.(.+\.ext4)\.tmp-", path.name)
            if match:
                yield path, directory / (match.group(1) + BUILD_SUFFIX), None
            elif path.name.startswith(".staging-"):
                yield path, None, _pid_in(path.name, ".staging-")
    for path in _children(home / "kernels"):
        match = re.match(r"\.(.+)\.tmp-", path.name)
        if match:
            yield path, home / "kernels" / (match.group(1) + BUILD_SUFFIX), None


def sweep(home: Path) -> int:
    """Remove what interrupted work left in the home, once its owner is gone; the bytes freed."""
    home = Path(home)
    freed = 0
    for path, lock, pid in _orphans(home):
        if lock is not None:
            freed += _built_under_lock(path, lock)
        elif pid is not None and not owner_pid_alive(pid) or pid is None and _old(path):
            freed += _remove(path)
    for marker in (home / "images" / "volumes").glob("*.ext4.used"):  # last-use markers of earlier versions
        marker.unlink(missing_ok=True)
    # Use locks whose entry is gone (a build that failed): removed when nobody holds them.
    for lock in [*(home / "templates").glob(f"*{USE_SUFFIX}"), *(home / "images").glob(f"*/*{USE_SUFFIX}"),
                 *(home / "kernels").glob(f"*{USE_SUFFIX}")]:
        entry = Path(str(lock)[: -len(USE_SUFFIX)])
        if not entry.exists() and _old(lock):
            _remove_unused_lock(lock, entry)
    return freed


def _remove_unused_lock(lock: Path, entry: Path) -> None:
    fd = _flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is not None:
        if not entry.exists():
            lock.unlink(missing_ok=True)
        os.close(fd)


# ---------------------------------------------------------------- smaller snapshots


def dig_holes(path: Path) -> None:
    """Deallocate the all-zero blocks of `path` (a snapshot's RAM file): the file reads the same, and
    takes only the pages the guest wrote something other than zeros into."""
    tool = shutil.which("fallocate")
    if tool is None:
        log.debug("fallocate (util-linux) not found: %s keeps its zero pages", path)
        return
    done = subprocess.run([tool, "--dig-holes", str(path)], capture_output=True, text=True)
    if done.returncode:
        log.warning("fallocate --dig-holes %s failed: %s", path, done.stderr.strip())

