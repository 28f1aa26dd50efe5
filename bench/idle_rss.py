"""Host memory per idle box: RSS and PSS of its host processes, N boxes (default 3) side by side, booted
(`snapshots=False`) and then restored from their boot snapshot (the default).

RSS counts pages shared between boxes (the kernel image qemu keeps, qemu's code) in full for each box;
PSS splits them, so it is what each extra box really costs.
"""

import statistics
import sys
import time

from _common import runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3

with runtime() as rt:
    for way, options in (("booted", BoxOptions(memory_mib=512, snapshots=False)),
                         ("restored", BoxOptions(memory_mib=512))):
        boxes = [rt.create(options).start() for _ in range(N)]
        for box in boxes:
            box.exec("true")
        time.sleep(2)  # let the guests settle to idle
        metrics = [box.metrics() for box in boxes]
        for box in boxes:
            box.remove()
        rss = [m.host_rss_bytes / 2**20 for m in metrics]
        pss = [m.host_pss_bytes / 2**20 for m in metrics]
        guest = [m.memory_used_kib / 1024 for m in metrics]
        print(f"idle {way} box (512 MiB guest), n={N}: host RSS median {statistics.median(rss):.0f} MiB, "
              f"host PSS median {statistics.median(pss):.0f} MiB, guest used median {statistics.median(guest):.0f} MiB")
