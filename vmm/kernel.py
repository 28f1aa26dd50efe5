"""The guest kernel: find it, extract the uncompressed vmlinux for PVH boot, build the initramfs.

Both are cached under `home/kernels/<key>/`, keyed by the kernel, its modules, the agent and busybox.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from . import agent
from .errors import EngineUnavailable

log = logging.getLogger(__name__)

# What the agent loads, in this order; dependencies come from the kernel's modules.dep. The core group is
# always loaded; the others only when the VM has the device (`boxlite.modules=` on the kernel command line).
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("virtio_mmio", "virtio_blk", "virtio_console", "overlay"),
    "net": ("virtio_net",),
    "fs": ("virtiofs",),
    "vsock": ("vmw_vsock_virtio_transport",),
}
BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")
RECIPE = "3"  # bump when the initramfs layout changes
SIG_MAGIC = b"~Module signature appended~\n"

# Compressed payload magics inside a bzImage, with the way to decompress each.
_MAGICS = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


@dataclass(frozen=True)
class Kernel:
    """A kernel image and the module tree that belongs to it."""

    image: Path
    modules: Path

    @property
    def release(self) -> str:
        return self.modules.name


@dataclass(frozen=True)
class BootFiles:
    vmlinux: Path  # uncompressed ELF with a PVH note (boots without decompression)
    initramfs: Path  # uncompressed newc cpio: the agent as /init, busybox, modules
    release: str


def find_kernel(image: str | os.PathLike[str] | None = None, modules: str | os.PathLike[str] | None = None) -> Kernel:
    """The named kernel, else `$BOXLITE_KERNEL`, else the newest Debian cloud kernel, else the newest in /boot."""
    image = image or os.environ.get("BOXLITE_KERNEL")
    modules = modules or os.environ.get("BOXLITE_KERNEL_MODULES")
    if image:
        path = Path(image)
        if not path.is_file():
            raise EngineUnavailable(f"kernel {path} does not exist: pass an existing kernel image (bzImage or vmlinux)")
        if not modules:
            release = path.name.removeprefix("vmlinuz-").removeprefix("vmlinux-")
            modules = Path("/lib/modules") / release
        kernel = Kernel(path, Path(modules))
    else:
        candidates = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"), key=_version_key) or sorted(
            Path("/boot").glob("vmlinuz-*"), key=_version_key
        )
        if not candidates:
            raise EngineUnavailable(
                "no guest kernel found in /boot: install one with `sudo apt-get install linux-image-cloud-amd64` "
                "(or run `make setup`), or set BOXLITE_KERNEL to a kernel image"
            )
        path = candidates[-1]
        kernel = Kernel(path, Path("/lib/modules") / path.name.removeprefix("vmlinuz-"))
    if not kernel.modules.is_dir():
        raise EngineUnavailable(
            f"no module tree for kernel {kernel.image} at {kernel.modules}: install the kernel package, "
            "or set BOXLITE_KERNEL_MODULES to its /lib/modules/<release> directory"
        )
    if not os.access(kernel.image, os.R_OK):
        raise EngineUnavailable(
            f"cannot read the guest kernel {kernel.image} (Debian makes /boot/vmlinuz-* readable by root only): "
            f"run `sudo chmod 0644 {kernel.image}`, or copy it somewhere readable and set BOXLITE_KERNEL"
        )
    return kernel


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in path.name.replace("-", ".").split(".")]


def boot_files(kernels_dir: Path, kernel: Kernel, agent_path: Path) -> BootFiles:
    """The cached vmlinux + initramfs for this kernel and agent, built once under a file lock."""
    busybox = next((Path(p) for p in BUSYBOX if Path(p).is_file()), None)
    if busybox is None:
        raise EngineUnavailable("busybox not found: install it with `sudo apt-get install busybox-static`")
    key = hashlib.sha256()
    for part in (RECIPE, kernel.image, kernel.modules, MODULE_GROUPS):
        key.update(str(part).encode() + b"\0")
    for path in (kernel.image, busybox):
        st = path.stat()
        key.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
    key.update(agent.digest(agent_path).encode())
    out = kernels_dir / f"{kernel.release}-{key.hexdigest()[:16]}"
    files = BootFiles(out / "vmlinux", out / "initramfs.cpio", kernel.release)
    if files.vmlinux.is_file() and files.initramfs.is_file():
        return files
    kernels_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if files.vmlinux.is_file() and files.initramfs.is_file():
            return files
        log.info("building guest boot files for kernel %s in %s", kernel.release, out)
        # Named after `out` (whose lock the build holds): vmm/cache.py removes it if the build was interrupted.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=kernels_dir))
        try:
            (tmp / "vmlinux").write_bytes(extract_vmlinux(kernel.image.read_bytes()))
            (tmp / "initramfs.cpio").write_bytes(build_initramfs(kernel, agent_path, busybox))
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return files


def extract_vmlinux(image: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (or the image itself if it is already an ELF)."""
    if image[:4] == b"\x7fELF":
        return image
    if image[0x202:0x206] != b"HdrS":
        raise EngineUnavailable("the guest kernel is neither a bzImage nor an ELF vmlinux")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = image[start : start + payload_length]
    for magic, method in _MAGICS:
        if payload.startswith(magic):
            data = _decompress(method, payload)
            if data[:4] != b"\x7fELF":
                break
            return data
    raise EngineUnavailable("cannot extract vmlinux from the guest kernel (unknown compression)")


