"""The host's own interpreter inside a box, whatever python the image has (another version, or none).

What reaches the box, as read-only ext4 volume images (not virtiofs: boxes restore from snapshot templates,
and a template's VM cannot be migrated with a virtiofs device in QEMU 7.2):

- `sys.base_prefix` at its own path: the standard library, lib-dynload, libpython; its own site-packages
  only when it is on `sys.path`. In this image the python executable's ELF interpreter (PT_INTERP) points at
  the host's dynamic loader below instead of the image's `/lib64/ld-linux-x86-64.so.2`.
- GUEST_LIBS: a copy of the host's dynamic loader and the shared libraries (ldd closure) that the python
  executable, libpython and every extension module of the shared directories need: libc, libssl, libffi...

Why so: ld.so and libc must come from the same glibc, and the image's own programs (`sh`, run by tests) must
keep theirs. LD_LIBRARY_PATH would reach those programs too, so the libraries are found without it: the copied
loader's compiled-in search path is rewritten in place (same lengths) to look in GUEST_LIBS first and then
only in /dev/ (where no library is), and its cache and preload files (/etc/ld.so.cache, /etc/ld.so.preload:
the image's, made for its own glibc) are renamed to paths under /dev/ that do not exist. No root and no
ldconfig: a cache of our own made with `ldconfig -r` would need chroot (root), and pytest runs as any user.
Every process that runs the host's python executable (subprocess, multiprocessing via sys.executable) gets
the same loader from the executable itself; the image's programs are untouched.

Only x86_64 glibc hosts whose interpreter lives under a prefix of its own (pyenv, uv, setup-python, a build
in /opt or /usr/local) are supported; the others get an error that names python="image".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .errors import HostPythonUnsupported
from .images.ext4 import Progress, build_ext4_base
from .images.host import PRIVATE_ROOTS
from .volumes import directory_image, used_image, volume_dir

log = logging.getLogger(__name__)

GUEST_LIBS = "/.boxlite/hostpy-libs"  # + "/": 22 bytes, the length of the loader's first search directory
LOADER = f"{GUEST_LIBS}/ld"  # the python executable's new PT_INTERP
RECIPE = 1  # bump when what goes into the libraries image changes

# The loader's compiled-in library directories (Debian/Ubuntu multiarch glibc), NUL-separated, and what they
# become. Their lengths are compiled in beside them: every replacement has exactly the original length.
_SEARCH_DIRS = b"/lib/x86_64-linux-gnu/\0/usr/lib/x86_64-linux-gnu/\0/lib/\0/usr/lib/\0"
_NOWHERE = "/dev/"  # always there in a box, never holds a library
_LOADER_EDITS = {
    _SEARCH_DIRS: b"\0".join(p.encode() for p in (
        f"{GUEST_LIBS}/", _NOWHERE.ljust(26, "/"), _NOWHERE, _NOWHERE.ljust(9, "/"))) + b"\0",
    b"/etc/ld.so.cache\0": b"/dev/ld.so.cache\0",
    b"/etc/ld.so.preload\0": b"/dev/ld.so.preload\0",
}
_SYSTEM_PREFIXES = ("/", "/usr")
_HINT = ('use python="image" (boxlite_python = image, --boxlite-python image) with an image whose python3 has '
         'the host\'s minor version')
_PT_INTERP = 3


@dataclass(frozen=True)
class HostPython:
    """The running interpreter, ready to be mounted in boxes."""

    executable: str  # what to run in the box: sys.executable (a venv's bin/python in a venv)
    version: str  # sys.version, the whole line
    volumes: tuple[tuple[str, str, str], ...]  # (ext4 image file, guest path, "ro")


def interpreter_dirs() -> list[str]:
    """The directories besides the site directories that a box needs at their own paths: the base prefix
    (imaged by `host_python`) and the virtual environment, if any (pyvenv.cfg, bin/)."""
    dirs = [os.path.realpath(sys.base_prefix)]
    if os.path.realpath(sys.prefix) != dirs[0]:
        dirs.append(os.path.realpath(sys.prefix))
    return dirs


def system_python() -> bool:
    """Whether the running interpreter is the distro's own (prefix / or /usr): its files are at the paths of
    every image's own system, so it cannot be carried into a box at its own paths."""
    return os.path.realpath(sys.base_prefix) in _SYSTEM_PREFIXES


