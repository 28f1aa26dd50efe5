"""The pytest plugin (entry point `boxlite`; `-p no:boxlite` disables it): options, marker, the hooks that
send boxed items to their box, and the fixtures.

In the guest the same plugin is loaded by the worker (so that the marker is known there); `WORKER_KEY` in
the config's stash tells it to stay passive.
"""

from __future__ import annotations

import logging

import pytest

from vmm.errors import ConfigError

from . import config as cfg

log = logging.getLogger(__name__)

WORKER_KEY = pytest.StashKey[bool]()
SESSION_KEY = pytest.StashKey["BoxliteSession"]()

MARKER_HELP = ("boxlite(image=None, profile=None, cpus=1, memory_mib=512, network='internet', "
               "host_ports=(), timeout=300, scope='test', env={}): run this test in a hardware-isolated microVM; "
               "scope 'module' or 'session' reuses one VM. See docs/markers-and-fixtures.md.")


def pytest_addoption(parser: pytest.Parser) -> None:
    cfg.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if config.stash.get(WORKER_KEY, False):
        return
    try:
        settings = cfg.SessionConfig.from_pytest(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-boxlite: {exc}") from None
    from .session import BoxliteSession

    config.stash[SESSION_KEY] = BoxliteSession(config, settings)
    from . import reporting

    config.pluginmanager.register(reporting.Reporting(config), "boxlite-reporting")


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


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    boxlite = item.config.stash.get(SESSION_KEY, None)
    if boxlite is not None and boxlite.run(item):
        return True
    return None


pytest_plugins = ["pytest_boxlite.fixtures"]