def _decompress(method: str, payload: bytes) -> bytes:
    if method == "gzip":
        return gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    if method == "xz":
        return lzma.LZMADecompressor().decompress(payload)
    tool = {"lz4": ["lz4", "-dc"], "zstd": ["zstd", "-dc"]}[method]
    if shutil.which(tool[0]) is None:
        raise EngineUnavailable(
            f"the guest kernel is {method}-compressed and `{tool[0]}` is missing: "
            f"install it with `sudo apt-get install {tool[0]}`"
        )
    # The payload may carry trailing bytes (the kernel's size field): the tool complains but the output is whole.
    done = subprocess.run(tool, input=payload, capture_output=True, check=False)
    return done.stdout


def module_closure(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for `wanted` and their dependencies, dependencies first; absent modules are skipped."""
    deps = module_deps(modules_dir)
    by_name = {_module_name(p): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        else:
            log.debug("module %s not in %s (built in, or absent)", name, modules_dir)
    return [modules_dir / p for p in order]


def module_deps(modules_dir: Path) -> dict[str, list[str]]:
    """The kernel's loadable modules (paths relative to `modules_dir`) and what each depends on."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    return deps


def builtin_modules(modules_dir: Path) -> frozenset[str]:
    """Names of the drivers built into the kernel (its `modules.builtin`; none if the file is missing)."""
    try:
        return frozenset(_module_name(line) for line in (modules_dir / "modules.builtin").read_text().split())
    except FileNotFoundError:
        return frozenset()


def _require_modules(kernel: Kernel, names: tuple[str, ...]) -> None:
    """Every box needs the core drivers: a kernel that has them neither built in nor as modules cannot boot one."""
    present = {_module_name(path) for path in module_deps(kernel.modules)}
    absent = [name for name in names if name not in present]
    if absent:
        raise EngineUnavailable(
            f"kernel {kernel.release} has no {', '.join(absent)} (neither built in, by its modules.builtin, nor a "
            f"module in {kernel.modules}): boxes need virtio-mmio, virtio-blk, virtio-console and overlayfs; "
            "use a kernel that has them (Debian's linux-image-cloud-amd64) through BOXLITE_KERNEL"
        )


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return strip_signature(data)


def strip_signature(module: bytes) -> bytes:
    """The module without its appended signature: verifying RSA under TCG costs tens of ms per module.

    The kernel then only taints itself ("module verification failed"); modules come from the host's
    own module tree, which the host trusts anyway.
    """
    if not module.endswith(SIG_MAGIC):
        return module
    # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], __be32 sig_len
    info = module[-len(SIG_MAGIC) - 12 : -len(SIG_MAGIC)]
    signer_len, key_id_len = info[3], info[4]
    (sig_len,) = struct.unpack(">I", info[8:12])
    end = len(module) - len(SIG_MAGIC) - 12 - sig_len - signer_len - key_id_len
    return module[:end] if end > 0 else module


def build_initramfs(kernel: Kernel, agent_path: Path, busybox: Path) -> bytes:
    """An uncompressed newc cpio (no compression: the kernel unpacks it faster than it inflates)."""
    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "bin", "lib", "lib/modules", "lower", "upper", "newroot", "mnt", "tmp"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    # The kernel opens /dev/console before /init runs: it must exist in the archive.
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("init", stat.S_IFREG | 0o755, agent_path.read_bytes())
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    order, seen = [], set()
    builtin = builtin_modules(kernel.modules)
    for group, wanted in MODULE_GROUPS.items():
        # Ubuntu's kernels build virtio, virtio_blk and virtio_console in; Debian's have them as modules.
        loadable = tuple(name for name in wanted if name not in builtin)
        if group == "core":
            _require_modules(kernel, loadable)
        for path in module_closure(kernel.modules, loadable):
            if path in seen:
                continue
            seen.add(path)
            name = f"lib/modules/{_module_name(path.name)}.ko"
            cpio.add(name, stat.S_IFREG | 0o644, _read_module(path))
            order.append(name if group == "core" else f"{name} {group}")
    cpio.add("modules.order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode())
    return cpio.finish()


class _Cpio:
    """A minimal writer of the newc format the kernel reads (no root needed for device nodes)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._write(header + name.encode() + b"\0")
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self._out.getvalue()
