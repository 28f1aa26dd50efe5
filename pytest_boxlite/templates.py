"""Snapshot templates of box kinds, and the workers restored from them.

A kind's template is a booted box whose worker has imported pytest and collected every item of the kind,
saved by `vmm.Runtime.template` (built once, then found in the runtime home while nothing changes). Each box of
the kind is a clone restored from it, whose worker is already running: only its host side is new
(`relay.Worker.adopt`).
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import execnet
import pytest

from vmm import Box, BoxliteError, Execution, NoSpaceForTemplate, Runtime, Template

from .nodes import Nodes
from .planning import Plan, node_input, unit_payload
from .provision import Provisioner, worker_env
from .relay import WORKER_SOURCE, Worker

PLUGIN_VERSION = importlib.metadata.version("pytest-boxlite")


def _read(workerinput: Mapping[str, Any] | None, keys: Any) -> dict[str, Any]:
    """The values of `keys` in `workerinput`, as JSON keeps them (the template's data is JSON)."""
    values = {key: workerinput[key] for key in keys if key in workerinput} if workerinput else {}
    found: dict[str, Any] = json.loads(json.dumps(values, default=str))
    return found


class Templates:
    """The session's templates, one per snapshot kind of the plan, built when a worker of the kind is wanted."""

    def __init__(self, config: pytest.Config, plan: Plan, runtime: Callable[[], Runtime],
                 provisioner: Provisioner, nodes: Nodes, group: execnet.Group, echo: bool,
                 say: Callable[[str], None]) -> None:
        self.config = config
        self.plan = plan
        self._runtime = runtime
        self.provisioner = provisioner
        self.nodes = nodes
        self.group = group
        self.echo = echo
        self._say = say
        self._lock = threading.Lock()
        self._templates: dict[Hashable, Template] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._booted_instead: set[Hashable] = set()  # snapshot kinds whose template had no room on disk

    def restore_worker(self, key: Hashable) -> Worker | None:
        """A worker in a clone of the kind's template (runs in the pool's threads); None where boxes of the
        kind boot instead: not a snapshot kind, or no room on disk for its template (said once)."""
        if key not in self.plan.snapshot_items or key in self._booted_instead:
            return None
        try:
            return self._restored(key)
        except NoSpaceForTemplate as exc:
            with self._lock:
                first = key not in self._booted_instead
                self._booted_instead.add(key)
            if first:  # a slower run beats a failed one; the summary counts the boots
                self._say(f"{exc}; booting a box for each of these tests instead")
            return None

    def _restored(self, key: Hashable) -> Worker:
        template = self._template(key)
        try:
            box = self._runtime().restore(template)
        except BoxliteError:
            with self._lock:
                self._templates.pop(key, None)  # the runtime discarded it: the next worker rebuilds it
            raise
        try:
            return Worker.adopt(box, self.group, self.echo, template.data)
        except BaseException:
            box.remove()
            raise

    def _template(self, key: Hashable) -> Template:
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._templates:
                self._templates[key] = self._build(key)
            return self._templates[key]

    def _build(self, key: Hashable) -> Template:
        """The kind's template, found in the runtime home or built: its warm-up starts the worker and gives it
        every item of the kind."""
        settings = self.plan.kinds[key]
        workerinput = node_input(self.nodes.configure("template"))
        payload = unit_payload(self.config, self.plan.snapshot_items[key], workerinput)
        env, cwd, python = worker_env(), str(self.config.rootpath), self.provisioner.python(settings)
        started: list[Worker] = []

        def warmup(box: Box) -> tuple[Execution, dict[str, Any]]:
            worker = Worker.start(box, self.group, env, cwd, self.echo, python)
            started.append(worker)
            missing, errors = worker.begin(payload)
            data = worker.snapshot_data(payload["nodeids"], missing, errors)
            data["workerinput_read"] = _read(workerinput, worker.workerinput_read)
            return worker.execution, data

        # Everything the warm-up's result depends on beyond the box: the unit, the worker's code, and of the
        # workerinput its keys, and the values the warm-up read (not a run's id under pytest-xdist, or what
        # plugins put there for workers that talk back to the host; each test gets this run's values:
        # Worker.run's `alone`). Those values are known once a template is built: one whose values differ from
        # this run's is looked up again under a key that holds them.
        stable = {**payload, "workerinput": sorted(workerinput) if workerinput is not None else None}

        def template_for(read: Any) -> Template:
            # The interpreter's images are volumes of the box: their fingerprints are in the template's key.
            extra = json.dumps([stable, env, cwd, python, PLUGIN_VERSION, WORKER_SOURCE, read], sort_keys=True,
                               default=str)
            return self._runtime().template(self.provisioner.box_options(settings, images=True), warmup=warmup,
                                            key=extra)

        try:
            template = template_for(None)
            read = template.data.get("workerinput_read") or {}
            if read != _read(workerinput, read):
                template = template_for(_read(workerinput, read))
        finally:
            for worker in started:
                worker.failed = True  # its VM is saved and gone: nothing to finish
                worker.close()
        return template
