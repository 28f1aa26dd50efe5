"""`dir:PATH` images: validating a root filesystem directory and fingerprinting it cheaply."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from vmm.errors import ImageError

DIR_PREFIX = "dir:"


def parse_dir_spec(spec: str) -> Path:
    """The absolute path in a `dir:PATH` spec (relative paths are taken from the current directory)."""
    raw = spec[len(DIR_PREFIX):]
    if not raw:
        raise ImageError("image 'dir:' names no directory: write dir:/path/to/rootfs")
    return Path(os.path.abspath(os.path.expanduser(raw)))


def validate_rootfs(path: Path) -> Path:
    """Check that `path` looks like a root filesystem (a directory with /bin and /usr)."""
    if not os.path.lexists(path):
        raise ImageError(
            f"image dir:{path}: no such directory. Give the path of an unpacked root filesystem "
            "(for example one made by `mmdebstrap --variant=minbase bookworm DIR`)."
        )
    if not path.is_dir():
        raise ImageError(
            f"image dir:{path} is not a directory. dir: takes an unpacked root filesystem directory; "
            "for a tar archive unpack it first."
        )
    # lexists: on merged-/usr trees /bin is a symlink (maybe absolute, meaningful only in the guest)
    missing = [name for name in ("bin", "usr") if not os.path.lexists(path / name)]
    if missing:
        raise ImageError(
            f"image dir:{path} is not a root filesystem: it has no "
            + " or ".join(f"/{m}" for m in missing)
            + ". Point dir: at the top of the tree (the directory that holds bin/, usr/, etc/)."
        )
    return path


def fingerprint(path: Path) -> str:
    """`sha256:<hex>` over a sorted walk of (relative path, mode, uid, gid, size, mtime_ns, symlink
    target). Metadata only, no content hashing: cheap enough to run on every resolve, and any
    ordinary edit (which changes size or mtime) gives a new digest. Owners are included because the
    ext4 base keeps them."""
    h = hashlib.sha256()
    root = str(path)
    stack = [""]
    while stack:
        rel = stack.pop()
        top = os.path.join(root, rel) if rel else root
        try:
            st = os.lstat(top)
            names = sorted(os.listdir(top))
        except OSError as e:
            raise ImageError(f"image dir:{path}: cannot read {top}: {e}. Make the tree readable.") from e
        _add(h.update, rel or ".", st, "")
        subdirs = []
        for name in names:
            child_rel = os.path.join(rel, name) if rel else name
            child = os.path.join(root, child_rel)
            try:
                cst = os.lstat(child)
                target = os.readlink(child) if stat.S_ISLNK(cst.st_mode) else ""
            except OSError as e:
                raise ImageError(f"image dir:{path}: cannot read {child}: {e}. Make the tree readable.") from e
            if stat.S_ISDIR(cst.st_mode):
                subdirs.append(child_rel)
            else:
                _add(h.update, child_rel, cst, target)
        stack.extend(reversed(subdirs))  # depth first, in sorted order
    return "sha256:" + h.hexdigest()


def _add(update: Callable[[bytes], object], rel: str, st: os.stat_result, target: str) -> None:
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size  # directory sizes vary with history
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
    update(
        f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0{size}\0{st.st_mtime_ns}\0{rdev}\0{target}\n"
        .encode("utf-8", "surrogateescape")
    )
