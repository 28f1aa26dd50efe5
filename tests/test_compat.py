"""The plugins CI suites use, in boxes as locally: pytest-asyncio, hypothesis, pytest-timeout,
pytest-rerunfailures, pytest-randomly, pytest-mock, junitxml's record_property and record_testsuite_property,
and the host's -x, --lf and --sw. Each scenario runs locally and boxed (a snapshot clone per test), and the two
runs must agree. docs/compatibility.md has the list and what differs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vmm import Runtime

pytest_plugins = ["pytester"]

PLUGINS = """
import asyncio, random, time
import pytest
from hypothesis import given, strategies as st

TRIES = {"n": 0}

@pytest.mark.asyncio
async def test_asyncio():
    assert await asyncio.sleep(0, result=7) == 7

@pytest.mark.flaky(reruns=2)
def test_passes_on_its_second_try():
    TRIES["n"] += 1
    assert TRIES["n"] == 2

def test_mocker(mocker):
    mocker.patch("time.time", return_value=42.0)
    assert time.time() == 42.0

def test_records(record_property, record_testsuite_property):
    record_property("answer", 42)
    record_testsuite_property("suite", "from a box")

def test_random_values(record_property):
    record_property("random", random.random())  # pytest-randomly seeds each test from --randomly-seed

@pytest.mark.timeout(2)
def test_times_out():
    time.sleep(60)

@given(st.integers())
def test_hypothesis_finds_a_counterexample(n):
    assert n < 1000

@given(st.lists(st.integers(), min_size=3))
def test_hypothesis_passes(values):
    assert sorted(values)[0] == min(values)
"""

STEPS = """
def test_1():
    pass

def test_2():
    assert False

def test_3():
    pass

def test_4():
    assert False
"""

# Hypothesis's own default profile, also under CI (its "ci" profile has no database); with REUSE set, a run
# tries only the examples the database holds (Phase.reuse): it fails only if a run before saved the failure.
EXAMPLES = """
import os
from hypothesis import Phase, given, settings, strategies as st

settings.register_profile("reuse", settings.get_profile("default"), phases=[Phase.reuse])
settings.load_profile("reuse" if os.environ.get("REUSE") else "default")

@settings(deadline=None)
@given(st.integers())
def test_property(n):
    assert n < 1000
"""


@pytest.fixture(autouse=True)
def _plugins_on(pytester, monkeypatch):
    """The real runtime home (pytester moves HOME); the plugins the other tests' inner runs turn off."""
    monkeypatch.setenv("BOXLITE_HOME", str(Runtime().home.root))
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


