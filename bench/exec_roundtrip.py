"""Exec round trip of `true` (median/p95 of N, default 200), beside the bare agent round trip (PING) and the
exec of a static binary (busybox in the agent's own root: no dynamic loading, no chroot, no user lookup).

The three are interleaved, so that a slow spell of the machine weighs on each alike. Under TCG, what `true`
costs beyond PING is mostly the guest kernel creating a process (see docs/engines.md).
"""

import sys
import time

from _common import report, runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200

with runtime() as rt, rt.create(BoxOptions()) as box:
    box.exec("true")
    ways = {
        "agent round trip (PING/PONG)": box.ping,
        "exec('true') round trip": lambda: box.exec("true"),
        "exec of a static binary (busybox true, agent root)":
            lambda: box.spawn("/bin/busybox", "true", _root="agent").communicate(),
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(N):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            samples[name].append(time.perf_counter() - t0)
    for name, values in samples.items():
        report(name, values, "ms", 1000)
