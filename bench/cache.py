"""The runtime home as a bounded cache: what a snapshot template takes on disk, and what eviction costs.

- template size on disk: `--templates` (default 3) templates saved with the RAM file as qemu leaves it, and
  as many with its all-zero pages dug out (what the runtime does now), each a box warmed up like a boot
  snapshot (sh and python run once); medians of st_blocks. `--baseline-agent PATH`: as many again, dug out,
  booted with that agent binary (an older build, for before/after figures of an agent change);
- restore time from each kind, interleaved (A/B in one invocation), `--restores` (default 10) each, median,
  and that each restored box works (a file written and read back by python);
- eviction: `cache.evict()` of a home holding `--entries` (default 40) volume images down to half of them,
  and the no-op check a run ends with (`make_room` of a home within its cap), medians of `--runs` (default 5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from _common import report, runtime

from vmm import Box, BoxOptions, Runtime, cache
from vmm.snapshot import Template
from vmm.volumes import directory_image

WARMUP = (("sh", "-c", "true"), ("python3", "-c", "pass"))


def warmup(box: Box) -> tuple[None, None]:
    for argv in WARMUP:
        box.exec(*argv, env={"PYTHONDONTWRITEBYTECODE": "1"})
    return None, None


def templates(rt: Runtime, count: int, baseline_agent: str | None) -> dict[str, list[Template]]:
    """`count` templates of each kind: the RAM file as qemu leaves it, with its zero pages dug out, and (with
    `baseline_agent`) dug out but booted with that agent."""
    stamp = f"{time.time()}"

    def made(kind: str) -> list[Template]:
        return [rt.template(BoxOptions(memory_mib=512), warmup=warmup, key=f"bench/cache.py {kind} {stamp} {i}")
                for i in range(count)]

    with mock.patch.object(cache, "dig_holes", lambda path: None):
        kinds = {"as qemu leaves it": made("dense")}
    kinds["zero pages dug out"] = made("sparse")
    if baseline_agent:
        with mock.patch.dict(os.environ, {"BOXLITE_AGENT": baseline_agent}):
            kinds[f"dug out, agent {Path(baseline_agent).name}"] = made("baseline")
    return kinds


def restores(rt: Runtime, kinds: dict[str, list[Template]], count: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for i in range(count):
        for name, made in kinds.items():
            started = time.perf_counter()
            box = rt.restore(made[i % len(made)])
            box.exec("true")
            times[name].append(time.perf_counter() - started)
            check = box.exec("python3", "-c", "open('/tmp/f', 'w').write('ok'); print(open('/tmp/f').read())")
            assert check.stdout == b"ok\n", check
            box.remove()
    for name, samples in times.items():
        report(f"restore + first exec, RAM file {name}", samples, "ms", 1000)
    first, *others = times
    for name in others:
        print(f"restore time ratio ({name}) / ({first}): "
              f"{statistics.median(times[name]) / statistics.median(times[first]):.2f}")


def eviction(entries: int, runs: int) -> None:
    evicts, checks = [], []
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "src"
        src.mkdir()
        (src / "data").write_bytes(os.urandom(1 << 20))
        for _ in range(runs):
            home = Path(tempfile.mkdtemp(dir=scratch))
            for i in range(entries):
                (src / "n").write_text(str(i))  # a new fingerprint: a new volume image
                directory_image(src, home)
            started = time.perf_counter()
            cache.evict(home, cache.home_size(home) // 2)
            evicts.append(time.perf_counter() - started)
            started = time.perf_counter()
            cache.make_room(home, 0)
            checks.append(time.perf_counter() - started)
    report(f"evict half of {entries} entries", evicts, "ms", 1000)
    report(f"end-of-run check of a home within its cap ({entries // 2} entries)", checks, "ms", 1000)
    home = Path(os.environ.get("BOXLITE_HOME") or runtime().home.root)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        cache.home_size(home)
        samples.append(time.perf_counter() - started)
    files = sum(1 for _ in home.rglob("*"))
    report(f"size of this runtime home ({files} files, {cache.format_size(cache.home_size(home))})", samples,
           "ms", 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=3)
    parser.add_argument("--restores", type=int, default=10)
    parser.add_argument("--entries", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-agent", metavar="PATH", help="an agent binary to compare this one with")
    options = parser.parse_args()
    with runtime() as rt:
        kinds = templates(rt, options.templates, options.baseline_agent)
        for name, made in kinds.items():
            sizes = [cache.disk_size(t.directory) / 2**20 for t in made]
            print(f"template on disk (512 MiB guest), {name}: median {statistics.median(sizes):.1f} MiB, "
                  f"min {min(sizes):.1f}, max {max(sizes):.1f}, n={len(sizes)}")
        restores(rt, kinds, options.restores)
        for made in kinds.values():
            for template in made:
                template.discard()
    eviction(options.entries, options.runs)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
