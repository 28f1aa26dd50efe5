"""Directories as volume images: an ext4 file of a host directory, for boxes that cannot use virtiofs
(snapshot templates: a VM whose RAM another process maps cannot be restored copy-on-write).

Images are named by a fingerprint of the tree (paths, modes, sizes, modification times), built once per
fingerprint and shared by processes through the same file lock as image bases. They are cache entries
(vmm/cache.py): a runtime whose boxes use one holds it; the least recently used are evicted over the cap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import cache
from .errors import ConfigError
from .images.ext4 import Progress, build_ext4_base


def _walk(src: Path, exclude: frozenset[str]) -> Iterable[tuple[str, os.stat_result]]:
    """(path relative to `src`, lstat) of everything below `src`, minus what is below excluded paths: an
    excluded directory stays, empty (another volume may be mounted on it)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = sorted(os.scandir(src / rel), key=lambda e: e.name)
        except OSError as exc:
            raise ConfigError(f"cannot read {src / rel} to make a volume image of it: {exc}") from None
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if path in exclude and not stat.S_ISDIR(st.st_mode):
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode) and path not in exclude:
                stack.append(path)


def fingerprint(src: Path, exclude: frozenset[str] = frozenset(), replace: Mapping[str, bytes] | None = None) -> str:
    digest = hashlib.sha256(str(src).encode())
    for path, data in sorted((replace or {}).items()):
        digest.update(f"\0replaced {path}\0{hashlib.sha256(data).hexdigest()}".encode())
    for path, st in _walk(src, exclude):
        if path in exclude:  # an empty directory in the image, whatever it holds on the host
            digest.update(f"\0{path}".encode())
            continue
        link = os.readlink(src / path) if stat.S_ISLNK(st.st_mode) else ""
        digest.update(f"\0{path}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{link}".encode())
    return digest.hexdigest()


def directory_image(src: str | os.PathLike[str], home: Path, exclude: Iterable[str] = (),
                    progress: Progress | None = None, replace: Mapping[str, bytes] | None = None,
                    holds: cache.Holds | None = None) -> Path:
    """An ext4 image of the directory `src` (minus `exclude`: paths below `src`), built unless cached.
    `replace`: files (paths relative to `src`) whose content in the image is the given bytes instead.
    `holds` (a runtime's, `Runtime.holds`): the image is held in it from before it is looked for, so that
    no eviction removes it between this call and the boxes that use it.

    Files changed while the image is built may or may not be in it; the fingerprint of the next call sees
    the change and builds a new image.
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise ConfigError(f"{src} is not a directory: cannot make a volume image of it")
    store = volume_dir(home).resolve()
    # Never the image store (a home inside the tree, or linked there): the image would hold its own staging
    # copy, which holds it again, and so on.
    inside = [os.path.relpath(store, src)] if store.is_relative_to(src) else []
    skip = frozenset(os.path.relpath(os.path.join(src, p), src) for p in (*exclude, *inside))
    replace = {os.path.normpath(k): v for k, v in (replace or {}).items()}
    dest = store / f"{fingerprint(src, skip, replace)}.ext4"

    def build() -> None:
        store.mkdir(parents=True, exist_ok=True)
        cache.make_room(home, sum(st.st_blocks * 512 for _, st in _walk(src, skip)))
        if skip or replace:
            staging = dest.parent / cache.staging_name(".staging-")  # says whose it is, for cache.sweep
            try:
                _stage(src, staging, skip, replace)
                build_ext4_base(staging, dest, progress)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            build_ext4_base(src, dest, progress)

    return used_image(dest, str(src), build, holds)


def used_image(dest: Path, what: str, build: Callable[[], None], holds: cache.Holds | None) -> Path:
    """`dest`, built by `build()` unless it is there, and in use now (`what`: what it is for). With `holds`,
    held from before it is looked for: an eviction cannot remove it between the check and the boxes that
    use it. Without, only its use is recorded (it becomes the last entry to be evicted)."""
    if holds is not None:
        holds.hold(dest, what)
    try:
        if not dest.exists():
            build()
    except BaseException:
        if holds is not None:
            holds.drop(dest)
        raise
    if holds is None:
        cache.touch(dest, what)
    return dest


def volume_dir(home: Path) -> Path:
    return home / "images" / "volumes"


def _stage(src: Path, staging: Path, skip: frozenset[str], replace: Mapping[str, bytes]) -> None:
    """The tree minus `skip`, as hard links where the file system allows (else copies); the files of
    `replace` written anew with their new content."""
    staging.mkdir(parents=True)
    shutil.copystat(src, staging)
    dirs = []
    for path, st in _walk(src, skip):
        source, target = src / path, staging / path
        if stat.S_ISDIR(st.st_mode):
            target.mkdir()
            dirs.append((source, target))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISREG(st.st_mode) and path in replace:
            target.write_bytes(replace[path])
            shutil.copystat(source, target)
        elif stat.S_ISREG(st.st_mode):
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        # sockets, fifos and devices in a project tree are left out
    for source, target in reversed(dirs):  # after their contents: creating entries changed their mtimes
        shutil.copystat(source, target)
