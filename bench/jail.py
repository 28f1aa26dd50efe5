"""The VMM jail's cost (docs/security-vmm.md): the same operations with the jail on and off
(BOXLITE_JAIL=1/0), alternated in one run (on-off, off-on, ...) so that both sides see the same machine
load.

- restore: `Runtime.restore()` of a template and the first exec of `true` after it;
- per test: what a `scope="test"` box costs a test: create, start (restored from its boot snapshot),
  run `true`, remove;
- cold boot: create and boot without a snapshot (`snapshots=False`), first exec of `true`;
- volume: the same with a directory volume (its virtiofsd jailed or not), and a file written through it.
Medians over `--runs` (default 10; cold boots `--boots`, default 3) per side.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

from _common import report, runtime

from vmm import BoxOptions, Volume
from vmm.engines import jail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--boots", type=int, default=3)
    options = parser.parse_args()
    box_options = BoxOptions(memory_mib=512)
    with runtime() as rt:
        template = rt.template(box_options, key="bench/jail.py")
        rt.create(box_options).start().remove()  # the boot snapshot, built once

        def restore() -> None:
            box = rt.restore(template)
            box.exec("true")
            box.remove()

        def per_test() -> None:
            with rt.create(box_options) as box:
                box.exec("true")

        def cold() -> None:
            with rt.create(box_options, snapshots=False) as box:
                box.exec("true")

        def volume() -> None:
            with tempfile.TemporaryDirectory() as shared, \
                    rt.create(box_options, volumes=(Volume(shared, "/mnt/v", "rw"),)) as box:
                box.exec("sh", "-c", "echo x > /mnt/v/f")

        for name, work, runs in (("restore + first exec", restore, options.runs),
                                 ("per-test box (create, start, exec, remove)", per_test, options.runs),
                                 ("cold boot + first exec", cold, options.boots),
                                 ("volume box (boot, write through virtiofs)", volume, options.boots)):
            samples = alternate(work, runs)
            for mode in ("on", "off"):
                report(f"{name}, jail {mode}", samples[mode], "ms", 1000)


def alternate(work: Callable[[], None], runs: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(runs):
        for mode in ("on", "off") if i % 2 else ("off", "on"):  # neither side always follows the other
            os.environ[jail.ENV] = "1" if mode == "on" else "0"
            started = time.perf_counter()
            work()
            samples[mode].append(time.perf_counter() - started)
    os.environ.pop(jail.ENV)
    return samples


if __name__ == "__main__":
    main()
