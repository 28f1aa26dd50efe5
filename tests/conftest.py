"""Shared fixtures: one runtime home for the session and one booted box shared by the tests that only
run commands (booting under TCG costs seconds; tests that need a fresh VM make their own)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vmm import BoxOptions, Runtime

ROOT = Path(__file__).resolve().parent.parent
# Sample projects that tests copy and run in pytest subprocesses, with their own plugins and settings.
collect_ignore = ["projects"]
INNER_RUNS = "-p no:randomly -p no:asyncio"  # PYTEST_ADDOPTS of the inner pytest runs


@pytest.fixture(autouse=True)
def _inner_runs_keep_their_order(request, monkeypatch):
    """pytest-randomly and pytest-asyncio are installed (tests/test_compat.py and the sample project turn them
    on): the inner pytest runs of the other tests keep their order, their snapshot templates between runs (a new
    seed per run would make new ones) and their count of warnings (pytest-asyncio warns without its ini key)."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS when it starts
    monkeypatch.setenv("PYTEST_ADDOPTS", INNER_RUNS)


@pytest.fixture(scope="session")
def runtime():
    # BOXLITE_HOME (set by .ci/run) keeps the default image between runs; else the user's cache.
    with Runtime() as rt:
        yield rt


@pytest.fixture(scope="session")
def shared_box(runtime):
    """A box for tests that do not change it in ways other tests could see."""
    with runtime.create(BoxOptions(env={"BOX_LEVEL": "box"})) as box:
        yield box


def vm_processes(marker: str) -> list[str]:
    """Command lines of qemu/virtiofsd/pasta processes that mention `marker` (a runtime home or box id)."""
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-system|virtiofsd|pasta"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line]


def get_with_retries(port: int) -> str:
    """The page a box serves on the host's 127.0.0.1:`port` (a forwarded port), once it is up."""
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def child_env(tmp_path):
    """Environment for child pythons that use the runtime: same image cache, package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


# The package built into a wheel and an sdist, and installed into a fresh venv (tests/installed.py); a loopback OCI
# registry (Debian's docker-registry) with an auth front, for the image tests (tests/oci_registry.py).
from tests.installed import dists, installed_venv  # noqa: E402,F401
from tests.oci_registry import oci_env  # noqa: E402,F401
