"""Unpacking image layers (tar, gzip or zstd) into one root filesystem directory, safely.

Layers are applied in order, with OCI whiteouts (`.wh.NAME` deletes NAME, `.wh..wh..opq` hides
what lower layers put in a directory). Paths are resolved the way the guest will see them: a
symlink met on the way is followed *inside the root* (an absolute target is taken from the root,
as in a chroot), so a later layer can write through `bin -> usr/bin`; anything that would leave the
root (an absolute member name, a `..` component, a relative symlink climbing above the root, a hard
link naming such a path) is refused with UnsafeLayer before it is written. Files are created with
O_EXCL|O_NOFOLLOW after removing what was there, so nothing ever writes through a planted link.

Device nodes are skipped (the guest has devtmpfs); owners are kept when running as root.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import os
import shutil
import stat
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vmm.errors import ImageError, UnsafeLayer, UnsupportedImage

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@contextmanager
def open_layer(path: Path, name: str) -> Iterator[io.BufferedIOBase]:
    """The uncompressed tar stream of a layer blob, by its magic bytes (media types lie)."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        elif magic == _ZSTD_MAGIC:
            try:
                from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
            except ImportError:
                raise UnsupportedImage(
                    f"layer {name} is zstd-compressed and this Python ({sys.version.split()[0]}) cannot "
                    "decompress zstd (Python 3.14 can). Use an image with gzip layers (for example copy it with "
                    "`skopeo copy --dest-compress-format gzip ...`)."
                ) from None
            with zstd.ZstdFile(raw) as stream:
                yield stream
        else:
            yield raw


def _parts(name: str, member: str, layer: str) -> list[str]:
    """Path components of an archive name, refusing absolute names and `..`."""
    if name.startswith("/"):
        raise UnsafeLayer(f"layer {layer}: entry {member!r} has an absolute path; refusing the image")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer {layer}: entry {member!r} climbs out with '..'; refusing the image")
    return parts


