"""cffi ABI-mode binding of libkrun: dlopen at run time, no compiler at install.

Only the functions the engine calls are declared, with the signatures of libkrun's `include/libkrun.h`
(tests/test_libkrun.py checks them against a copy of those declarations). Every function returns a
negative errno on failure; `Libkrun.call()` turns that into a LibkrunError naming the call.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Any

from cffi import FFI

from ..errors import EngineUnavailable, LibkrunError

log = logging.getLogger(__name__)

CDEF = """
int32_t krun_set_log_level(uint32_t level);
int32_t krun_create_ctx(void);
int32_t krun_free_ctx(uint32_t ctx_id);
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);
int32_t krun_set_kernel(uint32_t ctx_id, const char *kernel_path, uint32_t kernel_format,
                        const char *initramfs, const char *cmdline);
int32_t krun_add_disk2(uint32_t ctx_id, const char *block_id, const char *disk_path,
                       uint32_t disk_format, bool read_only);
int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path);
int32_t krun_add_virtiofs3(uint32_t ctx_id, const char *c_tag, const char *c_path,
                           uint64_t shm_size, bool read_only);
int32_t krun_add_net_unixstream(uint32_t ctx_id, const char *c_path, int fd, uint8_t *const c_mac,
                                uint32_t features, uint32_t flags);
int32_t krun_add_vsock_port2(uint32_t ctx_id, uint32_t port, const char *c_filepath, bool listen);
int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath);
int32_t krun_start_enter(uint32_t ctx_id);
"""

# Constants from libkrun.h.
KERNEL_FORMAT_RAW = 0
KERNEL_FORMAT_ELF = 1
DISK_FORMAT = {"raw": 0, "qcow2": 1}
LOG_LEVEL = {"off": 0, "error": 1, "warning": 2, "info": 3, "debug": 4, "trace": 5}
# COMPAT_NET_FEATURES: CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_UFO | HOST_TSO4 | HOST_UFO, the set libkrun
# itself enables for passt.
NET_FEATURES = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 14)

# Without these the engine cannot boot our kernel + initramfs with the vsock channel at all.
REQUIRED = (
    "krun_set_log_level", "krun_create_ctx", "krun_free_ctx", "krun_set_vm_config", "krun_set_kernel",
    "krun_add_disk2", "krun_add_vsock_port2", "krun_set_console_output", "krun_start_enter",
)
# Calls that do not take the context id as their first argument.
GLOBAL_CALLS = frozenset({"krun_set_log_level", "krun_create_ctx"})

INSTALL_FIX = (
    "install libkrun (`sudo dnf install libkrun` on Fedora, `brew install libkrun` on macOS; "
    "it is not packaged for Debian), or set BOXLITE_LIBKRUN to the path of libkrun.so.1"
)

ffi = FFI()
ffi.cdef(CDEF)


def library_names() -> tuple[str, ...]:
    """`$BOXLITE_LIBKRUN` if set (only that), else the platform's library name."""
    override = os.environ.get("BOXLITE_LIBKRUN")
    if override:
        return (override,)
    if platform.system() == "Darwin":
        # Homebrew's prefix is not on the default dyld path on Apple Silicon.
        return ("libkrun.dylib", "/opt/homebrew/lib/libkrun.dylib", "/usr/local/lib/libkrun.dylib")
    return ("libkrun.so.1",)


class Libkrun:
    """The loaded library. Missing optional symbols surface as `has(name) == False`, not at load."""

    def __init__(self, lib: Any, path: str) -> None:
        self.lib = lib
        self.path = path

    def has(self, name: str) -> bool:
        try:
            getattr(self.lib, name)
        except AttributeError:  # cffi resolves symbols lazily: an older libkrun lacks newer calls
            return False
        return True

    def missing(self) -> list[str]:
        return [name for name in REQUIRED if not self.has(name)]

    def call(self, name: str, *args: Any) -> int:
        """Call `name`; a negative result raises LibkrunError naming the call and errno."""
        if not self.has(name):
            raise EngineUnavailable(f"this libkrun ({self.path}) has no {name}: upgrade libkrun")
        function = getattr(self.lib, name)
        converted = [_convert(arg, kind) for arg, kind in zip(args, ffi.typeof(function).args, strict=False)]
        result = int(function(*converted))
        if result < 0:
            raise LibkrunError(name, -result)
        return result


def _convert(value: Any, kind: Any) -> Any:
    """JSON-friendly values to C: str -> char *, None -> NULL, list of ints -> uint8_t array."""
    if value is None:
        return ffi.NULL
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list) and kind.kind == "pointer":
        return ffi.new(f"{kind.item.cname}[]", value)
    return value


def load() -> Libkrun:
    """dlopen libkrun, or EngineUnavailable naming the fix."""
    found = _load(tuple(library_names()))
    if isinstance(found, EngineUnavailable):
        raise found
    return found


@functools.lru_cache(maxsize=8)
def _load(names: tuple[str, ...]) -> Libkrun | EngineUnavailable:
    """Once a process per set of names: a failed dlopen makes cffi run ctypes' find_library, which
    spawns compilers and linkers (~20 ms), and engine selection runs at every box creation."""
    errors = []
    for name in names:
        try:
            lib = ffi.dlopen(name)
        except OSError as exc:
            errors.append(str(exc).split(".  Additionally")[0])  # drop cffi's find_library() aside
            continue
        log.debug("loaded libkrun from %s", name)
        return Libkrun(lib, name)
    return EngineUnavailable(f"libkrun not installed ({'; '.join(errors)}): {INSTALL_FIX}")
