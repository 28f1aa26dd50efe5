"""Cold start: `create()` + `start()` to the first exec result, median of N rounds (default 5).

Each round measures both ways `start()` can go, one after the other:
- default (`snapshots=True`): start() restores the boot snapshot of these options (saved once, before the
  rounds, by the first start: that build time is printed too);
- `snapshots=False`: start() boots the kernel and the agent (what every box without a snapshot pays);
- and a restore with `network="full"`, beside the default `"internet"`: what the network policy (a namespace,
  its nftables rules and pasta, per box: vmm/engines/network.py) costs a restored box.
"""

import statistics
import sys
import time

from _common import report, runtime

from vmm import BoxOptions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5
POLICY, NO_POLICY = "restored from the boot snapshot (network='internet')", "restored, network='full' (no policy)"
WAYS = {POLICY: BoxOptions(), NO_POLICY: BoxOptions(network="full"),
        "booted (snapshots=False)": BoxOptions(snapshots=False)}


def first_exec(rt, options: BoxOptions) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    box = rt.create(options)
    t1 = time.perf_counter()
    box.start()
    t2 = time.perf_counter()
    box.exec("true")
    t3 = time.perf_counter()
    box.remove()
    return t1 - t0, t2 - t1, t3 - t0


with runtime() as rt:
    rt.create(BoxOptions(snapshots=False)).remove()  # the image and boot-file caches, outside the measurement
    built = rt.metrics().templates_built
    _, start, _ = first_exec(rt, BoxOptions())
    if rt.metrics().templates_built > built:
        print(f"first start of these options (boots, saves the boot snapshot, restores it): {start:.3f} s")
    samples = {way: ([], [], []) for way in WAYS}
    for _ in range(N):
        for way, options in WAYS.items():
            for series, value in zip(samples[way], first_exec(rt, options), strict=True):
                series.append(value)
    for way, (create, start, first) in samples.items():
        print(f"-- {way}")
        report("create() (runtime work before the engine starts)", create, "ms", 1000)
        report("start() to agent ready", start)
        report("create()+start() to first exec result", first)
    policy = statistics.median(samples[POLICY][2]) - statistics.median(samples[NO_POLICY][2])
    print(f"the network policy per restored box (median to first exec, internet - full): {policy * 1000:.1f} ms")
