"""The plugin with real VMs: boxed runs match local runs, hostile tests do no harm, crashes and timeouts are
that test's failure while the session goes on, junitxml is valid, Ctrl-C leaves nothing behind.

Each inner pytest run boots boxes (seconds each under TCG): scenarios share runs, `scope="session"`/`"module"`
keeps the number of boxes low.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import pytest

from vmm import Runtime

from .conftest import vm_processes

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _same_runtime_home(monkeypatch):
    """pytester points HOME at a temporary directory: keep the real runtime home (and its cached image)."""
    monkeypatch.setenv("BOXLITE_HOME", str(Runtime().home.root))

CONFTEST = """
import pytest

@pytest.fixture
def greeting():
    return "hello"

@pytest.fixture(scope="module")
def counter():
    return {"n": 0}
"""

FEATURES = """
import os, sys, pytest

def test_fixture(greeting):
    assert greeting == "hello"

@pytest.mark.parametrize("a,b", [(1, 1), (2, 3), (4, 4)])
def test_param(a, b):
    assert a == b

class TestClass:
    def test_method(self, counter):
        counter["n"] += 1
        assert counter["n"] == 1

    def test_shares_the_module_fixture(self, counter):
        counter["n"] += 1
        assert counter["n"] == 2

def test_capsys(capsys):
    print("out here")
    sys.stderr.write("err here\\n")
    assert capsys.readouterr() == ("out here\\n", "err here\\n")

def test_tmp_path(tmp_path):
    (tmp_path / "f").write_text("x")
    assert (tmp_path / "f").read_text() == "x"

def test_monkeypatch(monkeypatch):
    monkeypatch.setenv("BOXLITE_PARITY", "1")
    assert os.environ["BOXLITE_PARITY"] == "1"

def test_warns():
    import warnings
    warnings.warn(UserWarning("from the box"))

def test_rewritten_assert():
    data = {"a": 1, "b": 2}
    assert data == {"a": 1, "b": 3}

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.xfail(strict=True)
def test_xpass_strict():
    pass

@pytest.mark.skipif(True, reason="never")
def test_skipif():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_setup_error(broken):
    pass

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown broke")

def test_teardown_error(bad_teardown):
    print("captured output of a passing test")

def test_deselected_by_k():
    assert False, "-k should have deselected this"
"""

# Only ever run boxed: locally it would do what it says.
HARMFUL = """
import os, shutil

def test_writes_the_project_and_deletes_host_files():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "precious.txt"), "w") as f:
        f.write("overwritten in the box")
    os.unlink(os.path.join(here, "conftest.py"))
    shutil.rmtree(os.path.expanduser("~"), ignore_errors=True)
    shutil.rmtree("/work", ignore_errors=True)
    shutil.rmtree("/root", ignore_errors=True)
    assert not os.path.exists(os.path.join(here, "conftest.py"))
"""


def outcomes(xml_path) -> dict[str, str]:
    """testcase name -> outcome, from a junitxml file (which also proves it parses)."""
    result = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[case.get("name")] = ",".join(kinds) or "passed"
    return result


def test_a_boxed_run_matches_a_local_run_and_harms_nothing(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_features=FEATURES)
    (pytester.path / "precious.txt").write_text("keep me")
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not deselected",
                                          f"--junitxml={pytester.path / 'local.xml'}")
    pytester.makepyfile(test_harmful=HARMFUL)
    before = {p.name: p.read_bytes() for p in pytester.path.iterdir()
              if p.is_file() and p.name not in ("stdout", "stderr")}
    boxed = pytester.runpytest_subprocess("--boxlite", "-o", "boxlite_scope=session", "-p", "no:cacheprovider", "-v",
                                          "-rA", "-k", "not deselected", f"--junitxml={pytester.path / 'boxed.xml'}")
    counts = local.parseoutcomes()
    assert counts == {"failed": 3, "passed": 10, "skipped": 1, "xfailed": 1, "errors": 2, "deselected": 1,
                      "warnings": 1}
    assert boxed.parseoutcomes() == {**counts, "passed": counts["passed"] + 1}
    boxed_outcomes = outcomes(pytester.path / "boxed.xml")
    assert boxed_outcomes.pop("test_writes_the_project_and_deletes_host_files") == "passed"
    assert boxed_outcomes == outcomes(pytester.path / "local.xml")
    # Rewritten assertion messages come from the guest; -v names the box; the summary counts boxes.
    boxed.stdout.fnmatch_lines_random([
        "*test_rewritten_assert FAILED [[]box *]*",
        "E       AssertionError: assert {'a': 1, 'b': 2} == {'a': 1, 'b': 3}",
        "*captured output of a passing test*",
        "*UserWarning: from the box*",
        "*boxlite: 17 tests in boxes, 1 boxes booted*16 tests in reused boxes*",
    ])
    boxed.stdout.fnmatch_lines(["boxlite: every test in a box, engine *, scope session, pool *"])
    # The box wrote, overwrote and deleted: none of it reached the host.
    assert (pytester.path / "precious.txt").read_text() == "keep me"
    assert (pytester.path / "conftest.py").exists()
    assert os.path.isdir(os.path.expanduser("~")) and os.path.isdir("/work")
    after = {p.name: p.read_bytes() for p in pytester.path.iterdir()
             if p.is_file() and p.name not in ("boxed.xml", "stdout", "stderr")}
    assert after == before


CRASHES = """
import ctypes, os, time, pytest

