"""Which items run in which box: the session's items grouped into units, and what a unit's worker is told.

Items are grouped into units: one per test (scope "test"), per module and box kind ("module"), or per box kind
("session"). A unit runs in one worker in one box, its items in session order, so that the guest tears down
fixtures exactly as a local run would. Boxes of a kind that can be snapshotted (scope "test") are clones of
the kind's template: their pool key is (SNAPSHOT, box key).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest

from vmm import ConfigError, HostPythonUnsupported, PythonMismatch

from .config import SessionConfig, Settings, marker_arguments
from .nodes import BoxNode
from .provision import Provisioner
from .relay import Worker
from .worker import GUEST_OVERRIDES

log = logging.getLogger(__name__)

# Tests that drive boxes themselves run on the host even under --boxlite: their untrusted part is in the box.
BOX_FIXTURES = frozenset({"box", "box_factory", "box_options", "boxlite_runtime"})
SNAPSHOT = "snapshot"  # pool keys (SNAPSHOT, box key): scope=test boxes restored from a template
BUILTIN = (str, int, float, bool, type(None))


@dataclass
class Unit:
    key: Hashable  # the box kind (pool key)
    settings: Settings
    items: list[pytest.Item] = field(default_factory=list)
    worker: Worker | None = None  # while one runs its items
    offset: int = 0  # index in `items` of the current worker's first item
    missing: dict[str, str] = field(default_factory=dict)  # node id -> why the worker did not collect it
    failed: bool = False


@dataclass
class Plan:
    """The session's boxed items."""

    units: dict[str, tuple[Unit, int]] = field(default_factory=dict)  # node id -> its unit, its index there
    errors: dict[str, str] = field(default_factory=dict)  # node id -> bad marker argument
    kinds: dict[Hashable, Settings] = field(default_factory=dict)  # pool key -> its boxes' settings
    snapshot_items: dict[Hashable, list[pytest.Item]] = field(default_factory=dict)  # per snapshot kind, in order

    def boxes(self, item: pytest.Item) -> bool:
        """Whether `item` runs in a box (or fails for a bad marker) instead of on the host."""
        return item.nodeid in self.units or item.nodeid in self.errors


def plan(items: list[pytest.Item], settings: SessionConfig, provisioner: Provisioner, found: Plan) -> list[Unit]:
    """Decide which items run in boxes, into `found`, and return their units. HostPythonUnsupported or
    PythonMismatch: the session's python cannot be used (said once, before any test); a bad marker fails its
    test only (`Plan.errors`)."""
    units: dict[Hashable, Unit] = {}
    for item in items:
        try:
            args = marker_arguments(item)
            if (args is None and not settings.enabled) or BOX_FIXTURES & set(getattr(item, "fixturenames", ())):
                continue
            boxed = provisioner.with_usable_python(settings.settings(args))
            provisioner.check_python(boxed)
            provisioner.box_options(boxed)  # a bad value fails this test now, not its box later
        except (HostPythonUnsupported, PythonMismatch):
            raise  # ConfigErrors too, but of the session, not of this test's marker
        except ConfigError as exc:
            found.errors[item.nodeid] = str(exc)
            continue
        key: Hashable = boxed.box_key()
        if provisioner.snapshots_possible(boxed):
            key = (SNAPSHOT, key)  # its boxes are restored clones: a pool of their own
            found.snapshot_items.setdefault(key, []).append(item)
        found.kinds.setdefault(key, boxed)
        scope_key: Hashable = {"test": item.nodeid, "module": str(item.path), "session": None}[boxed.scope]
        unit = units.setdefault((boxed.scope, key, scope_key), Unit(key, boxed))
        found.units[item.nodeid] = (unit, len(unit.items))
        unit.items.append(item)
    log.debug("%d boxed tests in %d units", len(found.units), len(units))
    return list(units.values())


def unit_payload(config: pytest.Config, items: list[pytest.Item],
                 workerinput: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of protocol.py's "unit" message for a worker that runs `items`."""
    rootpath = config.rootpath.resolve()
    invocation = config.invocation_params.dir.resolve()
    args = [f"--rootdir={rootpath}"]
    if config.inipath is not None:
        args.append(f"--config-file={config.inipath}")
    args += list(dict.fromkeys(str(item.path) for item in items))
    return {
        # The guest parses its own args: the host's positional ones and argparse internals stay here.
        # Not what the guest overrides: a snapshot template's key holds these, and they vary per run.
        "option": {k: v for k, v in builtins_only(vars(config.option)).items()
                   if k != "file_or_dir" and not k.startswith("_") and k not in GUEST_OVERRIDES},
        "args": args,
        "nodeids": [item.nodeid for item in items],
        "cwd": str(invocation if invocation.is_relative_to(rootpath) else rootpath),
        "workerinput": workerinput,
    }


def node_input(node: BoxNode | None) -> dict[str, Any] | None:
    """A box node's workerinput as it crosses the channel (plugins may put any object in it)."""
    if node is None:
        return None
    found: dict[str, Any] = builtins_only(node.workerinput)
    return found


def builtins_only(value: Any) -> Any:
    """`value` with only what execnet can carry: builtin scalars and containers of them; paths as strings."""
    if isinstance(value, BUILTIN):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [builtins_only(v) for v in value]
        return [v for v in items if v is not _SKIP]
    if isinstance(value, dict):
        pairs = {k: builtins_only(v) for k, v in value.items() if isinstance(k, str)}
        return {k: v for k, v in pairs.items() if v is not _SKIP}
    return _SKIP


_SKIP = object()
