"""Box workers as pytest-xdist nodes, for the plugins that gather data from xdist workers (pytest-cov,
pytest-randomly, ...), without special cases for any of them.

pytest-xdist's protocol: the controller calls `pytest_configure_node(node)`, where plugins add to
`node.workerinput`; the worker sees it as `config.workerinput`, fills `config.workeroutput` by the end of its
session, and the controller calls `pytest_testnodedown(node, error)` with `node.workeroutput`. Here every box
worker is such a node of the host's pytest (the guest side is in worker.py). When the host is itself a
pytest-xdist worker, its box workers take its `workerinput` (the controller configured it) and their outputs
travel to the controller inside its own `workeroutput`, where the controller calls `pytest_testnodedown` for
each of them (`forwarded_down`).

Only with pytest-xdist installed (the hooks are its) and with `--boxlite` (or ini `boxlite = true`): such
plugins decide at start-up whether they gather from workers (pytest-cov looks at xdist's `dist` option when
it loads), and only then does this plugin tell them so (`announce`).
"""

from __future__ import annotations

import queue
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import execnet
import pytest
from execnet.gateway import RInfo

# What the early `dist` option says when this plugin makes the session distributed (see `announce`).
DIST = "boxlite"
# The host's workeroutput key under which an xdist worker sends its box workers' outputs to the controller.
FORWARD_KEY = "boxlite_nodes"
RINFO_KEYS = ("executable", "version_info", "platform", "cwd", "pid")  # what execnet's `_rinfo()` holds

ANNOUNCED_KEY = pytest.StashKey[bool]()


def announce(early_config: pytest.Config) -> None:
    """Before plugins read the early options (pytest_load_initial_conftests): with --boxlite and pytest-xdist
    installed, say that the session is distributed (`dist` other than "no") so that plugins that gather
    from workers set up for it. Only the early namespace changes: pytest-xdist reads its own options later."""
    options = early_config.known_args_namespace
    enabled = options.boxlite if options.boxlite is not None else early_config.getini("boxlite")
    if not enabled or not early_config.pluginmanager.hasplugin("xdist"):
        return
    early_config.stash[ANNOUNCED_KEY] = True
    if getattr(options, "dist", "no") == "no" and not getattr(options, "numprocesses", None):
        options.dist = DIST


@dataclass
class NodeManager:
    """What plugins read of xdist's node manager: the rsync roots (none: the project is at its own path)."""

    roots: list[str] = field(default_factory=list)


@dataclass
class NodeGateway:
    """What plugins read of an xdist node's execnet gateway: its id, and `_rinfo()`, cached from the guest."""

    id: str
    rinfo: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> execnet.XSpec:
        return execnet.XSpec(f"popen//id={self.id}")

    def _rinfo(self, update: bool = False) -> RInfo:
        return RInfo(self.rinfo)


@dataclass
class BoxNode:
    """A box worker, as pytest-xdist's WorkerController looks to plugins."""

    config: pytest.Config
    gateway: NodeGateway
    workerinput: dict[str, Any]
    workeroutput: dict[str, Any] = field(default_factory=dict)
    nodemanager: NodeManager = field(default_factory=NodeManager)
    shutting_down: bool = False

    def __repr__(self) -> str:
        return f"<BoxNode {self.gateway.id}>"


def wanted(config: pytest.Config) -> bool:
    """Whether a plugin other than this one implements `pytest_testnodedown`: it gathers from workers."""
    hook = getattr(config.hook, "pytest_testnodedown", None)
    ours = config.pluginmanager.get_plugin("boxlite")
    return hook is not None and any(impl.plugin is not ours for impl in hook.get_hookimpls())


class Nodes:
    """The host's box nodes: configured when their worker starts, reported down from any thread, and the
    hook called on the main thread (`flush`), as pytest-xdist does."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.inherited: dict[str, Any] | None = getattr(config, "workerinput", None)  # an xdist worker
        self.active = config.pluginmanager.hasplugin("xdist") and (
            self.inherited is not None or config.stash.get(ANNOUNCED_KEY, False))
        self._down: queue.SimpleQueue[tuple[BoxNode, str | None]] = queue.SimpleQueue()

    @property
    def wanted(self) -> bool:
        """Whether a plugin gathers what workers report at their end (pytest-cov with --cov does)."""
        return wanted(self.config)

    @property
    def gathering(self) -> bool:
        """Whether box workers must end their session for a plugin (else restored ones need not)."""
        return self.active and self.wanted

    def configure(self, label: str) -> BoxNode | None:
        """A node for a new box worker, its workerinput set by the plugins; None when nodes are off."""
        if not self.active:
            return None
        node = BoxNode(self.config, NodeGateway(f"box-{label}"), dict(self.inherited or {}))
        if self.inherited is None:
            self.config.hook.pytest_configure_node(node=node)
        return node

    def down(self, node: BoxNode | None, output: Mapping[str, Any] | None, rinfo: Mapping[str, Any] | None,
             error: str | None) -> None:
        """A node's worker has ended (any thread): `output` is its workeroutput, None if it did not finish."""
        if node is None:
            return
        node.workeroutput = dict(output or {})
        node.gateway.rinfo = {k: v for k, v in (rinfo or {}).items() if k in RINFO_KEYS}
        node.shutting_down = True
        self._down.put((node, error))

    def flush(self) -> None:
        """On the main thread: tell the plugins about the nodes that went down, or under pytest-xdist put them
        into this worker's output for the controller."""
        while True:
            try:
                node, error = self._down.get_nowait()
            except queue.Empty:
                return
            if self.inherited is None:
                self.config.hook.pytest_testnodedown(node=node, error=error)
                continue
            forwarded = self.config.workeroutput.setdefault(FORWARD_KEY, [])  # type: ignore[attr-defined]  # xdist's worker
            forwarded.append({"id": node.gateway.id, "workerinput": node.workerinput,
                              "workeroutput": node.workeroutput, "rinfo": node.gateway.rinfo, "error": error})


def forwarded_down(node: Any) -> None:
    """On the pytest-xdist controller, when a worker went down: its box workers, as nodes of their own."""
    forwarded = getattr(node, "workeroutput", {}).get(FORWARD_KEY) or []
    config: pytest.Config = node.config
    for entry in forwarded:
        box = BoxNode(config, NodeGateway(entry["id"], entry["rinfo"]), entry["workerinput"], entry["workeroutput"],
                      shutting_down=True)
        config.hook.pytest_testnodedown(node=box, error=entry["error"])
