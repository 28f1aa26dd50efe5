"""Fixtures that the box worker (worker.py) gives the tests in place of other plugins' own, with the values
they would have on the host: junitxml's `record_testsuite_property` (the host writes the xml) and
pytest-xdist's `worker_id` and `testrun_uid` (pytest-xdist is not loaded in a box that is an xdist node)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from .stash import CHANNEL_KEY


def _workerinput(config: pytest.Config) -> dict[str, Any]:
    return getattr(config, "workerinput", None) or {}


@pytest.fixture(scope="session")
def record_testsuite_property(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """junitxml's fixture: the property is sent to the host, which records it in its xml (if it writes one)."""
    channel = request.config.stash[CHANNEL_KEY]

    def record(name: str, value: object) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name parameter needs to be a string, but {type(name).__name__} given")
        channel.send(("suite_property", {"name": name, "value": str(value)}))

    return record


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    return str(_workerinput(request.config).get("workerid", "master"))


@pytest.fixture(scope="session")
def testrun_uid(request: pytest.FixtureRequest) -> str:
    return str(_workerinput(request.config).get("testrunuid") or uuid.uuid4().hex)
