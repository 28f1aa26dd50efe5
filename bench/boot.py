"""Cold boot: `create()` + `start()` to the first exec result, median of N (default 5)."""

import sys
import time

from _common import report, runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5

with runtime() as rt:
    rt.create(BoxOptions()).remove()  # warm the image and boot-file caches outside the measurement
    create, boot, first = [], [], []
    for _ in range(N):
        t0 = time.perf_counter()
        box = rt.create(BoxOptions())
        t1 = time.perf_counter()
        box.start()
        t2 = time.perf_counter()
        box.exec("true")
        t3 = time.perf_counter()
        box.remove()
        create.append(t1 - t0)
        boot.append(t2 - t1)
        first.append(t3 - t0)
    report("create() (runtime work before the engine starts)", create, "ms", 1000)
    report("start() to agent ready", boot)
    report("create()+start() to first exec result", first)
