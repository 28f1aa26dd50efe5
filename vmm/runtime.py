"""The runtime: creates boxes, finds them again, and accounts for them.

It decides how each box starts, as a LaunchPlan (vmm/box.py): restored from a snapshot template (one the
caller asked for, or the boot snapshot of its options), or booted. The boot snapshots and templates it builds
are boxes it boots with their RAM in a file, warms up and saves (vmm/snapshot.py keeps them on disk).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import agent, boxstate, cache, engines, kernel, snapshot
from .box import Box, BoxHooks, BoxInfo, LaunchPlan
from .errors import BoxError, BoxNotFound, ConfigError, ExecError, NoSpaceForTemplate
from .execution import Execution
from .home import Home
from .images import ResolvedImage, resolve_image
from .options import BoxOptions

log = logging.getLogger(__name__)

# A warm-up: given the running template box, start what every restored box should find running (or None),
# and return it with any JSON data the restored boxes' users need (e.g. what the warm-up learned).
Warmup = Callable[[Box], "tuple[Execution | None, Any]"]


@dataclass(frozen=True)
class RuntimeMetrics:
    active_boxes: int
    boxes_created: int
    boxes_destroyed: int
    exec_calls: int
    boots: int
    boot_seconds: float
    restores: int = 0  # boxes started from a snapshot template instead of booted
    restore_seconds: float = 0.0
    templates_built: int = 0
    template_seconds: float = 0.0  # building them: boot, warm-up, save


class Runtime:
    """Boxes under one runtime home. `with Runtime() as rt:` stops every box it started at the end."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, kernel_image: str | None = None,
                 kernel_modules: str | None = None, progress: Callable[[str], None] | None = None,
                 insecure_registries: Iterable[str] = ()) -> None:
        """`insecure_registries`: registries (host[:port]) that may be reached over plain http, besides
        loopback ones and `$BOXLITE_INSECURE_REGISTRIES`."""
        self.home = Home(home)
        cache.configured_max(self.home.root)  # a cap that is not a size fails here, not at the end of the run
        self.insecure_registries = tuple(insecure_registries)
        self._kernel_args = (kernel_image, kernel_modules)
        self._kernel: kernel.Kernel | None = None
        self.progress = progress
        self._lock = threading.Lock()
        self._boxes: dict[str, Box] = {}
        self._created = self._destroyed = self._execs = self._boots = self._restores = 0
        self._boot_seconds = self._restore_seconds = 0.0
        self._templates_built, self._template_seconds = 0, 0.0
        # Keys of boot snapshots that failed to restore, or had no room to be saved: those boxes boot.
        self._no_boot_snapshot: set[str] = set()
        # The cache entries (templates, bases, kernel builds, ...) this runtime uses: not evicted until close().
        self._holds = cache.Holds(self.home.root)
        boxstate.sweep(self.home.boxes)
        cache.sweep(self.home.root)

    @property
    def holds(self) -> cache.Holds:
        """The cache entries this runtime uses, held until close(): `volumes.directory_image(holds=...)`."""
        return self._holds

    @property
    def kernel(self) -> kernel.Kernel:
        if self._kernel is None:
            self._kernel = kernel.find_kernel(*self._kernel_args)
        return self._kernel

    # -- boxes ----------------------------------------------------------------------------------------
    def create(self, options: BoxOptions | None = None, **overrides: Any) -> Box:
        """A new box (not started yet: `start()` it, or use it in a `with` block).

        Options are checked first; the engine and kernel are found and the image prepared before this
        returns, so a missing qemu, kernel or image fails here, before any VM starts.
        """
        options = BoxOptions(**overrides) if options is None else options
        if overrides and options is not None:
            options = BoxOptions.from_dict({**options.to_dict(), **overrides})
        options = options.validated()
        self._engine(options)  # a missing engine or kernel fails before any work
        return self._new_box(options, self._resolve(options), self._plan, self._boot_instead)

    def restore(self, template: snapshot.Template, name: str | None = None) -> Box:
        """A running box restored from `template`: its RAM shared copy-on-write with the template's, fresh
        entropy, clock and name. A template that cannot be restored is discarded (the next `template()`
        call rebuilds it) and BoxError raised."""
        options = dataclasses.replace(template.options, name=name)
        box = self._new_box(options, template.image, lambda box: dataclasses.replace(
            self._launch(box.options), template=template), _fail)
        try:
            return box.start()
        except BoxError as exc:
            box.remove()
            log.warning("restoring template %s failed (%s): discarding it", template.key[:12], exc)
            template.discard()
            raise
        except BaseException:
            box.remove()
            raise

    def get(self, box_id: str) -> Box:
        """The box with this id (or unique id prefix), live in this process or stopped on disk."""
        with self._lock:
            matches = [b for i, b in self._boxes.items() if i.startswith(box_id)]
        if len(matches) == 1:
            return matches[0]
        ids = [p.name for p in self.home.boxes.iterdir() if p.name.startswith(box_id) and boxstate.exists(p)]
        if len(ids) != 1 or not box_id:
            what = "matches several boxes" if len(ids) > 1 else "matches no box"
            raise BoxNotFound(f"box id {box_id!r} {what} in {self.home.boxes}; `Runtime.list()` shows them")
        box = self._load(ids[0])
        with self._lock:
            self._boxes.setdefault(box.id, box)
            return self._boxes[box.id]

    def list(self) -> list[BoxInfo]:
        """Every box in this runtime home, newest first."""
        infos = []
        for path in self.home.boxes.iterdir():
            if boxstate.exists(path):
                with self._lock:
                    live = self._boxes.get(path.name)
                try:
                    infos.append((live or self._load(path.name)).info())
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("ignoring unreadable box state in %s", path)
        return sorted(infos, key=lambda i: i.created, reverse=True)

    def remove(self, box_id: str) -> None:
        self.get(box_id).remove()

    def metrics(self) -> RuntimeMetrics:
        with self._lock:
            active = sum(1 for b in self._boxes.values() if b.status == "running")
            return RuntimeMetrics(active, self._created, self._destroyed, self._execs, self._boots,
                                  self._boot_seconds, self._restores, self._restore_seconds,
                                  self._templates_built, self._template_seconds)

    def close(self) -> None:
        """Stop every box this runtime started; remove the ephemeral ones; then evict the least recently used
        cache entries no live process uses while the home is over its cap (vmm/cache.py)."""
        with self._lock:
            boxes = list(self._boxes.values())
        errors = []
        for box in boxes:
            try:
                box.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others, then report
                errors.append(exc)
            if box.status == "created" and box.ephemeral:
                box.remove()
        self._holds.release()
        cache.make_room(self.home.root, 0)
        if errors:
            raise errors[0]

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_box(self, options: BoxOptions, image: ResolvedImage, plan: Callable[[Box], LaunchPlan],
                 restore_failed: Callable[[Box, LaunchPlan, BoxError], LaunchPlan]) -> Box:
        box_id = uuid.uuid4().hex
        box = Box(box_id, options, image, time.time(), self.home.box_dir(box_id),
                  self._hooks(plan, restore_failed))
        with self._lock:
            self._boxes[box.id] = box
            self._created += 1
        return box

    def _load(self, box_id: str) -> Box:
        state = boxstate.load(self.home.box_dir(box_id))
        return Box(box_id, state.options, state.image, state.created, self.home.box_dir(box_id),
                   self._hooks(self._plan, self._boot_instead), status=state.status, engine_name=state.engine,
                   saved=True)

    def _hooks(self, plan: Callable[[Box], LaunchPlan],
               restore_failed: Callable[[Box, LaunchPlan, BoxError], LaunchPlan]) -> BoxHooks:
        return BoxHooks(plan=plan, restore_failed=restore_failed, started=self._started,
                        exec_called=self._exec_called, removed=self._removed)

    # -- how a box starts -----------------------------------------------------------------------------
    def _engine(self, options: BoxOptions) -> engines.Engine:
        return engines.select(options.engine, self.kernel.release)

    def _resolve(self, options: BoxOptions) -> ResolvedImage:
        """The image of these options, its base held for this runtime."""
        return self._holds.held(
            lambda: resolve_image(options.image, self.home.root, progress=self.progress,
                                  insecure_registries=self.insecure_registries),
            lambda image: image.base, lambda image: image.ref)

    def _launch(self, options: BoxOptions) -> LaunchPlan:
        """Booting a box of these options: its engine and boot files, held for this runtime with its volume
        images."""
        engine = self._engine(options)
        agent_path = agent.binary(self.home.root)
        boot = self._holds.held(lambda: kernel.boot_files(self.home.kernels, self.kernel, agent_path),
                                lambda files: files.vmlinux.parent)
        for vol in options.volumes:
            self._holds.hold(Path(vol.host))
        return LaunchPlan(engine, boot, agent.digest(agent_path))

    def _plan(self, box: Box) -> LaunchPlan:
        """How a box of create() starts: restored from the boot snapshot of its options if they allow one
        (BoxOptions.snapshots), else booted."""
        plan = self._launch(box.options)
        if not box.options.snapshots:
            return plan
        return dataclasses.replace(plan, template=self._boot_snapshot(box.options, box.image, plan))

    def _boot_snapshot(self, options: BoxOptions, image: ResolvedImage,
                       plan: LaunchPlan) -> snapshot.Template | None:
        """The boot snapshot boxes of these options restore (built by the first start); None if they boot."""
        try:
            snapshot.check_snapshottable(options, image, plan.engine)
        except ConfigError as exc:
            log.debug("boxes of these options boot: %s", exc)
            return None
        options = snapshot.boot_options(options)
        key = snapshot.template_key(options, image, plan.engine, plan.boot, plan.agent, snapshot.BOOT_KEY)
        with self._lock:
            if key in self._no_boot_snapshot:
                return None  # it failed in this runtime: trying it again would most likely fail again
        try:
            return self._template(options, image, plan, key, _boot_warmup)
        except NoSpaceForTemplate as exc:
            log.warning("%s; boxes of these options boot instead", exc)
            with self._lock:
                self._no_boot_snapshot.add(key)
            return None

    def _boot_instead(self, box: Box, plan: LaunchPlan, exc: BoxError) -> LaunchPlan:
        """Restoring a boot snapshot failed: it is discarded, and boxes of its options boot for the rest of this
        runtime."""
        assert plan.template is not None
        log.warning("box %s: restoring its boot snapshot failed (%s); discarding it and booting (and so will the "
                    "other boxes of these options in this runtime)", box.id, exc)
        with self._lock:
            self._no_boot_snapshot.add(plan.template.key)
        plan.template.discard()
        return dataclasses.replace(plan, template=None)

    # -- templates ------------------------------------------------------------------------------------
    def template(self, options: BoxOptions | None = None, *, warmup: Warmup | None = None,
                 key: str = "") -> snapshot.Template:
        """A snapshot template of a box with these options: booted, warmed up, and saved, once.

        `warmup(box)` runs in the booted template box and returns (execution, data): a command left
        running (blocked on its stdin, all its output read) that every restored box takes over as
        `box.warm_execution`, and JSON data kept with the template. `key` names what the warm-up depends
        on beyond the options (its code, its inputs): a different key is a different template.
        Templates are kept in the runtime home and rebuilt when anything they depend on changes.
        """
        options = (options or BoxOptions()).validated()
        engine = self._engine(options)
        image = self._resolve(options)
        snapshot.check_snapshottable(options, image, engine)
        plan = self._launch(options)
        key = snapshot.template_key(options, image, plan.engine, plan.boot, plan.agent, key)
        return self._template(options, image, plan, key, warmup)

    def _template(self, options: BoxOptions, image: ResolvedImage, plan: LaunchPlan, key: str,
                  warmup: Warmup | None) -> snapshot.Template:
        """The template `key`, held for this runtime; built by booting `plan` if it is not in the home."""
        directory = self.home.templates / key[:32]
        about = snapshot.describe(options)
        # Held first, so that no eviction removes it between its check and its use.
        self._holds.hold(directory, about)
        try:
            return snapshot.get_or_build(
                directory, key, options, image, home=self.home.root, about=about, boot=warmup is _boot_warmup,
                build=lambda work: self._build(options, image, dataclasses.replace(plan, ram_file=work / "ram"),
                                               warmup, work / "state"))
        except BaseException:
            self._holds.drop(directory)
            raise

    def _build(self, options: BoxOptions, image: ResolvedImage, plan: LaunchPlan, warmup: Warmup | None,
               state: Path) -> snapshot.Saved:
        """Boot a box as `plan` says (its RAM in plan.ram_file), warm it up, save its devices to `state`."""
        started = time.monotonic()
        what = "boot snapshot" if warmup is _boot_warmup else "snapshot template"
        self._say(f"saving a {what} ({options.image or 'default'} image, {options.cpus} CPU, "
                  f"{options.memory_mib} MiB; once, for as long as nothing it depends on changes)")
        box = self._new_box(options, image, lambda _: plan, _fail)
        try:
            box.start()
            execution, data = warmup(box) if warmup else (None, None)
            warm = execution.state() if execution is not None else None
            saved = snapshot.Saved(box.snapshot(state), warm, data)
        except BaseException:
            box.remove()
            raise
        seconds = time.monotonic() - started
        with self._lock:
            self._templates_built += 1
            self._template_seconds += seconds
        self._say(f"{what} saved ({seconds:.1f} s)")
        return saved

    def _say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    # -- accounting, given to boxes as their hooks ---------------------------------------------------
    def _started(self, seconds: float, restored: bool) -> None:
        with self._lock:
            if restored:
                self._restores += 1
                self._restore_seconds += seconds
            else:
                self._boots += 1
                self._boot_seconds += seconds

    def _removed(self, box: Box) -> None:
        with self._lock:
            self._boxes.pop(box.id, None)
            self._destroyed += 1

    def _exec_called(self) -> None:
        with self._lock:
            self._execs += 1


def _fail(box: Box, plan: LaunchPlan, exc: BoxError) -> LaunchPlan:
    """A box that restores a template the caller chose does not boot instead: the caller gets the error."""
    raise exc


def _boot_warmup(box: Box) -> tuple[None, None]:
    """A boot snapshot's warm-up (snapshot.BOOT_WARMUP)."""
    for argv in snapshot.BOOT_WARMUP:
        try:  # writing no .pyc files: the box's file system stays as the image has it
            box.exec(*argv, env={"PYTHONDONTWRITEBYTECODE": "1"}, timeout=snapshot.BOOT_WARMUP_TIMEOUT)
        except ExecError as exc:  # an image without it (or one whose python hangs): nothing to warm
            log.debug("boot snapshot warm-up %s: %s", argv, exc)
    return None, None