def cases(path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, outcome, properties) of each testcase of a junitxml file, in its order."""
    found = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        properties = [(p.get("name"), p.get("value")) for p in case.iter("property") if p.get("name") != "boxlite_box"]
        found.append((case.get("name"), ",".join(kinds) or "passed", properties))
    return found


def suite_properties(path) -> list[tuple[str, str]]:
    suite = ET.parse(path).getroot().find("testsuite")
    return [(p.get("name"), p.get("value")) for p in suite.findall("properties/property")]


def pytest_in(project, *args: str) -> pytest.RunResult:
    """pytest run in `project` (pytester's own runs write their output files into the project, which would
    give every boxed run a new template)."""
    done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=project, capture_output=True, text=True,
                          timeout=900)
    return pytest.RunResult(done.returncode, done.stdout.splitlines(), done.stderr.splitlines(), 0.0)


def test_ci_plugins_give_a_boxed_run_the_outcomes_of_a_local_run(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_plugins.py").write_text(PLUGINS)
    (project / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    # xunit1: junitxml's testcase properties (xunit2 has none).
    args = ("-p", "no:cacheprovider", "-p", "randomly", "--randomly-seed=1234", "-rA", "-o", "junit_family=xunit1")
    local = pytest_in(project, *args, f"--junitxml={tmp_path / 'local.xml'}")
    boxed = pytest_in(project, "--boxlite", *args, f"--junitxml={tmp_path / 'boxed.xml'}")
    counts = local.parseoutcomes()
    assert counts == {"passed": 6, "failed": 2, "rerun": 1}
    assert boxed.parseoutcomes() == counts
    assert "boxlite: 8 tests in boxes, 8 boxes restored from snapshots" in boxed.stdout.str()
    # Same seed, so the same order of tests and the same random values in them; the properties as recorded.
    assert cases(tmp_path / "boxed.xml") == cases(tmp_path / "local.xml")
    assert suite_properties(tmp_path / "boxed.xml") == [("suite", "from a box")]
    # Again: the template is found, though plugins give box workers values new every run (pytest-rerunfailures'
    # port and token, in their workerinput): the boxes did not read them while the template was made.
    again = pytest_in(project, "--boxlite", *args)
    assert again.parseoutcomes() == counts
    assert "snapshot templates built" not in again.stdout.str()
    for result in (local, boxed):
        result.stdout.fnmatch_lines_random([
            "Using --randomly-seed=1234",
            "*Failed: Timeout (>2.0s) from pytest-timeout.*",
            "E       Failing test case: test_hypothesis_finds_a_counterexample(",
            "E           n=1000,",
        ])


def test_hypothesis_examples_found_in_boxes_are_saved_in_the_projects_database(tmp_path, monkeypatch):
    """A boxed run saves the failing example it found in the host's .hypothesis/examples, as a local run would:
    the next run, local or boxed (here scope module: a booted box that reads the project as it is now),
    replays it from the database first."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_examples.py").write_text(EXAMPLES)
    (project / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    args = ("-p", "no:cacheprovider", "-p", "no:randomly")
    database = project / ".hypothesis" / "examples"
    failure = ["E       Failing test case: test_property(", "E           n=1000,"]

    monkeypatch.setenv("REUSE", "1")
    assert pytest_in(project, *args).parseoutcomes() == {"skipped": 1}  # nothing saved yet: nothing to replay
    monkeypatch.delenv("REUSE")
    found = pytest_in(project, "--boxlite", *args)
    assert found.parseoutcomes() == {"failed": 1}
    assert "boxlite: 1 tests in boxes, 1 boxes restored from snapshots" in found.stdout.str()
    found.stdout.fnmatch_lines(failure)
    assert any(path.is_file() for path in database.rglob("*"))

    monkeypatch.setenv("REUSE", "1")
    for replay in (pytest_in(project, *args), pytest_in(project, "--boxlite", "-o", "boxlite_scope=module", *args)):
        assert replay.parseoutcomes() == {"failed": 1}
        replay.stdout.fnmatch_lines(failure)


def _summary(result) -> tuple[dict[str, int], list[str]]:
    """The counts, and the node ids of the tests that ran, with their outcomes (-rA lines)."""
    ran = [line for line in result.outlines if re.match(r"(PASSED|FAILED) ", line)]
    return result.parseoutcomes(), [line.split(" - ")[0] for line in ran]


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(("-x",), None), ((), ("--lf",)), (("--sw",), ("--sw",))],
                         ids=["x", "lf", "sw"])
def test_x_lf_and_sw_act_on_boxed_runs_as_on_local_ones(pytester, first, second):
    """The host selects and stops (its cache has the boxed tests' outcomes), the boxes run what it selected."""
    pytester.makepyfile(test_steps=STEPS)
    runs = {}
    for mode in ("local", "boxed"):
        extra = ("--boxlite", "-p", "no:randomly") if mode == "boxed" else ("-p", "no:randomly")
        shutil.rmtree(pytester.path / ".pytest_cache", ignore_errors=True)  # each pair starts afresh
        runs[mode] = [_summary(pytester.runpytest_subprocess(*extra, "-rA", *first, timeout=900))]
        if second is not None:
            runs[mode].append(_summary(pytester.runpytest_subprocess(*extra, "-rA", *second, timeout=900)))
    assert runs["boxed"] == runs["local"]
