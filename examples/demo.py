"""The runtime demo (`make demo`): boot microVMs from the embedded default image and run commands in them,
showing what ran where and how long each step took."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm import BoxliteError, BoxOptions, Runtime  # noqa: E402
from vmm.engines import kvm_status, select  # noqa: E402
from vmm.log import enable_from_env  # noqa: E402


@contextmanager
def step(what: str):
    start = time.perf_counter()
    print(f"  {what} ...", end="", flush=True)
    yield
    print(f" {time.perf_counter() - start:.2f} s", flush=True)


def show(where: str, result) -> None:
    for line in result.stdout.decode().strip().splitlines():
        print(f"    [{where}] {line}")


def main() -> None:
    enable_from_env()  # BOXLITE_LOG=debug: what the runtime does, on stderr
    engine = select("auto")
    print(f"host: {platform.node()} ({platform.system()} {platform.release()}), python {platform.python_version()}")
    print(f"engine: {engine.describe()} -- {kvm_status().reason}")
    with Runtime(progress=lambda msg: print(f"  {msg}", flush=True)) as rt:
        print(f"runtime home: {rt.home.root}")
        with step("preparing the default image (first time: a few minutes)"):
            box = rt.create(BoxOptions(name="demo-one", memory_mib=512, env={"GREETING": "hello from a microVM"}))
        with step(f"starting box {box.id[:12]} (restored from a boot snapshot; the first time: booted and saved)"):
            box.start()
        with box:
            with step("python3 in the box"):
                result = box.exec("python3", "-c", "import os, platform; print(os.environ['GREETING']);"
                                  "print('kernel', platform.release(), 'hostname', platform.node())")
            show(box.id[:12], result)
            with step("the box's view of its root"):
                result = box.exec("sh", "-c", "rm -rf /usr/share/* && echo 'deleted /usr/share inside the box'; "
                                  "df -h / | tail -1")
            show(box.id[:12], result)
            with tempfile.TemporaryDirectory() as shared:
                Path(shared, "from-host.txt").write_text("a file shared read-only from the host\n")
                with step("second box with a read-only volume and no network (a virtiofs share: booted)"):
                    other = rt.create(BoxOptions(name="demo-two", network=False, volumes=[(shared, "/data", "ro")]))
                    other.start()
                with other:
                    with step("reading the volume, trying to write to it"):
                        result = other.exec("sh", "-c", "cat /data/from-host.txt; echo x > /data/new 2>&1 || "
                                            "echo 'write refused: the volume is read-only'; ls /sys/class/net")
                    show(other.id[:12], result)
                    with step("both boxes at once"):
                        results = [b.exec("cat", "/proc/sys/kernel/hostname") for b in (box, other)]
                    for b, r in zip((box, other), results, strict=True):
                        show(b.id[:12], r)
            with step("streaming output"):
                execution = box.spawn("sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.2; done")
                lines = [chunk.decode().strip() for chunk in execution.stdout]
                execution.wait()
            print(f"    [{box.id[:12]}] {' | '.join(lines)}")
            metrics = box.metrics()
            print(f"  box {box.id[:12]}: {metrics.memory_used_kib // 1024} MiB used in the guest, "
                  f"{metrics.host_rss_bytes // 2**20} MiB RSS on the host, {metrics.exec_count} commands")
    still_there = Path("/usr/share").exists() and any(Path("/usr/share").iterdir())
    print(f"host /usr/share untouched: {still_there}")
    m = rt.metrics()
    print(f"done: {m.boxes_created} boxes, {m.boots} boots ({m.boot_seconds / max(1, m.boots):.2f} s each), "
          f"{m.restores} restores ({m.restore_seconds / max(1, m.restores):.2f} s each), {m.exec_calls} commands")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        main()
    except BoxliteError as exc:  # the runtime's errors say what to do: no traceback
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        sys.exit(1)
