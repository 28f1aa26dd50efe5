"""Coverage through boxes: `pytest --boxlite --cov` counts the lines a local run counts (term, xml and json
reports), with boxes restored from a snapshot per test, booted per module and per session, and under
pytest-xdist; code the tests run in subprocesses and multiprocessing children is counted as locally;
`coverage run -m pytest --boxlite` says to use --cov.

The sample project tests/projects/calc runs in a copy, in pytest subprocesses as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .installed import fresh_venv, user_env
from .test_plugin_run import outcomes

CALC = Path(__file__).resolve().parent / "projects" / "calc"
REPORTS = ("--cov=calc", "--cov-report=term-missing")
ENV = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # the sample project uses pytest-asyncio

# Every scope in one boxed run (a conftest only the boxed run has): snapshot clones, module boxes, a session box.
SCOPES = """
import pytest

SCOPES = {"test_core.py": "test", "test_async.py": "module", "test_io.py": "module", "test_procs.py": "session"}


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.boxlite(scope=SCOPES[item.path.name]))
"""


@pytest.fixture
def calc(tmp_path) -> Path:
    return Path(shutil.copytree(CALC, tmp_path / "calc", ignore=shutil.ignore_patterns(".hypothesis", ".coverage")))


def run(project: Path, name: str, *args: str, python: str | Path = sys.executable,
        env: dict[str, str] = ENV) -> tuple[str, dict]:
    """Run pytest in `project` with coverage reports named `name`; its output and the reports' lines."""
    command = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *REPORTS,
               f"--cov-report=xml:{name}.xml", f"--cov-report=json:{name}.json", f"--junitxml={name}-junit.xml", *args]
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, reports(project, name, done.stdout)


def reports(project: Path, name: str, output: str) -> dict:
    """What each report says, per file: the term table, the xml's lines and hits, the json's lines."""
    term = output[output.index("Name "):output.index("TOTAL")]
    lines = {}
    for cls in ET.parse(project / f"{name}.xml").getroot().iter("class"):
        lines[cls.get("filename")] = [(line.get("number"), line.get("hits")) for line in cls.iter("line")]
    files = json.loads((project / f"{name}.json").read_text())["files"]
    executed = {path: (data["executed_lines"], data["missing_lines"]) for path, data in files.items()}
    return {"term": term, "xml": lines, "json": executed,
            "outcomes": outcomes(project / f"{name}-junit.xml")}


@pytest.mark.slow
def test_boxed_coverage_equals_a_local_run_in_every_scope(calc):
    _, local = run(calc, "local")
    assert local["json"]["calc/procs.py"][1] == []  # a subprocess and pool workers ran every line there
    assert local["outcomes"]["test_fib_negative"] == "skipped"  # (xfail)
    (calc / "tests" / "conftest.py").write_text(SCOPES)
    output, boxed = run(calc, "boxed", "--boxlite")
    assert "boxlite: 18 tests in boxes, 7 boxes restored from snapshots" in output, output
    assert "4 boxes booted" in output, output  # the template's, two modules' and the session's
    assert boxed == local


@pytest.mark.slow
def test_boxed_coverage_under_pytest_xdist_equals_a_local_run(calc):
    _, local = run(calc, "local")
    output, boxed = run(calc, "boxed", "--boxlite", "-n", "2")
    assert "2 workers [18 items]" in output, output
    assert boxed == local


@pytest.mark.slow
def test_a_users_project_from_the_wheel_with_numpy_its_plugins_and_cov(dists, calc, tmp_path):
    """As a user has it: the wheel in a fresh venv outside the checkout (nothing pointing into it), numpy and the
    CI plugins from the registry, `pytest --boxlite --cov`: the outcomes and covered lines of a local run."""
    python = fresh_venv(tmp_path / "user-venv", dists.wheel, "numpy", "pytest-cov", "coverage>=7.10",
                        "pytest-xdist", "hypothesis", "pytest-asyncio", "pytest-timeout")
    env = {k: v for k, v in user_env().items() if k != "PYTEST_ADDOPTS"}
    _, local = run(calc, "local", python=python, env=env)
    assert local["outcomes"]["test_normalize"] == "passed"  # numpy is there: its test ran
    output, boxed = run(calc, "boxed", "--boxlite", python=python, env=env)
    assert "boxlite: 18 tests in boxes, 18 boxes restored from snapshots" in output, output
    assert boxed == local


def test_coverage_run_is_told_to_use_cov(calc):
    """`coverage run` measures the host's process only: said once, at the start, before any box starts."""
    command = [sys.executable, "-m", "coverage", "run", "-m", "pytest", "-p", "no:cacheprovider", "--boxlite",
               "--collect-only", "-q"]
    done = subprocess.run(command, cwd=calc, capture_output=True, text=True, timeout=300)
    said = [line for line in done.stdout.splitlines() if "runs under `coverage run`" in line]
    assert said == ["boxlite: warning: this pytest runs under `coverage run`, which measures the host's process "
                    "only: lines run in boxes are not counted. Use pytest-cov: `pytest --boxlite --cov=PACKAGE`."]
    assert done.stdout.index(said[0]) < done.stdout.index("test_add")
    with_cov = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--boxlite", "--cov=calc",
                               "--collect-only", "-q"], cwd=calc, capture_output=True, text=True, timeout=300)
    assert "coverage run" not in with_cov.stdout