class Unpacker:
    """Applies layers to `root`, in order; call finish() once after the last layer."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.as_root = os.geteuid() == 0
        self._dirs: dict[str, tarfile.TarInfo] = {}  # modes and times applied last (children change them)
        self._created: set[str] = set()  # what this layer made: an opaque marker must not hide it
        self._layer = ""
        self.skipped_devices = 0

    # -- path resolution inside the root ---------------------------------------------------------------
    def _resolve_dir(self, parts: list[str], member: str, create: bool = True) -> str:
        """Host path of the directory named by `parts`, following symlinks inside the root and
        creating missing directories."""
        done: list[str] = []
        todo = list(parts)
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise UnsafeLayer(f"layer {self._layer}: {member!r} resolves above the root through a "
                                      "symlink; refusing the image")
                done.pop()
                continue
            here = os.path.join(self.root, *done, part)
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(here, 0o755)
                done.append(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise UnsafeLayer(f"layer {self._layer}: too many symlinks resolving {member!r}")
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []  # absolute targets mean the guest's root, which is this root
                todo = target.split("/") + todo
            elif stat.S_ISDIR(st.st_mode):
                done.append(part)
            else:
                raise ImageError(f"layer {self._layer}: {member!r} needs {'/'.join(done + [part])} to be a "
                                 "directory but a lower layer made it a file; the image is broken")
        return os.path.join(self.root, *done)

    def _target(self, parts: list[str], member: str) -> str:
        return os.path.join(self._resolve_dir(parts[:-1], member), parts[-1])

    # -- applying ---------------------------------------------------------------------------------------
    def apply(self, path: Path, name: str) -> None:
        self._layer = name
        self._created = set()
        try:
            with open_layer(path, name) as stream, \
                    tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
                for member in tar:
                    self._apply_member(tar, member)
        except tarfile.TarError as e:
            raise ImageError(f"layer {name} is not a valid tar archive ({e}); the image is corrupt") from e
        except (zlib.error, gzip.BadGzipFile, EOFError) as e:
            raise ImageError(f"layer {name}: its compressed data is corrupt or truncated ({e})") from e

    def _apply_member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, m.name, self._layer)
        if not parts:  # the root itself ("./")
            if m.isdir():
                self._dirs[self.root] = m
            return
        base = parts[-1]
        if base.startswith(WHITEOUT):
            self._whiteout(parts, m.name)
            return
        if m.ischr() or m.isblk():
            self.skipped_devices += 1
            return
        dest = self._target(parts, m.name)
        self._created.add(dest)
        if m.isdir():
            if not (os.path.isdir(dest) and not os.path.islink(dest)):
                _remove(dest)
                os.mkdir(dest, 0o755)
            self._dirs[dest] = m
            self._owner(dest, m)
            return
        _remove(dest)
        if m.isreg():
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                src = tar.extractfile(m)
                if src is not None:
                    shutil.copyfileobj(src, out, CHUNK)
        elif m.issym():
            os.symlink(m.linkname, dest)
        elif m.islnk():
            self._hardlink(m, dest)
            return  # a hard link shares the target's inode: its mode and times are the target's
        elif m.isfifo():
            os.mkfifo(dest, 0o600)
        else:
            log.debug("layer %s: skipping %s of type %r", self._layer, m.name, m.type)
            return
        self._owner(dest, m)
        if not m.issym():
            os.chmod(dest, stat.S_IMODE(m.mode))
        self._xattrs(dest, m)
        os.utime(dest, (m.mtime, m.mtime), follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, dest: str) -> None:
        if m.linkname.startswith("/") or ".." in m.linkname.split("/"):
            raise UnsafeLayer(f"layer {self._layer}: hard link {m.name!r} points outside the root "
                              f"({m.linkname!r}); refusing the image")
        target_parts = _parts(m.linkname, m.name, self._layer)
        if not target_parts:
            raise UnsafeLayer(f"layer {self._layer}: hard link {m.name!r} to the root; refusing the image")
        target = self._target(target_parts, m.name)
        if not os.path.lexists(target) or os.path.isdir(target) and not os.path.islink(target):
            raise ImageError(f"layer {self._layer}: hard link {m.name!r} names {m.linkname!r}, which is not a "
                             "file in the image; the layer is broken")
        os.link(target, dest, follow_symlinks=False)

    def _whiteout(self, parts: list[str], member: str) -> None:
        try:
            parent = self._resolve_dir(parts[:-1], member, create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        if parts[-1] == OPAQUE:
            for entry in os.listdir(parent):
                path = os.path.join(parent, entry)
                if path not in self._created:
                    _remove(path)
            return
        _remove(os.path.join(parent, parts[-1][len(WHITEOUT):]))

    def _owner(self, dest: str, m: tarfile.TarInfo) -> None:
        if self.as_root:
            os.lchown(dest, m.uid, m.gid)

    def _xattrs(self, dest: str, m: tarfile.TarInfo) -> None:
        """File capabilities (ping, ...) travel as SCHILY.xattr.* PAX records. Best effort."""
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr.") and not m.issym():
                try:
                    os.setxattr(dest, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"))
                except OSError as e:
                    log.debug("cannot set %s on %s: %s", key, dest, e)

    def finish(self) -> None:
        """Directory modes and times, deepest first (writing into a directory changes its mtime)."""
        for path in sorted(self._dirs, key=len, reverse=True):
            m = self._dirs[path]
            try:
                os.chmod(path, stat.S_IMODE(m.mode))
                os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted by a later whiteout
        if self.skipped_devices:
            log.info("skipped %d device nodes (the guest's /dev is devtmpfs)", self.skipped_devices)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


def unpack(layers: list[tuple[Path, str]], root: Path,
           on_layer: Callable[[int, str], None] | None = None) -> None:
    """Apply (blob path, name) layers in order into the empty directory `root`."""
    unpacker = Unpacker(root)
    for i, (path, name) in enumerate(layers):
        if on_layer:
            on_layer(i, name)
        unpacker.apply(path, name)
    unpacker.finish()


def iter_names(path: Path) -> Iterator[str]:
    """Member names of a layer (for tests and diagnostics)."""
    with open_layer(path, str(path)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            yield m.name
