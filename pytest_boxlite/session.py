"""The session's boxed tests: which items run in which box, and the host side of running them.

Items are grouped into units: one per test (scope "test"), per module and box kind ("module"), or per box kind
("session"). A unit runs in one worker in one box, its items in session order, so that the guest tears down
fixtures exactly as a local run would. A worker that dies or times out is replaced for the unit's remaining
items by a fresh one in a new box.
"""

from __future__ import annotations

import builtins
import importlib.metadata
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import execnet
import pytest
from _pytest import junitxml  # its stash key: where record_testsuite_property records

from vmm import Box, BoxOptions, Execution, Runtime
from vmm.engines import select as select_engine
from vmm.errors import (
    BoxliteError,
    ConfigError,
    HostPythonUnsupported,
    NoSpaceForTemplate,
    PythonMismatch,
    WorkerLost,
    WorkerTimeout,
)
from vmm.hostpython import HostPython, host_python, interpreter_dirs, system_python
from vmm.images import resolve_image
from vmm.images.probe import python_version
from vmm.snapshot import Template
from vmm.volumes import directory_image

from .config import SessionConfig, Settings, marker_arguments
from .examples import HostDatabase
from .nodes import BoxNode, Nodes
from .pool import Pool
from .relay import WORKER_SOURCE, Worker, site_directories
from .worker import GUEST_OVERRIDES

log = logging.getLogger(__name__)

# Tests that drive boxes themselves run on the host even under --boxlite: their untrusted part is in the box.
BOX_FIXTURES = frozenset({"box", "box_factory", "box_options", "boxlite_runtime"})
BUILTIN = (str, int, float, bool, type(None))
SNAPSHOT = "snapshot"  # pool keys (SNAPSHOT, box key): scope=test boxes restored from a template
PLUGIN_VERSION = importlib.metadata.version("pytest-boxlite")
# Its sitecustomize makes every python in a box process the host's site directories (guestsite/).
GUEST_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guestsite")


