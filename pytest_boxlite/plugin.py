"""The pytest plugin (entry point `boxlite`; `-p no:boxlite` disables it): options, marker, the hooks that
send boxed items to their box, and the fixtures.

In the guest the same plugin is loaded by the worker (so that the marker is known there); `WORKER_KEY` in
the config's stash tells it to stay passive.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from vmm.errors import ConfigError

from . import compat, nodes  # noqa: F401 - compat reads the state of coverage.py when loaded
from . import config as cfg

log = logging.getLogger(__name__)

WORKER_KEY = pytest.StashKey[bool]()
SESSION_KEY = pytest.StashKey["BoxliteSession"]()

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
        settings = cfg.SessionConfig.from_pytest(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-boxlite: {exc}") from None
    from .session import BoxliteSession

    session = config.stash[SESSION_KEY] = BoxliteSession(config, settings)
    from . import reporting

    config.pluginmanager.register(reporting.Reporting(config), "boxlite-reporting")
    config.pluginmanager.register(compat.HostHooks(session.boxes), "boxlite-compat")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
        del config.stash[SESSION_KEY]


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    boxlite = session.config.stash.get(SESSION_KEY, None)
    if boxlite is not None and not session.config.option.collectonly:
        boxlite.plan(session.items)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    """The innermost wrapper: box workers end, and their nodes are reported down, before the other wrappers
    (pytest-cov's) make their end of the loop."""
    try:
        return (yield)
    finally:
        boxlite = session.config.stash.get(SESSION_KEY, None)
        if boxlite is not None:
            boxlite.end()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    boxlite = item.config.stash.get(SESSION_KEY, None)
    if boxlite is not None and boxlite.run(item):
        return True
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    nodes.forwarded_down(node)  # on a pytest-xdist controller: the box workers of that worker


pytest_plugins = ["pytest_boxlite.fixtures"]
