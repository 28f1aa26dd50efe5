"""`pytest --boxlite` with snapshots: each test a pristine VM restored from a template, with its own entropy
and the host's clock; templates found again, and rebuilt when the project changes."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap

import pytest

from vmm import Runtime

pytest_plugins = ["pytester"]

BUILDING = "*saving a snapshot template*"

# Host side only (the guest loads this conftest too, where `boxlite_box` is not set on reports): how far the
# guest's clock at the end of each test is from the host's when its report arrives.
CONFTEST = """
import time

def pytest_runtest_logreport(report):
    if getattr(report, "boxlite_box", None) and report.when == "call":
        print(f"CLOCK {report.nodeid} {time.time() - report.stop:.3f}")
"""

SEQUENCE = """
import os, pathlib, random, subprocess, uuid

STATE = "/root/state"

def dirty():
    pathlib.Path(STATE).write_text("left by an earlier test")
    pathlib.Path("left-in-project").write_text("x")
    subprocess.Popen(["sleep", "1000"])
    os.environ["LEFT_BEHIND"] = "1"
    pathlib.Path("/proc/sys/kernel/sysrq").write_text("0")

def sleeping(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    except OSError:
        return False

def pristine():
    assert not pathlib.Path(STATE).exists()
    assert not pathlib.Path("left-in-project").exists()
    assert "LEFT_BEHIND" not in os.environ
    assert not [p for p in os.listdir("/proc") if p.isdigit() and sleeping(p)]
    assert pathlib.Path("/proc/sys/kernel/sysrq").read_text().strip() != "0"
    print("RANDOM", uuid.uuid4(), random.random(), os.urandom(8).hex())

def test_1():
    pristine()
    dirty()

def test_2():
    pristine()
    dirty()

def test_3():
    pristine()
    dirty()
"""


@pytest.fixture(autouse=True)
def _same_runtime_home(monkeypatch):
    monkeypatch.setenv("BOXLITE_HOME", str(Runtime().home.root))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--boxlite", "-rP", "-p", "no:cacheprovider", *args)


def test_each_test_gets_a_pristine_vm_with_its_own_randomness_and_the_hosts_clock(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sequence=SEQUENCE)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*snapshots on*", BUILDING, "*3 boxes restored from snapshots*"])
    output = result.stdout.str()
    randoms = re.findall(r"^RANDOM (\S+) (\S+) (\S+)$", output, re.M)  # the tests' captured output (-rP)
    assert len(randoms) == 3
    for column in zip(*randoms, strict=True):  # uuid4, random.random(), os.urandom: all different
        assert len(set(column)) == 3, randoms
    clocks = [float(c) for c in re.findall(r"CLOCK \S+ (-?[0-9.]+)", output)]
    assert len(clocks) == 3 and all(-1.0 < c < 1.0 for c in clocks), clocks
    boxes = set(re.findall(r"\[box ([0-9a-f]{12})\]", output))
    assert len(boxes) == 3


def test_templates_are_found_again_and_rebuilt_when_the_project_changes(pytester):
    # The project in a directory of its own: pytester writes its runs' output files beside it.
    project = pytester.mkdir("project")
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text("import pytest\n\n@pytest.fixture\ndef word():\n    return 'one'\n")
    (project / "test_word.py").write_text("def test_word(word):\n    assert word == 'one'\n")
    first = run(pytester, "project")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines([BUILDING])
    again = run(pytester, "project")
    again.assert_outcomes(passed=1)
    again.stdout.no_fnmatch_line(BUILDING)  # found in the runtime home
    (project / "conftest.py").write_text("import pytest\n\n@pytest.fixture\ndef word():\n    return 'two'\n")
    changed = run(pytester, "project")
    changed.stdout.fnmatch_lines([BUILDING])
    changed.assert_outcomes(failed=1)  # the box saw the new conftest.py


def test_no_snapshots_boots_each_box(pytester):
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = run(pytester, "--boxlite-no-snapshots")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*snapshots off*"])
    result.stdout.no_fnmatch_line(BUILDING)
    assert "restored" not in result.stdout.str()


def test_a_crash_in_a_restored_box_is_that_tests_error(pytester):
    pytester.makepyfile(test_crash=textwrap.dedent("""
        import os
        def test_exits():
            os._exit(3)
        def test_after():
            pass
    """))
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*the box crashed while running this test*python exited with status 3*"])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs over the templates needs root")
def test_no_room_for_the_template_boots_a_box_for_each_test_instead(pytester):
    # Over the shared home's templates for this test only: a home of its own would differ in what the
    # plugin leaves out of its images of the project and packages, and build them all again.
    templates = Runtime().home.templates
    pytester.makepyfile(test_two="def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "boxlite-test", str(templates)], check=True)
    try:
        result = run(pytester)
    finally:
        subprocess.run(["umount", str(templates)], check=True)
    result.assert_outcomes(passed=2)
    assert result.stdout.str().count("MiB free") == 1
    result.stdout.fnmatch_lines(["*free some space*booting a box for each of these tests instead*",
                                 "*2 boxes booted*"])
    assert "restored" not in result.stdout.str()