pytestmark = pytest.mark.boxlite(timeout=10)

def test_exit():
    os._exit(3)

def test_segfault():
    ctypes.string_at(0)

def test_hangs():
    time.sleep(600)

def test_panics():
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")

def test_last():
    pass

def test_not_boxed_under_k():
    pass
"""


def test_crashes_and_timeouts_are_that_tests_failure_and_the_session_goes_on(pytester):
    pytester.makepyfile(test_crashes=CRASHES)
    # A fresh VM per test, three booting ahead at a time: the crashes do not wait for each other's boots.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not not_boxed", "-v",
                                           "-o", "boxlite_pool_size=3", "--boxlite-keep")
    result.assert_outcomes(passed=1, failed=4, deselected=1)
    # --boxlite-keep: the boxes of the crashed tests stay for inspection, with their console logs.
    kept = [line.rsplit(": ", 1)[1] for line in result.outlines if "kept the box of a failed test" in line]
    assert len(kept) == 4, result.outlines
    for directory in kept:
        assert os.path.exists(os.path.join(directory, "console.log"))
        Runtime().remove(os.path.basename(directory))
    result.stdout.fnmatch_lines_random([
        "*test_exit FAILED*",
        ("*the box crashed while running this test: the worker ended while running the test*python exited with "
         "status 3*"),
        "*python was killed by SIGSEGV*",
        "Fatal Python error: Segmentation fault",
        "*, line * in test_segfault",
        "Timeout: running the test took more than * s in box *; the test was killed*",
        "*the guest kernel panicked (sysrq triggered crash)*",
        "--- last lines of the box console ---",
        "*test_last PASSED*",
    ])
    assert "Traceback" not in result.stdout.str().split("short test summary")[1]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_boxed_run_leaves_nothing(pytester, child_env):
    pytester.makepyfile(test_sleepy=textwrap.dedent("""
        import sys, time
        def test_sleeps():
            print("STARTED", flush=True)
            time.sleep(600)
    """))
    before = set(vm_processes(""))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--boxlite", "-s", "-p", "no:cacheprovider"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=pytester.path,
                            env=child_env, preexec_fn=_default_sigint)  # noqa: PLW1509 - before threads
    try:
        for line in proc.stdout:
            if "STARTED" in line:  # echoed from the guest's stdout with -s
                break
        else:
            pytest.fail("the boxed test never started")
        started = set(vm_processes("")) - before  # this run's qemu (and virtiofsd, for booted boxes) processes
        assert any("qemu-system" in p for p in started), started
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()  # the test failed before its Ctrl-C: leave nothing running
            proc.communicate()
    assert "KeyboardInterrupt" in rest
    deadline = time.monotonic() + 30
    while started & set(vm_processes("")):
        assert time.monotonic() < deadline, started & set(vm_processes(""))
        time.sleep(0.2)


def test_box_fixtures_run_on_the_host_and_clean_up(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.boxlite(memory_mib=256, env={"WHO": "marker"})
        def test_box(box):
            assert box.exec("sh", "-c", "echo $WHO").stdout == b"marker\\n"
            assert box.options.memory_mib == 256

        def test_factory(box_factory, boxlite_runtime):
            one, two = box_factory(env={"N": "1"}), box_factory(env={"N": "2"}, network=False)
            assert [b.exec("sh", "-c", "echo $N").stdout for b in (one, two)] == [b"1\\n", b"2\\n"]
            assert boxlite_runtime.metrics().active_boxes >= 2
    """))
    result = pytester.runpytest_subprocess("--boxlite", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert not vm_processes(str(pytester.path))


XDIST_MODULE = """
import os

def test_{name}_one():
    assert os.path.exists("/proc/1/comm")

def test_{name}_two():
    assert open("/proc/1/comm").read().strip() == "init"  # PID 1 of a box is its agent
"""


def test_under_pytest_xdist_each_worker_runs_its_own_boxes(pytester):
    for name in ("alpha", "beta"):
        pytester.makepyfile(**{f"test_{name}": XDIST_MODULE.format(name=name)})
    result = pytester.runpytest_subprocess("-n", "2", "--boxlite", "-o", "boxlite_scope=module", "-v",
                                           "-p", "no:cacheprovider", timeout=900)
    result.assert_outcomes(passed=4)
    boxes = {line.split("[box ")[1].split("]")[0] for line in result.outlines if "PASSED [box " in line}
    assert len(boxes) >= 2, result.outlines  # one box per module at least, from the workers' own pools