def check_supported() -> str:
    """The real path of the python executable, or HostPythonUnsupported saying why not."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise HostPythonUnsupported(f'python="host" runs the host\'s interpreter in x86_64 Linux boxes; this is '
                                    f'{sys.platform}/{platform.machine()}: {_HINT}')
    if platform.libc_ver()[0] != "glibc":
        raise HostPythonUnsupported(f'python="host" needs a glibc host python; {sys.executable} is not linked '
                                    f'with glibc (musl?): {_HINT}')
    base = os.path.realpath(sys.base_prefix)
    if system_python():
        raise HostPythonUnsupported(
            f'python="host" carries an interpreter installed under a prefix of its own (pyenv, uv, '
            f'setup-python, /opt, /usr/local); {sys.executable} is the system\'s (prefix {base}): {_HINT} '
            f'(the default image has Debian 12\'s python3.11), or use a python from pyenv or uv')
    homes = {os.path.realpath(os.path.expanduser("~")), *PRIVATE_ROOTS}
    for path in interpreter_dirs():
        if path in homes:  # as the `host` image: a home directory is never imaged whole (secrets)
            raise HostPythonUnsupported(f'python="host": the interpreter\'s files are {path}, a home directory, '
                                        f'which boxes never get whole: use a virtual environment or an '
                                        f'interpreter installed elsewhere, or {_HINT}')
    executable = os.path.realpath(sys.executable)
    if not executable.startswith(base + "/"):
        raise HostPythonUnsupported(f'python="host": {executable} is outside its prefix {base}: {_HINT}')
    if _interp_range(Path(executable).read_bytes()) is None:
        raise HostPythonUnsupported(f'python="host": {executable} is statically linked (no ELF interpreter): '
                                    f'{_HINT}')
    return executable


def host_python(home: Path, shared: Iterable[str], progress: Progress | None = None,
                holds: cache.Holds | None = None) -> HostPython:
    """The interpreter's images, built into `home` unless cached. `shared`: the other directories that boxes
    mount at their own paths (site directories, the venv): the libraries of their extension modules are
    brought too. Those below the base prefix (its site-packages without a venv) are in its image.
    `holds`: a runtime's, which holds the images from now on (volumes.directory_image)."""
    executable = check_supported()
    base = os.path.realpath(sys.base_prefix)
    shared = [os.path.realpath(p) for p in shared]
    home_dir = str(home.resolve())
    # The base prefix's own site-packages, unless it is on sys.path (no venv, or system-site-packages): a
    # venv's interpreter does not import from it, and it can be the biggest part of the prefix.
    base_site = os.path.realpath(sysconfig.get_paths(vars={"base": base, "platbase": base})["purelib"])
    unused_site = None if base_site in {os.path.realpath(p) for p in sys.path} else base_site
    exclude = [p for p in (home_dir, unused_site) if p and p.startswith(base + "/")]
    patched = with_interpreter(Path(executable).read_bytes(), LOADER, executable)
    base_image = directory_image(base, home, [os.path.relpath(p, base) for p in exclude], progress,
                                 replace={os.path.relpath(executable, base): patched}, holds=holds)
    dirs = [base, *(p for p in shared if not p.startswith(base + "/"))]
    libs_image = _libraries_image(home, _loader(executable), executable, dirs, unused_site, progress, holds)
    return HostPython(executable=sys.executable, version=sys.version,
                      volumes=((str(base_image), base, "ro"), (str(libs_image), GUEST_LIBS, "ro")))


