"""Other plugins and tools with boxes: what cannot work, said once as the session starts, and the host's side
of plugins that act in the box instead. docs/compatibility.md lists every plugin."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

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


class HostHooks:
    """On the host, for the boxed tests (`boxed(item)`): what plugins do in the box, not around the relay."""

    def __init__(self, boxed: Callable[[pytest.Item], bool]) -> None:
        self.boxed = boxed

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool | None:
        """pytest-timeout: its timer runs in the box (a timer on the host would interrupt the relay)."""
        return True if self.boxed(item) else None

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        return True if self.boxed(item) else None
