"""Cached reuse: the runtime's work in `create(image=...)` (the step before the engine starts) when the
image is already pulled and its base built. Registry image on a loopback docker-registry, plus an
`oci:` layout (re-read every time) and the default image for comparison. Median of N (default 30);
target <= 30 ms.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import report

from tests.oci_registry import IMAGE_CONFIG, Registry, busybox_entries, tar_bytes, write_layout
from vmm import BoxOptions
from vmm.images import resolve_image

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cached-") as tmp:
        layout = Path(tmp) / "layout"
        write_layout(layout, [tar_bytes(busybox_entries())], IMAGE_CONFIG)
        registry = Registry(Path(tmp) / "registry")
        try:
            registry.push(layout, "bench/busybox")
            with _common.runtime() as rt:
                for image in (f"{registry.host}/bench/busybox:latest", f"oci:{layout}", None):
                    rt.create(BoxOptions(image=image)).remove()  # pull / build outside the measurement
                    resolve, create = [], []
                    for _ in range(N):
                        t0 = time.perf_counter()
                        resolve_image(image, rt.home.root)
                        t1 = time.perf_counter()
                        box = rt.create(BoxOptions(image=image))
                        t2 = time.perf_counter()
                        box.remove()
                        resolve.append(t1 - t0)
                        create.append(t2 - t1)
                    report(f"{image or 'default'}: resolve_image()", resolve, "ms", 1000)
                    report(f"{image or 'default'}: create() (runtime work before the engine starts)", create,
                           "ms", 1000)
        finally:
            registry.stop()


if __name__ == "__main__":
    main()
