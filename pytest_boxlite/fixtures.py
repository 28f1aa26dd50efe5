"""Fixtures for tests that drive boxes themselves (they run on the host, even under --boxlite):
`boxlite_runtime` (session), `box_options`, `box` (a fresh box) and `box_factory` (several, all cleaned up)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from vmm import Box, BoxOptions, Runtime, Volume

from .config import marker_arguments
from .stash import SESSION_KEY, WORKER_KEY

if TYPE_CHECKING:  # imported by the host's plugin only: this module is loaded in boxes too
    from .session import BoxliteSession


def _session(config: pytest.Config) -> BoxliteSession:
    if config.stash.get(WORKER_KEY, False):
        raise pytest.UsageError("boxlite fixtures are not available inside a box (no VMs in VMs)")
    session: BoxliteSession = config.stash[SESSION_KEY]
    return session


@pytest.fixture(scope="session")
def boxlite_runtime(pytestconfig: pytest.Config) -> Runtime:
    """The session's runtime (shared with the boxed tests): stops every box it started at the end."""
    return _session(pytestconfig).runtime


@pytest.fixture
def box_options(request: pytest.FixtureRequest) -> BoxOptions:
    """Options of the `box` fixture: the test's `boxlite` marker over the session's settings.
    Override this fixture to set others (any `vmm.BoxOptions` field)."""
    settings = _session(request.config).settings.settings(marker_arguments(request.node))
    return BoxOptions(image=settings.image, engine=settings.engine, cpus=settings.cpus,
                      memory_mib=settings.memory_mib, env=dict(settings.env),
                      volumes=tuple(Volume.parse(v) for v in settings.volumes),
                      network=settings.network, host_ports=settings.host_ports)


@pytest.fixture
def box(request: pytest.FixtureRequest, box_options: BoxOptions) -> Iterator[Box]:
    """A fresh, running box for this test (restored from a snapshot where it can be); removed after it."""
    started = _session(request.config).fresh_box(box_options)
    try:
        yield started
    finally:
        started.remove()


@pytest.fixture
def box_factory(request: pytest.FixtureRequest, box_options: BoxOptions) -> Iterator[Callable[..., Box]]:
    """`box_factory(**overrides)` starts another box (options: `box_options` with the overrides);
    every box it made is removed after the test."""
    session = _session(request.config)
    # ExitStack removes every box even when removing one fails, then raises that failure.
    with contextlib.ExitStack() as cleanup:

        def make(**overrides: Any) -> Box:
            options = BoxOptions.from_dict({**box_options.to_dict(), **overrides}) if overrides else box_options
            created = session.fresh_box(options)
            cleanup.callback(created.remove)
            return created

        yield make
