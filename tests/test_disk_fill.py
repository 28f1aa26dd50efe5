"""A test that fills its box's disk fails only itself: the writes stay inside the box's limits, not on the host.

A box's writes go to its upper layer, a tmpfs in guest RAM (docs/security.md, "Disk"): the root, /tmp and a
copy-on-write project all fill one tmpfs of half the box's memory, and the host's disk is not touched; a VM
restored from a snapshot maps the template's RAM file copy-on-write, so its writes never reach that file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmm import BoxOptions, Runtime, Volume
from vmm.volumes import directory_image

pytest_plugins = ["pytester"]

MEMORY_MIB = 512
# What the fill may add to the host's disk: console and qemu logs, a box.json (the box's ~236 MiB of
# writes, if they leaked to the host, would show far above this).
HOST_DISK_SLACK = 16 << 20
FILL = 'for d in / /tmp "$0"; do dd if=/dev/zero of="$d/boxlite-fill" bs=1M 2>&1 | grep -c "No space left"; done'


def _allocated(*roots: Path) -> int:
    """Bytes of disk allocated to the files below `roots` (what they hold, sparse holes not counted)."""
    total = 0
    for root in roots:
        for directory, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def test_filling_the_disk_stays_in_the_box(runtime: Runtime, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_x.py").write_text("def test_x(): pass\n")
    # As the plugin mounts a project for boxes restored from snapshots: an ext4 image of it, copy-on-write.
    options = BoxOptions(memory_mib=MEMORY_MIB, network=False,
                         volumes=(Volume(str(directory_image(project, runtime.home.root)), str(project), "cow"),))
    with runtime.create(options) as box:
        before = _allocated(runtime.home.root, tmp_path)
        done = box.exec("sh", "-c", FILL, str(project), timeout=300)
        assert done.stdout.split() == [b"1", b"1", b"1"], done  # each of the three ended in ENOSPC
        used = box.exec("df", "-k", "/", str(project)).stdout.decode()
        grown = _allocated(runtime.home.root, tmp_path) - before
        assert grown < HOST_DISK_SLACK, f"the host's disk grew by {grown >> 20} MiB:\n{used}"
        assert box.metrics().host_rss_bytes < (MEMORY_MIB + 256) << 20  # RAM, VMM and its translation cache
        assert box.exec("true").exit_code == 0  # the full box still answers
    assert (project / "test_x.py").read_text() == "def test_x(): pass\n"
    assert sorted(p.name for p in project.iterdir()) == ["test_x.py"]
    # The next box of the same make-up (restored from the same snapshot) has its whole disk.
    with runtime.create(options) as box:
        assert box.exec("sh", "-c", "dd if=/dev/zero of=/f bs=1M count=64 2>&1").exit_code == 0


PLUGIN_TESTS = """
import errno, os

HERE = os.path.dirname(os.path.abspath(__file__))

def fill(directory):
    with open(os.path.join(directory, "boxlite-fill"), "wb") as f:
        while True:
            f.write(b"\\0" * (1 << 20))

def test_fills_the_disk():
    for directory in ("/", "/tmp"):
        try:
            fill(directory)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    fill(HERE)  # fails the test: No space left on device

def test_next_has_its_disk(tmp_path):
    (tmp_path / "f").write_bytes(b"\\0" * (64 << 20))
    assert not os.path.exists(os.path.join(HERE, "boxlite-fill"))
"""


def test_a_boxed_test_that_fills_the_disk_fails_only_itself(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                             runtime: Runtime) -> None:
    monkeypatch.setenv("BOXLITE_HOME", str(runtime.home.root))  # pytester moves HOME; keep the image cache
    pytester.makepyfile(test_fill=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("--boxlite", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines_random([
        "*test_fills_the_disk FAILED*",
        "*OSError: [[]Errno 28[]] No space left on device*",
        "*test_next_has_its_disk PASSED*",
    ])
    assert not (pytester.path / "boxlite-fill").exists()
