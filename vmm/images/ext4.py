"""Read-only ext4 base images built from a root filesystem tree with `mkfs.ext4 -d`.

No root, no loop mounts: mke2fs copies the tree (modes, owners, timestamps, symlinks, hard links,
device nodes, xattrs) straight into a sparse file. Bases are built to a temporary name beside the
destination and renamed into place under a file lock, so readers only ever see complete files and
several processes sharing a runtime home build each base once.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from vmm import process
from vmm.errors import ImageError

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
INODE_SIZE = 256
LABEL = "boxlite-root"

_SB_OFFSET = 1024  # the primary superblock starts 1024 bytes into the device
_SB_MAGIC = 0xEF53  # s_magic, at superblock offset 0x38 (file offset 1080)
_INCOMPAT_64BIT = 0x80

Progress = Callable[[str], None]


def is_valid_base(path: Path) -> bool:
    """True if `path` holds a whole ext4 file system: superblock magic present and the file
    at least as long as the block count the superblock declares (catches zero-size and truncated
    files left by a crash or a full disk)."""
    try:
        with open(path, "rb") as f:
            f.seek(_SB_OFFSET)
            sb = f.read(1024)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(sb) < 1024:
        return False
    (magic,) = struct.unpack_from("<H", sb, 0x38)
    if magic != _SB_MAGIC:
        return False
    (blocks_lo,) = struct.unpack_from("<I", sb, 0x04)
    (log_block_size,) = struct.unpack_from("<I", sb, 0x18)
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    blocks = blocks_lo
    if incompat & _INCOMPAT_64BIT:
        (blocks_hi,) = struct.unpack_from("<I", sb, 0x150)
        blocks |= blocks_hi << 32
    if log_block_size > 6:  # block sizes above 64 KiB do not exist: garbage
        return False
    return bool(blocks > 0 and size >= blocks * (1024 << log_block_size))


def _mkfs() -> str:
    for name in ("mkfs.ext4", "mke2fs"):
        found = process.which(name)
        if found:
            return found
    raise ImageError(
        "mkfs.ext4 was not found (it builds the ext4 base of every image): "
        "install it with `apt-get install e2fsprogs`."
    )


def measure_tree(rootfs: Path) -> tuple[int, int]:
    """(bytes the tree needs in 4 KiB blocks, number of inodes) for sizing the file system."""
    total = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()  # hard links take space once
    stack = [str(rootfs)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError as e:
            raise ImageError(f"cannot read {top} while sizing the image: {e}; make the tree readable") from e
        inodes += 1
        # the directory's own blocks: 8-byte entry headers + names, 4-byte aligned (plus . and ..)
        dirents = 24 + sum(8 + (len(os.fsencode(e.name)) + 3) // 4 * 4 for e in entries)
        total += -(-dirents // BLOCK_SIZE) * BLOCK_SIZE
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                blocks = -(-st.st_size // BLOCK_SIZE)
                # files larger than the 4 extents an inode holds need extent tree blocks
                total += blocks * BLOCK_SIZE + (BLOCK_SIZE if blocks > 4 * 32768 else 0)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:  # short targets live in the inode
                total += BLOCK_SIZE
    return total, inodes


def mkfs_args(rootfs: Path, dest: Path, size_bytes: int, inodes: int) -> list[str]:
    return [
        _mkfs(),
        "-q",
        "-F",
        "-t", "ext4",
        "-d", str(rootfs),
        "-L", LABEL,
        "-b", str(BLOCK_SIZE),
        "-I", str(INODE_SIZE),
        "-N", str(inodes),
        "-m", "0",
        # mounted read-only (changes go to the box's overlay): no journal, no reserved blocks
        "-O", "^has_journal,^resize_inode",
        "-E", "root_owner=0:0,lazy_itable_init=1,nodiscard",
        str(dest),
        f"{size_bytes // 1024}k",
    ]


def _size_for(data_bytes: int, inodes: int) -> int:
    metadata = inodes * INODE_SIZE
    size = int((data_bytes + metadata) * 1.2) + 16 * 1024 * 1024
    return -(-size // (1024 * 1024)) * (1024 * 1024)  # whole MiB


def build_ext4_base(rootfs: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Build `dest` (an ext4 file system holding the tree at `rootfs`) unless a valid one is there.

    Ownership is copied from the tree as it is on disk, so build from a tree with the owners the
    guest should see (a tree unpacked or bootstrapped as root keeps root's and the packages' uids).
    The root directory is always owned by 0:0.
    """
    rootfs = Path(rootfs)
    dest = Path(dest)
    if not rootfs.is_dir():
        raise ImageError(f"cannot build an ext4 base from {rootfs}: it is not a directory")
    if is_valid_base(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dest) + ".lock")
    with lock:
        if is_valid_base(dest):  # another process built it while we waited
            return dest
        if dest.exists():
            log.warning("ext4 base %s is empty or truncated: rebuilding it", dest)
            dest.unlink()
        _remove_stale_temps(dest)
        data_bytes, inodes = measure_tree(rootfs)
        inode_count = int(inodes * 1.2) + 1024
        size = _size_for(data_bytes, inode_count)
        if progress:
            progress(f"building ext4 base {dest.name} ({size // (1024 * 1024)} MiB, {inodes} files)")
        log.info("building ext4 base %s from %s: %d bytes, %d inodes", dest, rootfs, size, inode_count)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            os.close(fd)
            os.truncate(tmp, size)  # sparse: only what mke2fs writes takes disk space
            args = mkfs_args(rootfs, tmp, size, inode_count)
            log.debug("running %s", " ".join(args))
            proc = subprocess.run(args, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace")
            if proc.returncode != 0:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
                raise ImageError(
                    f"mkfs.ext4 failed (exit {proc.returncode}) building the base of {rootfs}:\n{tail}\n"
                    "Check that every file in the tree is readable and that "
                    f"{dest.parent} has free space."
                )
            if not is_valid_base(tmp):
                raise ImageError(f"mkfs.ext4 produced no valid file system in {tmp}; is {dest.parent} full?")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
    if progress:
        progress(f"ext4 base ready: {dest}")
    return dest


def _remove_stale_temps(dest: Path) -> None:
    """Temporary files of a build that crashed (we hold the lock: no build is running)."""
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        log.info("removing %s left by an interrupted build", stale)
        try:
            stale.unlink()
        except OSError as e:
            log.warning("cannot remove %s: %s", stale, e)
