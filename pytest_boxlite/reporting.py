"""What the terminal says about boxes: a header line, the box of each test with -v, a summary line."""

from __future__ import annotations

from typing import Any

import pytest

from vmm import BoxliteError, select_engine

from . import compat
from .session import BoxliteSession


class Reporting:
    """The plugin's terminal output, registered on the host only (a box's worker reports nothing itself)."""

    def __init__(self, session: BoxliteSession) -> None:
        self.session = session
        self.config = session.config

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        session = self.session
        settings = session.provisioner.with_usable_python(session.settings.settings())
        try:
            engine = select_engine(settings.engine).describe()
        except BoxliteError as exc:
            engine = f"unavailable ({str(exc).splitlines()[0]})"
        mode = "every test in a box" if session.settings.enabled else "marked tests in boxes"
        profile = f", profile {session.settings.profile}" if session.settings.profile else ""
        snapshots = ""
        if settings.scope == "test":
            snapshots = ", snapshots " + ("on" if session.provisioner.snapshots_possible(settings) else "off")
        return (f"boxlite: {mode}, engine {engine}, image {settings.image or 'default (Debian + python3)'}"
                f"{profile}, scope {settings.scope}{snapshots}, pool {session.pool.size}, python {settings.python}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """What cannot work in boxes, after the header (also with -q, which has none)."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            for notice in compat.notices(self.config, self.session.settings.enabled):
                reporter.write_line(notice, yellow=True, bold=True)

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config) -> Any:
        status = yield
        box = getattr(report, "boxlite_box", None)
        if box is None or config.get_verbosity() < 1 or not isinstance(status, tuple) or len(status) != 3:
            return status
        category, letter, word = status
        if not word:
            return status
        if isinstance(word, tuple):
            return category, letter, (f"{word[0]} [box {box}]", word[1])
        return category, letter, f"{word} [box {box}]"

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        session = self.session
        if not session.stats.tests and not session.pool.stats.started:
            return
        pool, stats, vms = session.pool.stats, session.stats, session.runtime.metrics()
        parts = [f"boxlite: {stats.tests} tests in boxes"]
        if vms.restores:
            parts.append(f"{vms.restores} boxes restored from snapshots "
                         f"({vms.restore_seconds / vms.restores * 1000:.0f} ms each)")
        if vms.templates_built:
            parts.append(f"{vms.templates_built} snapshot templates built ({vms.template_seconds:.1f} s)")
        if vms.boots:
            parts.append(f"{vms.boots} boxes booted ({vms.boot_seconds / vms.boots:.1f} s each)")
        parts.append(f"{stats.reused} tests in reused boxes, {pool.waited_seconds:.1f} s waited for boxes")
        terminalreporter.write_sep("-", ", ".join(parts))
        for directory in stats.kept:
            terminalreporter.write_line(f"boxlite: kept the box of a failed test: {directory}")
