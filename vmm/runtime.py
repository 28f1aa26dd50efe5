"""The runtime: creates boxes, finds them again, and accounts for them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import agent, cache, engines, kernel, snapshot
from .box import Box, BoxInfo
from .errors import BoxError, BoxNotFound
from .home import Home
from .images import ImageConfig, ResolvedImage, resolve_image
from .options import BoxOptions

log = logging.getLogger(__name__)


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
        self._holds = cache.Holds()
        self._sweep()
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

    def create(self, options: BoxOptions | None = None, **overrides: Any) -> Box:
        """A new box (not started yet: `start()` it, or use it in a `with` block).

        Options are checked first; the engine and kernel are found and the image prepared before this
        returns, so a missing qemu, kernel or image fails here, before any VM starts.
        """
        options = BoxOptions(**overrides) if options is None else options
        if overrides and options is not None:
            options = BoxOptions.from_dict({**options.to_dict(), **overrides})
        options = options.validated()
        engines.select(options.engine, self.kernel.release)  # a missing engine or kernel fails before any work
        image = self._resolve(options)
        box = Box(self, uuid.uuid4().hex, options, image, created=time.time())
        self._adopt(box)
        return box

    def _resolve(self, options: BoxOptions) -> ResolvedImage:
        """The image of these options, its base held for this runtime (resolved again if it was evicted
        before the hold)."""
        for _ in range(2):
            image = resolve_image(options.image, self.home.root, progress=self.progress,
                                  insecure_registries=self.insecure_registries)
            if image.base is None or self._holds.holds(image.base):
                return image
            self._use(image.base, image.ref)
            if image.base.exists():
                return image
        return image

    def _boot_files(self) -> kernel.BootFiles:
        """The kernel's boot files, held for this runtime (built again if they were evicted before the hold)."""
        agent_path = agent.binary(self.home.root)
        boot = kernel.boot_files(self.home.kernels, self.kernel, agent_path)
        if not self._holds.holds(boot.vmlinux.parent):
            self._use(boot.vmlinux.parent)
            boot = kernel.boot_files(self.home.kernels, self.kernel, agent_path)
        return boot

    def _use(self, path: Path, what: str = "") -> None:
        """Hold the cache entry at `path` (if it is in this home) until close(): it is not evicted meanwhile."""
        if path.is_relative_to(self.home.root):
            self._holds.hold(path, what)

    def _unuse(self, path: Path) -> None:
        """No longer hold `path` (its build failed: nothing to keep)."""
        self._holds.drop(path)

    def _adopt(self, box: Box) -> None:
        box._save()
        with self._lock:
            self._boxes[box.id] = box
            self._created += 1

    def template(self, options: BoxOptions | None = None, *, warmup: snapshot.Warmup | None = None,
                 key: str = "") -> snapshot.Template:
        """A snapshot template of a box with these options: booted, warmed up, and saved, once.

        `warmup(box)` runs in the booted template box and returns (execution, data): a command left
        running (blocked on its stdin, all its output read) that every restored box takes over as
        `box.warm_execution`, and JSON data kept with the template. `key` names what the warm-up depends
        on beyond the options (its code, its inputs): a different key is a different template.
        Templates are kept in the runtime home and rebuilt when anything they depend on changes.
        """
        options = (options or BoxOptions()).validated()
        engine = engines.select(options.engine, self.kernel.release)
        image = self._resolve(options)
        snapshot.check_snapshottable(options, image, engine)
        return snapshot.get_or_build(self, options, image, engine, warmup, key)

    def restore(self, template: snapshot.Template, name: str | None = None) -> Box:
        """A running box restored from `template`: its RAM shared copy-on-write with the template's, fresh
        entropy, clock and name. A template that cannot be restored is discarded (the next `template()`
        call rebuilds it) and BoxError raised."""
        options = dataclasses.replace(template.options, name=name)
        box = Box(self, uuid.uuid4().hex, options, template.image, created=time.time())
        box._template = template
        self._adopt(box)
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

    def _boot_template(self, box: Box, engine: engines.Engine) -> snapshot.Template | None:
        """What `box.start()` restores instead of booting on `engine`, if its options allow (see
        BoxOptions.snapshots)."""
        if not box.options.snapshots:
            return None
        return snapshot.boot_template(self, box.options, box.image, engine)

    def _boot_without_snapshot(self, key: str) -> None:
        """Boxes of this boot snapshot's options boot for the rest of this runtime (it failed once)."""
        with self._lock:
            self._no_boot_snapshot.add(key)

    def _boot_template_failed(self, template: snapshot.Template) -> None:
        self._boot_without_snapshot(template.key)
        template.discard()

    def get(self, box_id: str) -> Box:
        """The box with this id (or unique id prefix), live in this process or stopped on disk."""
        with self._lock:
            matches = [b for i, b in self._boxes.items() if i.startswith(box_id)]
        if len(matches) == 1:
            return matches[0]
        ids = [p.name for p in self.home.boxes.iterdir() if p.name.startswith(box_id) and (p / "box.json").exists()]
        if len(ids) != 1 or not box_id:
            what = "matches several boxes" if len(ids) > 1 else "matches no box"
            raise BoxNotFound(f"box id {box_id!r} {what} in {self.home.boxes}; `Runtime.list()` shows them")
        box = self._load(ids[0])
        with self._lock:
            self._boxes.setdefault(box.id, box)
            return self._boxes[box.id]

    def _load(self, box_id: str) -> Box:
        state = json.loads((self.home.box_dir(box_id) / "box.json").read_text())
        image = state["image"]
        image["config"] = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in image["config"].items()})
        image["base"] = Path(image["base"])
        status = state["status"]
        if status == "running" and not _alive(state.get("owner")):
            status = "stopped"
        box = Box(self, box_id, BoxOptions.from_dict(state["options"]), ResolvedImage(**image),
                  created=state["created"], status=status)
        box.engine_name = state.get("engine")
        return box

    def list(self) -> list[BoxInfo]:
        """Every box in this runtime home, newest first."""
        infos = []
        for path in self.home.boxes.iterdir():
            if (path / "box.json").exists():
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
            if box.status == "created" and box._auto_remove:
                box._remove_files()
        self._holds.release()
        cache.make_room(self.home.root, 0)
        if errors:
            raise errors[0]

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accounting, called by boxes -----------------------------------------------------------------
    def _started(self, box: Box, seconds: float, restored: bool = False) -> None:
        with self._lock:
            if restored:
                self._restores += 1
                self._restore_seconds += seconds
            else:
                self._boots += 1
                self._boot_seconds += seconds

    def _template_built(self, seconds: float) -> None:
        with self._lock:
            self._templates_built += 1
            self._template_seconds += seconds

    def _removed(self, box: Box) -> None:
        with self._lock:
            self._boxes.pop(box.id, None)
            self._destroyed += 1

    def _exec_called(self) -> None:
        with self._lock:
            self._execs += 1

    def _sweep(self) -> None:
        """Forget ephemeral boxes whose process died without cleaning up (SIGKILL, power loss), and box
        directories that never got their state file (their process died creating them)."""
        for path in self.home.boxes.iterdir():
            try:
                state = json.loads((path / "box.json").read_text())
            except (OSError, ValueError):
                if not (path / "box.json").exists() and time.time() - path.stat().st_mtime > cache.ORPHAN_AGE_S:
                    log.debug("removing box directory %s without state", path.name)
                    shutil.rmtree(path, ignore_errors=True)
                continue
            owner = state.get("owner")
            options = state.get("options", {})
            if owner and not _alive(owner) and options.get("auto_remove") and not options.get("disk_size_gb"):
                log.debug("removing box %s left by dead process %s", path.name, owner)
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int | None) -> bool:
    return bool(pid) and cache.owner_pid_alive(int(pid))
