"""Host memory per idle box: RSS of its qemu process(es), N boxes (default 3) booted side by side."""

import statistics
import sys
import time

from _common import runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3

with runtime() as rt:
    boxes = [rt.create(BoxOptions(memory_mib=512)).start() for _ in range(N)]
    for box in boxes:
        box.exec("true")
    time.sleep(2)  # let the guests settle to idle
    rss = [box.metrics().host_rss_bytes / 2**20 for box in boxes]
    print(f"idle box host RSS (512 MiB guest): median {statistics.median(rss):.0f} MiB, "
          f"max {max(rss):.0f} MiB, n={N}")
