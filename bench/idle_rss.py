"""Host memory per idle box: RSS and PSS of its host processes, N boxes (default 3) side by side, booted
(`snapshots=False`), restored from their boot snapshot (the default), and restored with `network="full"`
(without the network policy's pasta: what the policy costs in memory); and the host CPU an idle box uses
(its qemu's CPU time over 5 s).

RSS counts pages shared between boxes (the kernel image qemu keeps, qemu's code) in full for each box;
PSS splits them, so it is what each extra box really costs.
"""

import os
import statistics
import sys
import time

from _common import runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3
IDLE_SECONDS = 5


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


with runtime() as rt:
    for way, options in (("booted", BoxOptions(memory_mib=512, snapshots=False)),
                         ("restored", BoxOptions(memory_mib=512)),
                         ("restored network='full'", BoxOptions(memory_mib=512, network="full"))):
        boxes = [rt.create(options).start() for _ in range(N)]
        for box in boxes:
            box.exec("true")
        time.sleep(2)  # let the guests settle to idle
        pids = [box._vm.pid for box in boxes]
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(IDLE_SECONDS)
        cpu = [(cpu_seconds(pid) - b) / IDLE_SECONDS * 100 for pid, b in zip(pids, before, strict=True)]
        metrics = [box.metrics() for box in boxes]
        for box in boxes:
            box.remove()
        rss = [m.host_rss_bytes / 2**20 for m in metrics]
        pss = [m.host_pss_bytes / 2**20 for m in metrics]
        guest = [m.memory_used_kib / 1024 for m in metrics]
        print(f"idle {way} box (512 MiB guest), n={N}: host RSS median {statistics.median(rss):.0f} MiB, "
              f"host PSS median {statistics.median(pss):.0f} MiB, "
              f"guest used median {statistics.median(guest):.0f} MiB, "
              f"host CPU while idle median {statistics.median(cpu):.1f}% of a core")
