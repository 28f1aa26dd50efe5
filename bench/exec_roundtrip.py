"""Exec round trip of `true` (median/p95 of N, default 200), beside the bare agent round trip (PING)."""

import sys
import time

from _common import report, runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200

with runtime() as rt, rt.create(BoxOptions()) as box:
    box.exec("true")
    pings, execs = [], []
    for _ in range(N):
        t0 = time.perf_counter()
        box.ping()
        pings.append(time.perf_counter() - t0)
    for _ in range(N):
        t0 = time.perf_counter()
        box.exec("true")
        execs.append(time.perf_counter() - t0)
    report("agent round trip (PING/PONG)", pings, "ms", 1000)
    report("exec('true') round trip", execs, "ms", 1000)
