"""Pull + unpack + ext4 base build of a ~100+ MB image (the default Debian rootfs as one gzip layer)
from a loopback docker-registry, against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d` doing the
same work in the same run. Median of N (default 3) cold runs each; prints the ratio (target <= 1.2).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)

from tests.oci_registry import Registry, tree_layer, write_layout
from vmm.home import Home
from vmm.images import resolve_image
from vmm.images.default import ensure_default_image
from vmm.images.ext4 import _size_for, measure_tree, mkfs_args

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def theirs(ref: str, work: Path) -> float:
    started = time.perf_counter()
    layout, bundle = work / "layout", work / "bundle"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:b"],
                   check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:b", str(bundle)], check=True, capture_output=True)
    data, inodes = measure_tree(bundle / "rootfs")  # the same sizing as ours: only the tools differ
    inode_count = int(inodes * 1.2) + 1024
    size = _size_for(data, inode_count)
    base = work / "base.ext4"
    with open(base, "wb") as f:
        f.truncate(size)
    subprocess.run(mkfs_args(bundle / "rootfs", base, size, inode_count), check=True)
    return time.perf_counter() - started


def ours(ref: str, work: Path) -> float:
    started = time.perf_counter()
    resolve_image(ref, work / "home")
    return time.perf_counter() - started


def main() -> None:
    rootfs = ensure_default_image(Home().root).rootfs
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        layer = tree_layer(rootfs, level=6)
        raw_mb = sum(f.stat().st_size for f in rootfs.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
        write_layout(tmp_path / "src", [layer])
        registry = Registry(tmp_path / "registry")
        try:
            registry.push(tmp_path / "src", "bench/debian")
            print(f"image: {raw_mb:.0f} MB of files, {len(layer) / 1e6:.0f} MB gzip layer "
                  f"(prepared in {time.perf_counter() - t0:.1f} s)")
            ref = f"{registry.host}/bench/debian:latest"
            a, b = [], []
            for i in range(N):
                for samples, fn in ((a, ours), (b, theirs)):
                    work = tmp_path / f"run-{i}-{fn.__name__}"
                    work.mkdir()
                    samples.append(fn(ref, work))
                    shutil.rmtree(work)
            for label, series in (("boxlite pull+unpack+base:", a), ("skopeo copy + umoci unpack + mkfs:", b)):
                print(f"{label:<36} median {statistics.median(series):.2f} s  {[round(x, 2) for x in series]}")
            print(f"ratio (boxlite / tools): {statistics.median(a) / statistics.median(b):.2f} (target <= 1.2)")
        finally:
            registry.stop()


if __name__ == "__main__":
    main()
