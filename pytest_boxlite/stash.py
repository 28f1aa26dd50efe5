"""The keys under which pytest_boxlite keeps its state in a pytest config's stash (a leaf module: every other
module of the plugin may import it)."""

from __future__ import annotations

from typing import Any

import pytest

# In the guest: this config is a box worker's (worker.py); the plugin, loaded there for its marker, stays passive.
WORKER_KEY = pytest.StashKey[bool]()
# On the host: the session's session.BoxliteSession. Typed where it is read (session.of), since the session's
# module imports this one.
SESSION_KEY = pytest.StashKey[Any]()
# In the guest: the worker's execnet channel to the host (guest_fixtures.py sends on it).
CHANNEL_KEY = pytest.StashKey[Any]()
