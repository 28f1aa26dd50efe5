"""Shared bits of the benchmarks: a runtime home and figure printing (median of several runs)."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm import Runtime  # noqa: E402
from vmm.log import enable_from_env  # noqa: E402


def runtime() -> Runtime:
    enable_from_env()  # BOXLITE_LOG=debug shows what the runtime does during a benchmark
    return Runtime(os.environ.get("BOXLITE_HOME"))


def report(name: str, samples: list[float], unit: str = "s", scale: float = 1.0) -> None:
    values = sorted(s * scale for s in samples)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    print(f"{name}: median {statistics.median(values):.3f} {unit}, p95 {p95:.3f} {unit}, "
          f"min {values[0]:.3f} {unit}, n={len(values)}")
