"""Snapshot templates: restoring a box, and what an idle restored box costs the host.

- restore: `Runtime.restore()` (qemu start, state load, RESUME answered) and the first exec's result after it,
  medians over `--restores` (default 10) one after another;
- memory: `--clones` (default 4) restored side by side and idle: host RSS and PSS each (their RAM is the
  template's file mapped copy-on-write, so PSS splits what they share);
- cold boot to first exec (`snapshots=False`: the path a template build starts with), median of `--boots`
  (default 5).
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import report, runtime

from vmm import BoxOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restores", type=int, default=10)
    parser.add_argument("--clones", type=int, default=4)
    parser.add_argument("--boots", type=int, default=5)
    options = parser.parse_args()
    box_options = BoxOptions(memory_mib=512)
    with runtime() as rt:
        started = time.perf_counter()
        template = rt.template(box_options, key="bench/snapshot.py")
        print(f"template ready in {time.perf_counter() - started:.2f} s (built, or found cached)")
        restores, firsts = [], []
        for _ in range(options.restores):
            started = time.perf_counter()
            box = rt.restore(template)
            restores.append(time.perf_counter() - started)
            box.exec("true")
            firsts.append(time.perf_counter() - started)
            box.remove()
        report("restore", restores, "ms", 1000)
        report("restore + first exec of `true`", firsts, "ms", 1000)
        boxes = [rt.restore(template) for _ in range(options.clones)]
        for box in boxes:
            box.exec("true")
        time.sleep(2)  # idle
        metrics = [box.metrics() for box in boxes]
        rss = statistics.median(m.host_rss_bytes / 2**20 for m in metrics)
        pss = statistics.median(m.host_pss_bytes / 2**20 for m in metrics)
        print(f"idle restored box (512 MiB guest), {options.clones} side by side: host RSS median {rss:.0f} MiB, "
              f"PSS median {pss:.0f} MiB")
        for box in boxes:
            box.remove()
        boots = []
        for _ in range(options.boots):
            started = time.perf_counter()
            with rt.create(box_options, snapshots=False) as box:
                box.exec("true")
                boots.append(time.perf_counter() - started)
        report("cold create + boot + first exec", boots)


if __name__ == "__main__":
    main()