@dataclass
class Unit:
    key: Hashable  # the box kind (pool key)
    settings: Settings
    items: list[pytest.Item] = field(default_factory=list)
    worker: Worker | None = None
    offset: int = 0  # index in `items` of the current worker's first item
    missing: dict[str, str] = field(default_factory=dict)  # node id -> why the worker did not collect it
    failed: bool = False


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
        self.units: dict[str, tuple[Unit, int]] = {}
        self.errors: dict[str, str] = {}  # node id -> bad marker argument
        self._kinds: dict[Hashable, Settings] = {}
        self._snapshot_items: dict[Hashable, list[pytest.Item]] = {}  # per snapshot kind, in session order
        self._templates: dict[Hashable, Template] = {}
        self._template_locks: dict[Hashable, threading.Lock] = {}
        self._booted_instead: set[Hashable] = set()  # snapshot kinds whose template had no room on disk
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self._group = execnet.Group(execmodel="thread")
        self.pool = Pool(self._make_worker, settings.default_pool_size)
        self._retiring: list[threading.Thread] = []
        self._host_python: HostPython | None = None
        self._image_pythons: dict[str | None, str | None] = {}  # image -> its python3's X.Y (python="image")
        self._said_system_python = False
        self.nodes = Nodes(config)
        self.examples = HostDatabase(config.rootpath, self._say)

    # -- the runtime, shared with the fixtures -------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                reporter = self.config.pluginmanager.get_plugin("terminalreporter")
                progress = (lambda msg: reporter.write_line(f"boxlite: {msg}")) if reporter else None
                self._runtime = Runtime(progress=progress)
            return self._runtime

    def _say(self, message: str) -> None:
        """A line for the user: on the terminal as the runtime's progress, else a logged warning."""
        (self.runtime.progress or log.warning)(message)

    # -- planning ------------------------------------------------------------------------------------
    def plan(self, items: list[pytest.Item]) -> None:
        """Decide which items run in boxes, group them into units and start booting ahead."""
        units: dict[Hashable, Unit] = {}
        for item in items:
            try:
                args = marker_arguments(item)
                boxed = (args is not None or self.settings.enabled) and not BOX_FIXTURES & set(
                    getattr(item, "fixturenames", ()))
                if not boxed:
                    continue
                settings = self.with_usable_python(self.settings.settings(args))
                self.check_python(settings)
                self.box_options(settings)  # a bad value fails this test now, not its box later
            except (HostPythonUnsupported, PythonMismatch) as exc:
                raise pytest.UsageError(f"pytest-boxlite: {exc}") from None  # once, before any test
            except ConfigError as exc:
                self.errors[item.nodeid] = str(exc)
                continue
            key: Hashable = settings.box_key()
            if self.snapshots_possible(settings):
                key = (SNAPSHOT, key)  # its boxes are restored clones: a pool of their own
                self._snapshot_items.setdefault(key, []).append(item)
            self._kinds.setdefault(key, settings)
            scope_key: Hashable = {"test": item.nodeid, "module": str(item.path), "session": None}[settings.scope]
            unit = units.setdefault((settings.scope, key, scope_key), Unit(key, settings))
            self.units[item.nodeid] = (unit, len(unit.items))
            unit.items.append(item)
        for unit in units.values():
            self.pool.expect(unit.key)
        if self.units and self.nodes.wanted and not self.nodes.active:
            self._say(
                "tests run in boxes without --boxlite (boxlite markers): plugins that gather data from workers "
                "(pytest-cov) get none from their boxes; give --boxlite (or ini boxlite = true) to count them")
        log.debug("%d boxed tests in %d units", len(self.units), len(units))

    def snapshots_possible(self, settings: Settings) -> bool:
        """Whether boxes of `settings` can be clones of a snapshot template (else each one boots)."""
        if settings.scope != "test" or not settings.snapshots or settings.volumes:
            return False
        if settings.image == "host" and not _runs_host_python(settings):
            return False  # the host's root as it is, over virtiofs
        try:
            return select_engine(settings.engine, self.runtime.kernel.release).snapshots
        except BoxliteError:
            return False  # the boot path reports it

    def with_usable_python(self, settings: Settings) -> Settings:
        """`settings`, with python="image" where python="host" cannot be had: a distro's own python (prefix
        /usr) has its files at the image's own paths, so the image's python3 runs instead (check_python then
        requires its minor version); said once. The `host` image then shares the host's root as it is."""
        if settings.python != "host" or not system_python():
            return settings
        with self._lock:
            first, self._said_system_python = not self._said_system_python, True
        if first:
            self._say(
                f"{sys.executable} is the system's python (prefix {sys.base_prefix}), which boxes cannot carry: "
                f"boxed tests run the image's python3 (python=\"image\"); a python from pyenv, uv or "
                f"setup-python runs as it is")
        return replace(settings, python="image")

    def check_python(self, settings: Settings) -> None:
        """With python="image": PythonMismatch unless the image's python3 has the host's minor version (read
        from the image's files, not booted). The `host` image's python3 is the host's own."""
        if _runs_host_python(settings) or settings.image == "host":
            return
        runtime = self.runtime
        with self._lock:
            if settings.image not in self._image_pythons:
                try:
                    image = resolve_image(settings.image, runtime.home.root, runtime.progress)
                except BoxliteError:
                    return  # the image itself is the problem: each of its tests' boxes reports it
                self._image_pythons[settings.image] = python_version(image.base) if image.base else None
            found = self._image_pythons[settings.image]
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        if found != host:
            name = settings.image or "the default image"
            has = f"python{found}" if found else "no python3"
            raise PythonMismatch(
                f'python="image": {name} has {has}, the host runs python{host} ({sys.executable}); its '
                f'packages (and C extensions) are for {host}. Use python="host" (the default: the host\'s '
                f'interpreter runs in the box) or an image with python{host}.')

    def interpreter(self) -> HostPython:
        """The host's interpreter as images for boxes (python="host"), built once per session (cached in the
        runtime home across sessions)."""
        runtime = self.runtime
        with self._lock:
            if self._host_python is None:
                self._host_python = host_python(runtime.home.root, self._shared_dirs(), runtime.progress,
                                                 runtime.holds)
            return self._host_python

    def _shared_dirs(self) -> list[str]:
        """The directories with the host's packages that boxes mount at their own paths, besides the project:
        the site directories, and for python="host" the venv (its pyvenv.cfg and bin/)."""
        rootpath = str(self.config.rootpath.resolve())
        return [p for p in dict.fromkeys([*site_directories(), *interpreter_dirs()[1:]]) if p != rootpath]

    def box_options(self, settings: Settings, images: bool = False) -> BoxOptions:
        """The box for `settings`: the project at its own path (copy-on-write), the host's packages read-only,
        and with python="host" the host's interpreter (always as images: see vmm/hostpython.py).

        `images`: as ext4 image files of those directories (for snapshot templates) instead of virtiofs shares.
        """
        rootpath = str(self.config.rootpath.resolve())
        interpreter: tuple[tuple[str, str, str], ...] = ()
        if _runs_host_python(settings):
            interpreter = self.interpreter().volumes
            sites = [p for p in self._shared_dirs() if not any(p == v[1] or _inside(p, v[1]) for v in interpreter)]
        else:
            sites = [p for p in site_directories() if p != rootpath]
        if images:
            home = self.runtime.home.root

            def image(path: str, project: bool) -> str:
                # Left out: what changes on every run (pytest's cache), what is mounted separately (packages
                # inside it, such as a .venv), a runtime home inside it; and git's objects, but the project's.
                exclude = [".pytest_cache", *(p for p in (*sites, str(home.resolve())) if _inside(p, path))]
                if not project:
                    exclude.append(".git")
                else:  # coverage's data files: new on every run with --cov (the template would be too)
                    exclude += [n for n in os.listdir(path) if n == ".coverage" or n.startswith(".coverage.")]
                return str(directory_image(path, home, exclude, self.runtime.progress, holds=self.runtime.holds))

            volumes = [(image(rootpath, True), rootpath, "cow"), *((image(p, False), p, "ro") for p in sites)]
        else:
            volumes = [(rootpath, rootpath, "cow")]
            volumes += [(p, p, "ro") for p in sites if not _inside(p, rootpath)]  # else the project has it
        volumes += interpreter
        volumes.sort(key=lambda v: v[1].count("/"))  # a parent is mounted before what is mounted inside it
        # The `host` image, for the plugin: the default image's root with the host's interpreter in it, so that
        # its boxes restore from snapshots like any other (the runtime's own `host` image is a virtiofs view of
        # the host's root, which a snapshot cannot hold; docs/images.md).
        carried = settings.image == "host" and _runs_host_python(settings)
        options = BoxOptions(image=None if carried else settings.image, engine=settings.engine,
                             cpus=settings.cpus, memory_mib=settings.memory_mib, env=dict(settings.env),
                             network=settings.network, host_ports=settings.host_ports,
                             volumes=(*volumes, *settings.volumes), auto_remove=not self.settings.keep,
                             snapshots=settings.snapshots)
        return options.validated()

    def _make_worker(self, key: Hashable) -> Worker:
        """A box of this kind with a warm worker in it (runs in the pool's threads): restored from the kind's
        snapshot template, or booted, with pytest started in it."""
        if key in self._snapshot_items and key not in self._booted_instead:
            try:
                return self._restore_worker(key)
            except NoSpaceForTemplate as exc:
                with self._lock:
                    first = key not in self._booted_instead
                    self._booted_instead.add(key)
                if first:  # a slower run beats a failed one; the summary counts the boots
                    self._say(f"{exc}; booting a box for each of these tests instead")
        options = self.box_options(self._kinds[key])
        box = self.runtime.create(options)
        try:
            box.start()
            return Worker.start(box, self._group, self._worker_env(), str(self.config.rootpath), self._echo,
                                self._python(self._kinds[key]))
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

    def _python(self, settings: Settings) -> str:
        """The command that starts the worker's python in the box."""
        return self.interpreter().executable if _runs_host_python(settings) else "python3"

    @staticmethod
    def _worker_env() -> dict[str, str]:
        paths = os.pathsep.join(site_directories())
        return {"PYTHONPATH": os.pathsep.join([GUEST_SITE, paths]), "PYTEST_BOXLITE_SITEDIRS": paths,
                "PYTHONDONTWRITEBYTECODE": "1"}

    def _restore_worker(self, key: Hashable) -> Worker:
        template = self._template(key)
        try:
            box = self.runtime.restore(template)
        except BoxliteError:
            with self._lock:
                self._templates.pop(key, None)  # the runtime discarded it: the next worker rebuilds it
            raise
        try:
            return Worker.adopt(box, self._group, self._echo, template.data)
        except BaseException:
            box.remove()
            raise

    def _template(self, key: Hashable) -> Template:
        """The kind's snapshot template: a booted box whose worker has imported pytest and collected every
        item of this kind, saved (built once, then found in the runtime home while nothing changes)."""
        with self._lock:
            lock = self._template_locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._templates:
                return self._templates[key]
            items = self._snapshot_items[key]
            node = self.nodes.configure("template")
            workerinput = _node_input(node)
            payload = self._unit_payload(items, workerinput)
            env, cwd, python = self._worker_env(), str(self.config.rootpath), self._python(self._kinds[key])
            started: list[Worker] = []

            def warmup(box: Box) -> tuple[Execution, dict[str, Any]]:
                worker = Worker.start(box, self._group, env, cwd, self._echo, python)
                started.append(worker)
                missing, errors = worker.begin(payload)
                data = worker.snapshot_data(payload["nodeids"], missing, errors)
                data["workerinput_read"] = _read(workerinput, worker.workerinput_read)
                return worker.execution, data

            # Everything the warm-up's result depends on beyond the box: the unit, the worker's code, and of
            # the workerinput its keys, and the values the warm-up read (not a run's id under pytest-xdist, or
            # what plugins put there for workers that talk back to the host; each test gets this run's values:
            # Worker.run's `alone`). Those values are known once a template is built: one whose values differ
            # from this run's is looked up again under a key that holds them.
            stable = {**payload, "workerinput": sorted(workerinput) if workerinput is not None else None}

            def template_for(read: Any) -> Template:
                # The interpreter's images are volumes of the box: their fingerprints are in the template's key.
                extra = json.dumps([stable, env, cwd, python, PLUGIN_VERSION, WORKER_SOURCE, read],
                                   sort_keys=True, default=str)
                return self.runtime.template(self.box_options(self._kinds[key], images=True), warmup=warmup,
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
            self._templates[key] = template
            return template

    @property
    def _echo(self) -> bool:
        return self.config.getoption("capture") == "no"

    # -- running -------------------------------------------------------------------------------------
    def boxes(self, item: pytest.Item) -> bool:
        """Whether `item` runs in a box (or fails for a bad marker) instead of on the host."""
        return item.nodeid in self.units or item.nodeid in self.errors

    def run(self, item: pytest.Item) -> bool:
        """Run `item` in its box and replay its reports; False when it is not a boxed item."""
        if item.nodeid in self.errors:
            item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            self._synthesize(item, "setup", f"boxlite: {self.errors[item.nodeid]}", set())
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            return True
        if item.nodeid not in self.units:
            return False
        unit, index = self.units[item.nodeid]
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        phases: set[str] = set()
        worker = None
        try:
            worker = self._worker_for(unit, index)
            if item.nodeid in unit.missing:
                self._synthesize(item, "setup", unit.missing[item.nodeid], phases)
            else:
                if worker.items_run:
                    self.stats.reused += 1
                self.stats.tests += 1
                position, alone = index - unit.offset, None
                if worker.positions is not None:
                    position = worker.positions[item.nodeid]
                    alone = {"workerinput": _node_input(worker.node)}
                for kind, data in worker.run(position, unit.settings.timeout, alone):
                    if kind == "warning":
                        self._replay_warning(data)
                    elif kind == "examples":
                        self.examples.apply(data)
                    elif kind == "suite_property":
                        xml = self.config.stash.get(junitxml.xml_key, None)  # None: no --junitxml
                        if xml is not None:
                            xml.add_global_property(data["name"], data["value"])
                    else:
                        self._replay(item, self._report(item, kind, data), worker, phases)
        except WorkerTimeout as exc:
            message = (f"Timeout: {exc}; the test was killed (raise it with timeout= on the boxlite marker, "
                       f"--boxlite-timeout or boxlite_timeout)")
            tail = worker.stderr_tail() if worker else ""
            self._synthesize(item, "call" if "setup" in phases else "setup",
                             message + (f"\n--- last lines of the worker's stderr ---\n{tail}" if tail else ""),
                             phases, worker)
            self._drop_worker(unit, failed=True)
        except WorkerLost as exc:
            where = "setup" if "setup" not in phases else "call" if "call" not in phases else "teardown"
            self._synthesize(item, where, f"boxlite: the box crashed while running this test: {exc}", phases, worker)
            self._drop_worker(unit, failed=True)
        except Exception as exc:  # noqa: BLE001 - whatever kept the box from starting is this test's error
            self._synthesize(item, "setup", f"boxlite: could not start a box for this test: "
                             f"{type(exc).__name__}: {exc}", phases)
            self._drop_worker(unit, failed=True)
        finally:
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if unit.worker is not None and index == len(unit.items) - 1:
            self._drop_worker(unit, failed=unit.failed)
        self.nodes.flush()
        return True

    def _worker_for(self, unit: Unit, index: int) -> Worker:
        if unit.worker is None:
            worker = self.pool.acquire(unit.key)
            unit.worker, unit.offset = worker, index
            worker.node = self.nodes.configure(worker.label)
            if worker.positions is not None:  # restored from a template that collected every item already
                missing, collect_errors = worker.collected
            else:
                workerinput = _node_input(worker.node)
                missing, collect_errors = worker.begin(self._unit_payload(unit.items[index:], workerinput))
            why = "\n".join(self._longrepr_text(d) for d in collect_errors) or "no such test in the box"
            unit.missing = {nodeid: f"boxlite: the box did not collect this test:\n{why}" for nodeid in missing}
        return unit.worker

    def _unit_payload(self, items: list[pytest.Item], workerinput: dict[str, Any] | None) -> dict[str, Any]:
        config = self.config
        rootpath = config.rootpath.resolve()
        invocation = config.invocation_params.dir.resolve()
        args = [f"--rootdir={rootpath}"]
        if config.inipath is not None:
            args.append(f"--config-file={config.inipath}")
        args += list(dict.fromkeys(str(item.path) for item in items))
        return {
            # The guest parses its own args: the host's positional ones and argparse internals stay here.
            # Not what the guest overrides: a snapshot template's key holds these, and they vary per run.
            "option": {k: v for k, v in _builtins(vars(config.option)).items()
                       if k != "file_or_dir" and not k.startswith("_") and k not in GUEST_OVERRIDES},
            "args": args,
            "nodeids": [item.nodeid for item in items],
            "cwd": str(invocation if invocation.is_relative_to(rootpath) else rootpath),
            "workerinput": workerinput,
        }

    def _longrepr_text(self, data: Mapping[str, Any]) -> str:
        report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
        return str(report.longrepr)

    def _report(self, item: pytest.Item, kind: str, data: dict[str, Any]) -> pytest.TestReport:
        if kind == "plain":  # what the guest left out is the item's, as pytest would have made it
            return pytest.TestReport(item.nodeid, item.location, {name: 1 for name in item.keywords}, "passed",
                                     None, data["when"], [], data["duration"], data["start"], data["stop"])
        return self.config.hook.pytest_report_from_serializable(config=self.config, data=data)

    def _replay(self, item: pytest.Item, report: pytest.TestReport, worker: Worker, phases: set[str]) -> None:
        report.boxlite_box = worker.label  # type: ignore[attr-defined]  # shown by -v (reporting.py)
        if report.when == "teardown":
            report.user_properties.append(("boxlite_box", worker.box.id))
        if report.failed:
            unit, _ = self.units[item.nodeid]
            unit.failed = True
        phases.add(report.when)
        item.ihook.pytest_runtest_logreport(report=report)

    def _replay_warning(self, data: Mapping[str, Any]) -> None:
        """A warning raised in the box, shown in the host's warnings summary (categories by name only)."""
        category = getattr(builtins, data["category"], None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = getattr(pytest, data["category"], UserWarning)
        message = warnings.WarningMessage(category(data["message"]), category, data["filename"], data["lineno"])
        location = tuple(data["location"]) if data["location"] else None
        self.config.hook.pytest_warning_recorded.call_historic(kwargs={
            "warning_message": message, "when": "runtest", "nodeid": data["nodeid"], "location": location})

    def _synthesize(self, item: pytest.Item, when: str, message: str, phases: set[str],
                    worker: Worker | None = None) -> None:
        """A failed report for `item` made on the host (nothing came back from the box), plus the teardown
        report that output plugins such as junitxml wait for."""
        keywords = {name: 1 for name in item.keywords}
        reports = [pytest.TestReport(item.nodeid, item.location, keywords, "failed", message, when, [], 0.0)]
        if when != "teardown":
            reports.append(pytest.TestReport(item.nodeid, item.location, keywords, "passed", None, "teardown",
                                             [], 0.0))
        for report in reports:
            if worker is not None:
                report.boxlite_box = worker.label  # type: ignore[attr-defined]
            phases.add(report.when)  # type: ignore[arg-type]
            item.ihook.pytest_runtest_logreport(report=report)
        if item.nodeid in self.units:
            self.units[item.nodeid][0].failed = True

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
        for unit, _ in list(self.units.values()):
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


def _runs_host_python(settings: Settings) -> bool:
    """Whether boxes of `settings` run the host's interpreter carried in as images (vmm/hostpython.py)."""
    return settings.python == "host"


def _read(workerinput: Mapping[str, Any] | None, keys: Any) -> dict[str, Any]:
    """The values of `keys` in `workerinput`, as JSON keeps them (the template's data is JSON)."""
    values = {key: workerinput[key] for key in keys if key in workerinput} if workerinput else {}
    return json.loads(json.dumps(values, default=str))


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _node_input(node: BoxNode | None) -> dict[str, Any] | None:
    """A box node's workerinput as it crosses the channel (plugins may put any object in it)."""
    return _builtins(node.workerinput) if node is not None else None


def _builtins(value: Any) -> Any:
    """`value` with only what execnet can carry: builtin scalars and containers of them; paths as strings."""
    if isinstance(value, BUILTIN):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [_builtins(v) for v in value]
        return [v for v in items if v is not _SKIP]
    if isinstance(value, dict):
        pairs = {k: _builtins(v) for k, v in value.items() if isinstance(k, str)}
        return {k: v for k, v in pairs.items() if v is not _SKIP}
    return _SKIP


_SKIP = object()