# -- ELF -------------------------------------------------------------------------------------------------
def _interp_range(data: bytes) -> tuple[int, int] | None:
    """(file offset, size) of the PT_INTERP segment of an x86_64 ELF executable, None if it has none."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1 or struct.unpack_from("<H", data, 0x12)[0] != 0x3E:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_INTERP:
            return p_offset, p_filesz
    return None


def with_interpreter(data: bytes, interp: str, name: str) -> bytes:
    """`data` (an ELF executable) with its PT_INTERP path replaced in place by `interp` (padded with NULs)."""
    found = _interp_range(data)
    new = interp.encode()
    if found is None or len(new) >= found[1]:
        raise HostPythonUnsupported(f'python="host": cannot point {name} at a loader of its own: {_HINT}')
    offset, size = found
    return data[:offset] + new.ljust(size, b"\0") + data[offset + size:]


def _loader(executable: str) -> str:
    data = Path(executable).read_bytes()
    offset, size = _interp_range(data) or (0, 0)
    return os.path.realpath(data[offset:offset + size].rstrip(b"\0").decode())


def _patched_loader(path: str) -> bytes:
    data = Path(path).read_bytes()
    for old, new in _LOADER_EDITS.items():
        assert len(old) == len(new), (old, new)
        if old not in data:
            raise HostPythonUnsupported(f'python="host": the host\'s dynamic loader {path} is not one this '
                                        f'version knows how to relocate (no {old[:-1].decode()!r}): {_HINT}')
        data = data.replace(old, new)
    return data


# -- the libraries -----------------------------------------------------------------------------------------
def _objects(dirs: Iterable[str], skip: str | None) -> Iterator[tuple[str, os.stat_result]]:
    """The shared objects below `dirs` (extension modules, bundled libraries), not below `skip`."""
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            if skip is not None:
                subdirs[:] = [d for d in subdirs if os.path.join(root, d) != skip]
            for name in files:
                if name.endswith(".so") or ".so." in name:
                    path = os.path.join(root, name)
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode):
                        yield path, st


def _closure(files: list[str], inside: list[str]) -> dict[str, str]:
    """NEEDED name -> host path of every library that `files` load, as the host's loader finds them
    (`ldd`), except those below `inside` (found in the box at their own path through RPATH/RUNPATH)."""
    found: dict[str, str] = {}
    for start in range(0, len(files), 200):
        out = subprocess.run(["ldd", *files[start:start + 200]], capture_output=True, text=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            name, arrow, rest = line.strip().partition(" => ")
            if not arrow:
                continue
            path = rest.rsplit(" (", 1)[0].strip()
            if path == "not found" or not path.startswith("/"):
                log.debug("%s: not found on the host either", name)
                continue
            real = os.path.realpath(path)
            if not any(real.startswith(d + "/") for d in inside):
                found.setdefault(name, real)
    return found


def _libraries_image(home: Path, loader: str, executable: str, dirs: list[str], skip: str | None,
                     progress: Progress | None, holds: cache.Holds | None) -> Path:
    objects = sorted(_objects(dirs, skip))
    st = os.stat(loader)
    key = hashlib.sha256(json.dumps([RECIPE, loader, st.st_size, st.st_mtime_ns, executable] + [
        (p, s.st_size, s.st_mtime_ns) for p, s in objects]).encode()).hexdigest()
    store = volume_dir(home)
    dest = store / f"hostpy-libs-{key}.ext4"
    return used_image(dest, "the host python's shared libraries",
                      lambda: _build_libraries_image(home, dest, loader, executable, [p for p, _ in objects], dirs,
                                                     progress), holds)


def _build_libraries_image(home: Path, dest: Path, loader: str, executable: str, objects: list[str],
                           dirs: list[str], progress: Progress | None) -> None:
    # Two processes may both gather the libraries; build_ext4_base's lock lets one of them build the image.
    libs = _closure([executable, *objects], dirs)
    if progress:
        progress(f"gathering the host python's {len(libs)} shared libraries for boxes")
    dest.parent.mkdir(parents=True, exist_ok=True)
    cache.make_room(home, sum(os.stat(p).st_blocks * 512 for p in [loader, *libs.values()]))
    staging = dest.parent / cache.staging_name(".staging-")  # says whose it is, for cache.sweep
    try:
        staging.mkdir()
        (staging / "ld").write_bytes(_patched_loader(loader))
        os.chmod(staging / "ld", 0o755)
        for name, path in libs.items():
            if "/" not in name:
                shutil.copy2(path, staging / name)
        build_ext4_base(staging, dest, progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["GUEST_LIBS", "HostPython", "check_supported", "host_python", "system_python",
           "interpreter_dirs"]
