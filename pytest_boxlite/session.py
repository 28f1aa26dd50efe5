"""The host side of the boxed tests of one pytest session: its lifecycle.

The session owns the runtime (shared with the fixtures) and the warm pool of workers; planning.py decides
which items run in which box, provision.py what those boxes are made of, templates.py the snapshot templates
their clones come from, replay.py what the host reports. Here: each boxed item is run by its unit's worker,
a worker that dies or times out is replaced for the unit's remaining items by a fresh one in a new box, and
workers are retired (their boxes stopped in the background) as their units end.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field, replace

import execnet
import pytest

from vmm import Box, BoxliteError, BoxOptions, HostPythonUnsupported, PythonMismatch, Runtime, WorkerLost, WorkerTimeout

from .config import SessionConfig
from .examples import HostDatabase
from .nodes import Nodes
from .planning import Plan, Unit, node_input, plan, unit_payload
from .pool import Pool
from .provision import Provisioner, worker_env
from .relay import Worker
from .replay import Replay
from .templates import Templates

log = logging.getLogger(__name__)


@dataclass
class Stats:
    tests: int = 0
    reused: int = 0  # tests that ran in a box that had already run one
    kept: list[str] = field(default_factory=list)  # box directories kept for inspection


class BoxliteSession:
    """Host side of the boxed tests of one pytest session (one per pytest-xdist worker: per-worker pools)."""

    def __init__(self, config: pytest.Config, settings: SessionConfig) -> None:
        self.config = config
        self.settings = settings
        self.stats = Stats()
        self.plan = Plan()
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self._group = execnet.Group(execmodel="thread")
        self._echo = config.getoption("capture") == "no"
        self.pool = Pool(self._make_worker, settings.default_pool_size)
        self._retiring: list[threading.Thread] = []
        self.nodes = Nodes(config)
        self.provisioner = Provisioner(config, lambda: self.runtime, settings.keep, self._say)
        self.replay = Replay(config, HostDatabase(config.rootpath, self._say))
        self.templates = Templates(config, self.plan, lambda: self.runtime, self.provisioner, self.nodes,
                                   self._group, self._echo, self._say)

    @property
    def runtime(self) -> Runtime:
        """The session's runtime, made at first use (its progress lines go to the terminal)."""
        with self._lock:
            if self._runtime is None:
                reporter = self.config.pluginmanager.get_plugin("terminalreporter")
                progress = (lambda msg: reporter.write_line(f"boxlite: {msg}")) if reporter else None
                self._runtime = Runtime(progress=progress)
            return self._runtime

    def _say(self, message: str) -> None:
        """A line for the user: on the terminal as the runtime's progress, else a logged warning."""
        (self.runtime.progress or log.warning)(message)

    def start(self, items: list[pytest.Item]) -> None:
        """Plan the boxed items (planning.py) and start booting ahead."""
        try:
            units = plan(items, self.settings, self.provisioner, self.plan)  # the templates read self.plan
        except (HostPythonUnsupported, PythonMismatch) as exc:
            raise pytest.UsageError(f"pytest-boxlite: {exc}") from None  # once, before any test
        for unit in units:
            self.pool.expect(unit.key)
        if self.plan.units and self.nodes.wanted and not self.nodes.active:
            self._say(
                "tests run in boxes without --boxlite (boxlite markers): plugins that gather data from workers "
                "(pytest-cov) get none from their boxes; give --boxlite (or ini boxlite = true) to count them")

    def _make_worker(self, key: Hashable) -> Worker:
        """A box of this kind with a warm worker in it (runs in the pool's threads): restored from the kind's
        snapshot template, or booted, with pytest started in it."""
        restored = self.templates.restore_worker(key)
        if restored is not None:
            return restored
        settings = self.plan.kinds[key]
        box = self.runtime.create(self.provisioner.box_options(settings))
        try:
            box.start()
            return Worker.start(box, self._group, worker_env(), str(self.config.rootpath), self._echo,
                                self.provisioner.python(settings))
        except BaseException:
            box.remove()
            raise

    def fresh_box(self, options: BoxOptions) -> Box:
        """A running box for the `box` fixtures: restored from a boot snapshot of these options (saved at the
        first use) where snapshots are on and the options allow it, else booted (`BoxOptions.snapshots`)."""
        if not self.settings.settings().snapshots:
            options = replace(options, snapshots=False)
        box = self.runtime.create(options)
        try:
            return box.start()
        except BaseException:
            box.remove()
            raise

    # -- running -------------------------------------------------------------------------------------
    def run(self, item: pytest.Item) -> bool:
        """Run `item` in its box and replay its reports; False when it is not a boxed item."""
        if item.nodeid in self.plan.errors:
            item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            self.replay.synthesize(item, "setup", f"boxlite: {self.plan.errors[item.nodeid]}", set())
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            return True
        if item.nodeid not in self.plan.units:
            return False
        unit, index = self.plan.units[item.nodeid]
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        phases: set[str] = set()
        worker = None
        try:
            worker = self._worker_for(unit, index)
            self._run_in(worker, unit, index, item, phases)
        except (WorkerTimeout, WorkerLost) as exc:
            self.replay.worker_failed(item, exc, phases, worker)
            unit.failed = True
            self._drop_worker(unit, failed=True)
        except Exception as exc:  # noqa: BLE001 - whatever kept the box from starting is this test's error
            self.replay.synthesize(item, "setup", f"boxlite: could not start a box for this test: "
                                   f"{type(exc).__name__}: {exc}", phases)
            unit.failed = True
            self._drop_worker(unit, failed=True)
        finally:
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if unit.worker is not None and index == len(unit.items) - 1:
            self._drop_worker(unit, failed=unit.failed)
        self.nodes.flush()
        return True

    def _run_in(self, worker: Worker, unit: Unit, index: int, item: pytest.Item, phases: set[str]) -> None:
        if item.nodeid in unit.missing:
            self.replay.synthesize(item, "setup", unit.missing[item.nodeid], phases)
            unit.failed = True
            return
        if worker.items_run:
            self.stats.reused += 1
        self.stats.tests += 1
        position, alone = index - unit.offset, None
        if worker.positions is not None:
            position = worker.positions[item.nodeid]
            alone = {"workerinput": node_input(worker.node)}
        for name, fields in worker.run(position, unit.settings.timeout, alone):
            if self.replay.message(item, name, fields, worker, phases):
                unit.failed = True

    def _worker_for(self, unit: Unit, index: int) -> Worker:
        if unit.worker is None:
            worker = self.pool.acquire(unit.key)
            unit.worker, unit.offset = worker, index
            worker.node = self.nodes.configure(worker.label)
            if worker.positions is not None:  # restored from a template that collected every item already
                missing, collect_errors = worker.collected
            else:
                payload = unit_payload(self.config, unit.items[index:], node_input(worker.node))
                missing, collect_errors = worker.begin(payload)
            why = "\n".join(self._longrepr_text(d) for d in collect_errors) or "no such test in the box"
            unit.missing = {nodeid: f"boxlite: the box did not collect this test:\n{why}" for nodeid in missing}
        return unit.worker

    def _longrepr_text(self, data: dict[str, object]) -> str:
        report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
        return str(report.longrepr)

    # -- retiring workers ------------------------------------------------------------------------------
    def _drop_worker(self, unit: Unit, failed: bool) -> None:
        """End the unit's worker; its box is stopped in the background (kept with --boxlite-keep if failed)."""
        worker, unit.worker = unit.worker, None
        if worker is None:
            return
        remaining = len(unit.items) - (unit.offset + worker.items_run) - (1 if failed else 0)
        if failed and remaining > 0:
            self.pool.expect(unit.key)  # the unit goes on in a new box
        self._retire(worker, failed)

    def _retire(self, worker: Worker, failed: bool) -> None:
        keep = failed and self.settings.keep

        def stop() -> None:
            ended = worker.finish(gather=worker.node is not None and self.nodes.gathering)
            if ended is None:
                self.nodes.down(worker.node, None, None, "the box worker ended before its session did")
            else:
                self.nodes.down(worker.node, *ended, None)
            worker.close()
            try:
                worker.box.stop()
                if not keep:
                    worker.box.remove()
            except BoxliteError as exc:
                log.debug("stopping box %s: %s", worker.label, exc)

        if keep:
            self.stats.kept.append(str(worker.box.directory))
        thread = threading.Thread(target=stop, name=f"boxlite-retire-{worker.label}", daemon=True)
        thread.start()
        self._retiring.append(thread)

    def _end_workers(self) -> None:
        for worker in self.pool.close():
            self._retire(worker, failed=False)
        for unit, _ in list(self.plan.units.values()):
            if unit.worker is not None:
                self._drop_worker(unit, failed=False)
        for thread in self._retiring:
            thread.join(60)

    def end(self) -> None:
        """At the end of the test loop: end every worker, and report their nodes down to the plugins before
        these make their own end of the run (pytest-cov combines its data after the loop)."""
        self._end_workers()
        self.nodes.flush()

    def close(self) -> None:
        """End every worker and box (also on Ctrl-C): nothing outlives the session."""
        self._end_workers()
        try:
            self._group.terminate(timeout=5)
        finally:
            if self._runtime is not None:
                self._runtime.close()
