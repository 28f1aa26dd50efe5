"""The runtime home as a bounded cache: what a snapshot template takes on disk, and what eviction costs.

- template size on disk: `--templates` (default 3) templates saved with the RAM file as qemu leaves it, and
  as many with its all-zero pages dug out (what the runtime does now), each a box warmed up like a boot
  snapshot (sh and python run once); medians of st_blocks;
- restore time from each kind, interleaved (A/B in one invocation), `--restores` (default 10) each, median;
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

from vmm import BoxOptions, cache
from vmm.volumes import directory_image

WARMUP = (("sh", "-c", "true"), ("python3", "-c", "pass"))


def warmup(box):  # type: ignore[no-untyped-def]
    for argv in WARMUP:
        box.exec(*argv, env={"PYTHONDONTWRITEBYTECODE": "1"})
    return None, None


def templates(rt, count: int) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    """`count` templates saved as qemu leaves them, and `count` with their zero pages dug out."""
    stamp = f"{time.time()}"
    with mock.patch.object(cache, "dig_holes", lambda path: None):
        dense = [rt.template(BoxOptions(memory_mib=512), warmup=warmup, key=f"bench/cache.py dense {stamp} {i}")
                 for i in range(count)]
    sparse = [rt.template(BoxOptions(memory_mib=512), warmup=warmup, key=f"bench/cache.py sparse {stamp} {i}")
              for i in range(count)]
    return dense, sparse


def restores(rt, dense, sparse, count: int) -> None:  # type: ignore[no-untyped-def]
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for i in range(count):
        for name, template in (("dense", dense[i % len(dense)]), ("sparse", sparse[i % len(sparse)])):
            started = time.perf_counter()
            box = rt.restore(template)
            box.exec("true")
            times[name].append(time.perf_counter() - started)
            box.remove()
    for name, samples in times.items():
        report(f"restore + first exec, RAM file {name}", samples, "ms", 1000)
    ratio = statistics.median(times["sparse"]) / statistics.median(times["dense"])
    print(f"restore time ratio sparse/dense: {ratio:.2f}")


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
    options = parser.parse_args()
    with runtime() as rt:
        dense, sparse = templates(rt, options.templates)
        for name, made in (("as qemu leaves it", dense), ("zero pages dug out", sparse)):
            sizes = [cache.disk_size(t.directory) / 2**20 for t in made]
            print(f"template on disk (512 MiB guest), {name}: median {statistics.median(sizes):.1f} MiB, "
                  f"min {min(sizes):.1f}, max {max(sizes):.1f}, n={len(sizes)}")
        restores(rt, dense, sparse, options.restores)
        for template in dense + sparse:
            template.discard()
    eviction(options.entries, options.runs)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
