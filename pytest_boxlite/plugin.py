"""The pytest plugin (entry point `boxlite`; `-p no:boxlite` disables it): options, marker, and on the host the
hooks that send boxed items to their box (`HostSession`), the terminal output and the fixtures.

In the guest the same plugin is loaded by the worker (so that the marker is known there); `WORKER_KEY` in
the config's stash (stash.py) tells it to stay passive. So the host's modules (session.py and what it uses)
are imported in pytest_configure, on the host only: a box's python would pay for them under emulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from vmm import ConfigError, enable_from_env

from . import compat, nodes  # compat reads the state of coverage.py when loaded
from . import config as cfg
from .stash import SESSION_KEY, WORKER_KEY

if TYPE_CHECKING:
    from .session import BoxliteSession

MARKER_HELP = ("boxlite(image=None, profile=None, cpus=1, memory_mib=512, network='internet', "
               "host_ports=(), timeout=300, scope='test', env={}, python='host'): run this test in a "
               "hardware-isolated microVM; scope 'module' or 'session' reuses one VM; python 'image' runs the "
               "image's python3 instead of the host's interpreter. See docs/markers-and-fixtures.md.")


def pytest_addoption(parser: pytest.Parser) -> None:
    cfg.add_options(parser)


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Any:
    nodes.announce(early_config)  # before any plugin reads the early options (a wrapper runs first)
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if config.stash.get(WORKER_KEY, False):
        return
    try:
        enable_from_env()  # BOXLITE_LOG=debug: what the runtime does, on stderr
        settings = cfg.SessionConfig.from_pytest(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-boxlite: {exc}") from None
    from .reporting import Reporting
    from .session import BoxliteSession

    session = config.stash[SESSION_KEY] = BoxliteSession(config, settings)
    config.pluginmanager.register(HostSession(session), "boxlite-session")
    config.pluginmanager.register(Reporting(session), "boxlite-reporting")
    config.pluginmanager.register(compat.HostHooks(session.plan.boxes), "boxlite-compat")


class HostSession:
    """The hooks of the host's session: plan the boxed items, run each in its box, end the workers."""

    def __init__(self, session: BoxliteSession) -> None:
        self.session = session

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.session.close()
        del config.stash[SESSION_KEY]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not session.config.option.collectonly:
            self.session.start(session.items)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Any:
        """The innermost wrapper: box workers end, and their nodes are reported down, before the other
        wrappers (pytest-cov's) make their end of the loop."""
        try:
            return (yield)
        finally:
            self.session.end()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        return True if self.session.run(item) else None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    nodes.forwarded_down(node)  # on a pytest-xdist controller: the box workers of that worker


pytest_plugins = ["pytest_boxlite.fixtures"]
