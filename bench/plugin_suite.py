"""The plugin's overhead on a suite of trivial tests (default 200):

  (a) plain pytest on the host
  (b) the same suite run by pytest inside one box (boot not counted: `box.exec("python3", "-m", "pytest")`)
  (c) `pytest --boxlite` with scope="module": one box and one worker for the whole module
  (d) `pytest --boxlite` with scope="test": a fresh VM per test, each restored from a snapshot template
      (boot, `import pytest` and collection paid once, when the template is built: run once to build it,
      then `--repeat` times with it cached)
  (e) the same with `--boxlite-no-snapshots`: every VM booted, on the first N tests only (`--fresh N`,
      default 4: under TCG each costs seconds; the figure is per test either way)

(a)-(d) run `--repeat` times (default 3), interleaved; the figures are medians. `--relay-only` runs (a)-(c):
the relay's figure, which needs many tests (`--tests 1000`) to rise above the noise of guest start-up.

Prints the per-test overhead of (c) and (d) over (b): the relay's cost, and a fresh VM's.

`--images`: instead, a suite that imports numpy (`--tests`, in a fresh venv with numpy and this plugin) under
`pytest --boxlite` (scope=test, snapshots) with the default image and with the `host` image (both run the
host's interpreter, python="host"), and with the default image's own python3 (python="image"): the template
build time of each (numpy in the project), then `--repeat` interleaved runs with the templates cached; prints
the per-test overhead of each over plain pytest on the host and the host image's over the default image's.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import runtime

from vmm import BoxOptions

ROOT = Path(__file__).resolve().parent.parent


def write_suite(directory: Path, tests: int) -> Path:
    lines = ["import pytest", ""]
    lines += [f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n" for i in range(tests)]
    path = directory / "test_trivial.py"
    path.write_text("\n".join(lines))
    (directory / "pytest.ini").write_text("[pytest]\n")
    return path


def write_numpy_suite(directory: Path, tests: int) -> None:
    lines = ["import numpy as np", ""]
    lines += [f"def test_{i}():\n    assert np.ones({i + 1}).sum() == {i + 1}\n" for i in range(tests)]
    (directory / "test_numpy.py").write_text("\n".join(lines))
    (directory / "pytest.ini").write_text("[pytest]\n")


def numpy_venv(directory: Path) -> str:
    """The python of a fresh venv with numpy and this plugin (editable)."""
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    python = str(directory / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "numpy", "-e", str(ROOT)], check=True)
    return python


# pytest-randomly (installed for the tests) would give every run a new seed, hence new snapshot templates.
QUIET = ("-q", "-p", "no:cacheprovider", "-p", "no:randomly")


def run_pytest(directory: Path, *args: str, python: str = sys.executable) -> float:
    return run_pytest_output(directory, *args, python=python)[0]


def run_pytest_output(directory: Path, *args: str, python: str = sys.executable) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([python, "-m", "pytest", *QUIET, *args], cwd=directory,
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    print(f"    {done.stdout.strip().splitlines()[-1]}", flush=True)
    return elapsed, done.stdout


def images(tests: int, repeat: int) -> None:
    """The default and the `host` image on a suite that imports numpy (see the module's doc)."""
    # The `host` image is the default root with the host's interpreter: python="host" on the default image is
    # the same box (and template); python="image" is the image's own python3 (the host's version here).
    names = {"default": [], "host": ["--boxlite-image=host"], "default, python=image": ["--boxlite-python=image"]}
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-") as tmp:
        directory = Path(tmp) / "project"
        directory.mkdir()
        write_numpy_suite(directory, tests)
        python = numpy_venv(Path(tmp) / "venv")
        builds = {}
        for name, args in names.items():
            print(f"{name} image, {tests} tests importing numpy: building the snapshot template", flush=True)
            _, out = run_pytest_output(directory, "--boxlite", *args, python=python)
            found = re.search(r"snapshot templates built \(([\d.]+) s\)", out)
            builds[name] = f"{float(found.group(1)):.1f} s" if found else "none (an earlier one serves)"
        hosts: list[float] = []
        runs: dict[str, list[float]] = {name: [] for name in names}
        for run in range(1, repeat + 1):
            print(f"run {run}/{repeat}: plain pytest on the host", flush=True)
            hosts.append(run_pytest(directory, python=python))
            for name, args in names.items():
                print(f"run {run}/{repeat}: pytest --boxlite, {name} image", flush=True)
                runs[name].append(run_pytest(directory, "--boxlite", *args, python=python))
    host = statistics.median(hosts)
    print()
    print(f"medians of {repeat} interleaved runs, {tests} tests importing numpy, scope=test, snapshots on")
    print(f"host: {host:.2f} s")
    overhead = {}
    for name in names:
        total = statistics.median(runs[name])
        overhead[name] = (total - host) / tests
        print(f"{name + ' image:':28} {total:6.2f} s; per-test overhead {overhead[name] * 1000:.0f} ms; "
              f"template build (numpy in the project) {builds[name]}; runs: "
              f"{', '.join(f'{r:.2f}' for r in runs[name])} s")
    print(f"host image / default image, per-test overhead: {overhead['host'] / overhead['default']:.2f}")


def inside_one_box(directory: Path) -> tuple[float, float]:
    """(boot seconds, seconds for `python3 -m pytest` in the booted box)."""
    from pytest_boxlite.provision import site_directories

    paths = site_directories()
    volumes = [(str(directory), str(directory), "cow")] + [(p, p, "ro") for p in paths]
    with runtime() as rt:
        box = rt.create(BoxOptions(volumes=volumes))
        started = time.perf_counter()
        box.start()
        boot = time.perf_counter() - started
        with box:
            started = time.perf_counter()
            result = box.exec("python3", "-m", "pytest", *QUIET, str(directory),
                              cwd=str(directory), env={"PYTHONPATH": os.pathsep.join(paths)})
            elapsed = time.perf_counter() - started
        if result.exit_code != 0:
            raise SystemExit(f"pytest in the box failed:\n{result.stdout[-3000:]!r}{result.stderr[-2000:]!r}")
        print(f"    {result.stdout.decode().strip().splitlines()[-1]}", flush=True)
    return boot, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--fresh", type=int, default=4, help="tests run with scope=test and booted VMs")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a)-(d), interleaved; medians")
    parser.add_argument("--relay-only", action="store_true", help="run (a), (b) and (c) only")
    parser.add_argument("--images", action="store_true",
                        help="the default and the host image on a suite that imports numpy, instead")
    options = parser.parse_args()
    if options.images:
        images(options.tests, options.repeat)
        return
    clones_too = not options.relay_only
    n = options.tests
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-") as tmp:
        directory = Path(tmp)
        write_suite(directory, n)
        # Interleaved, so that a slow spell of the machine hits (b) and (c) alike; guest pytest start-up
        # varies by seconds under TCG, which is tens of ms per test over 200 tests.
        hosts, boots, in_boxes, modules, clones = [], [], [], [], []
        if clones_too:
            print(f"(d) pytest --boxlite, scope=test, {n} tests: building the snapshot template", flush=True)
            build = run_pytest(directory, "--boxlite", "-o", "boxlite_scope=test")
        for run in range(1, options.repeat + 1):
            print(f"run {run}/{options.repeat}", flush=True)
            print(f"(a) plain pytest on the host, {n} tests", flush=True)
            hosts.append(run_pytest(directory))
            print(f"(b) pytest inside one box, {n} tests", flush=True)
            boot, in_box = inside_one_box(directory)
            boots.append(boot)
            in_boxes.append(in_box)
            print(f"(c) pytest --boxlite, scope=module, {n} tests", flush=True)
            modules.append(run_pytest(directory, "--boxlite", "-o", "boxlite_scope=module"))
            if clones_too:
                print(f"(d) pytest --boxlite, scope=test (snapshots), {n} tests", flush=True)
                clones.append(run_pytest(directory, "--boxlite", "-o", "boxlite_scope=test"))
        host, boot, in_box, module = (statistics.median(v) for v in (hosts, boots, in_boxes, modules))
        if clones_too:
            print(f"(e) pytest --boxlite --boxlite-no-snapshots, scope=test, first {options.fresh} tests", flush=True)
            fresh = run_pytest(directory, "--boxlite", "--boxlite-no-snapshots", "-o", "boxlite_scope=test",
                               *[f"test_trivial.py::test_{i}" for i in range(options.fresh)])
    print()
    print(f"medians of {options.repeat} interleaved runs; (c) runs: {', '.join(f'{m:.2f}' for m in modules)} s, "
          f"(b) runs: {', '.join(f'{b:.2f}' for b in in_boxes)} s")
    print(f"(a) host:              {host:7.2f} s  ({host / n * 1000:.1f} ms per test, python start included)")
    print(f"(b) inside one box:    {in_box:7.2f} s  (+ {boot:.2f} s boot)")
    print(f"(c) --boxlite module:  {module:7.2f} s")
    if clones_too:
        clone = statistics.median(clones)
        print(f"(d) --boxlite test:    {clone:7.2f} s  (the run that built the template: {build:.2f} s); "
              f"runs: {', '.join(f'{c:.2f}' for c in clones)} s")
        print(f"(e) no snapshots:      {fresh:7.2f} s  for {options.fresh} tests")
    relay = (module - host - boot - in_box) / n
    print(f"per-test overhead of (c) over (b): {relay * 1000:.1f} ms "
          f"((c) - (b) - boot - the host's own pytest start, / {n})")
    if clones_too:
        print(f"per-test overhead of (d) over (b): {(clone - host - in_box) / n * 1000:.1f} ms "
              f"(a fresh VM per test: (d) - (b) - the host's own pytest start, / {n})")
        print(f"per test with a booted fresh VM (e): {fresh / options.fresh:.2f} s")


if __name__ == "__main__":
    main()
