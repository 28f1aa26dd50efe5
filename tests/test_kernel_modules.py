"""The initramfs builder on made-up module trees: drivers built into the kernel (Ubuntu's generic and kvm
kernels build virtio, virtio_blk, virtio_console and virtio_mmio in) are not looked for as modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.errors import EngineUnavailable
from vmm.kernel import Kernel, build_initramfs

MODULES = {  # path in the tree: its dependencies
    "kernel/fs/fuse/fuse.ko": [],
    "kernel/fs/fuse/virtiofs.ko": ["kernel/fs/fuse/fuse.ko"],
    "kernel/fs/overlayfs/overlay.ko": [],
    "kernel/drivers/net/virtio_net.ko": ["kernel/drivers/net/net_failover.ko"],
    "kernel/drivers/net/net_failover.ko": [],
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": [],
}
BUILTIN = ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
           "kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/block/virtio_blk.ko",
           "kernel/drivers/char/virtio_console.ko"]


def tree(root: Path, modules: dict[str, list[str]], builtin: list[str]) -> Kernel:
    mods = root / "lib" / "modules" / "6.8.0-51-generic"
    for path in modules:
        (mods / path).parent.mkdir(parents=True, exist_ok=True)
        (mods / path).write_bytes(b"\x7fELF made-up module " + path.encode())
    (mods / "modules.dep").write_text(
        "".join(f"{p}: {' '.join(d)}\n".replace(": \n", ":\n") for p, d in modules.items()))
    (mods / "modules.builtin").write_text("".join(f"{p}\n" for p in builtin))
    (root / "vmlinuz").write_bytes(b"")
    return Kernel(root / "vmlinuz", mods)


def initramfs(tmp_path: Path, kernel: Kernel) -> bytes:
    for name in ("agent", "busybox"):
        (tmp_path / name).write_bytes(b"made-up " + name.encode())
    return build_initramfs(kernel, tmp_path / "agent", tmp_path / "busybox")


def test_built_in_drivers_are_not_loaded(tmp_path):
    cpio = initramfs(tmp_path, tree(tmp_path / "root", MODULES, BUILTIN))
    for name in ("virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "virtio_console"):
        assert f"lib/modules/{name}.ko".encode() not in cpio
    order = ("lib/modules/overlay.ko\nlib/modules/net_failover.ko net\nlib/modules/virtio_net.ko net\n"
             "lib/modules/fuse.ko fs\nlib/modules/virtiofs.ko fs\n")
    assert b"modules.order\0" in cpio and order.encode() in cpio
    assert b"made-up module kernel/fs/fuse/virtiofs.ko" in cpio


def test_a_core_driver_neither_built_in_nor_a_module_is_named(tmp_path):
    kernel = tree(tmp_path / "root", MODULES, [p for p in BUILTIN if "virtio_blk" not in p])
    with pytest.raises(EngineUnavailable, match=r"kernel 6.8.0-51-generic has no virtio_blk \(neither built in"):
        initramfs(tmp_path, kernel)


def test_a_box_has_its_modules_loaded_and_their_files_discarded(shared_box):
    """The agent loads the drivers at boot and then discards their files (zeroed, so that the memory they held
    is no part of a snapshot's RAM file): the drivers work, and the initramfs keeps only the agent and busybox."""
    loaded = shared_box.exec("cat", "/proc/modules").stdout.decode()
    assert "overlay " in loaded and "virtio_blk " in loaded
    left = shared_box.spawn("/bin/busybox", "find", "/lib/modules", "/modules.order", "/init", "/bin",
                            _root="agent").communicate()[0].decode().split()
    assert left == ["/lib/modules", "/init", "/bin", "/bin/busybox"]
    assert shared_box.exec("sh", "-c", "echo ok > /tmp/f && cat /tmp/f").stdout == b"ok\n"
