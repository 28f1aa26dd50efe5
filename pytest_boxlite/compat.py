"""What cannot work in boxes, said once at start-up (a line of the report header): the plugins and tools
that measure or gather from a run in ways boxes cannot give them. docs/compatibility.md lists every plugin."""

from __future__ import annotations

import sys

import pytest

from . import nodes


def _coverage_started() -> bool:
    coverage = sys.modules.get("coverage")
    return coverage is not None and coverage.Coverage.current() is not None


# Read when the plugin is loaded: before pytest-cov starts its own measurement, so a measurement running now
# is `coverage run -m pytest` (which measures this process only).
MEASURED_FROM_OUTSIDE = _coverage_started()


def notices(config: pytest.Config, boxing: bool) -> list[str]:
    """Warnings to say as the session starts; `boxing`: --boxlite (or ini boxlite) is on."""
    found = []
    if boxing and MEASURED_FROM_OUTSIDE:
        found.append("this pytest runs under `coverage run`, which measures the host's process only: lines run "
                     "in boxes are not counted. Use pytest-cov: `pytest --boxlite --cov=PACKAGE`.")
    if boxing and nodes.wanted(config) and not config.pluginmanager.hasplugin("xdist"):
        found.append("pytest-xdist is not installed (or is disabled): plugins that gather data from workers "
                     "(pytest-cov) get none from boxes, whose lines are not counted. `pip install pytest-xdist` "
                     "(it need not be used: its hooks are how boxes report).")
    return [f"boxlite: warning: {text}" for text in found]
