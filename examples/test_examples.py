"""The plugin demo (`make demo` runs it with `pytest --boxlite`): every test here runs in its own microVM."""

import os
import platform
import shutil

import pytest


def test_runs_in_a_microvm():
    # The guest has its own kernel and hostname: this is not the host.
    assert platform.node().startswith("box-")
    print("kernel", platform.release(), "hostname", platform.node())


@pytest.mark.boxlite(memory_mib=256, scope="module")
def test_marked_with_its_own_resources():
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    assert total_kib < 256 * 1024


def test_untrusted_code_deletes_everything_and_does_no_harm():
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.rmtree(here, ignore_errors=True)  # the project itself: the box's copy-on-write view only
    shutil.rmtree(os.path.expanduser("~"), ignore_errors=True)
    shutil.rmtree("/usr/share", ignore_errors=True)
    assert not os.path.exists(here)


def test_drives_a_box_of_its_own(box):
    # Tests using the `box` fixture run on the host and control a box themselves.
    result = box.exec("python3", "-c", "print(6 * 7)")
    assert result.stdout == b"42\n"
