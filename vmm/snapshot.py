"""Snapshot templates: a VM booted and warmed up once, saved, then restored copy-on-write for every box.

A template is a directory in the runtime home, named by a key over everything its saved state depends on
(image, volumes, resources, kernel, agent, qemu, and what the caller's warm-up did). Its files:
`ram` (the guest's RAM, written through while the template VM ran; its all-zero pages are deallocated after
the save, so it takes on disk only what the guest wrote), `state` (qemu's device state, small) and
`template.json` (written last: a directory without it is an unfinished build). Processes sharing the
runtime home build each template once, under a file lock; a template that fails its checks is rebuilt.
Templates are cache entries (vmm/cache.py): a runtime holds the use lock of those it uses, and the least
recently used ones are evicted when the home is over its cap.

This module works on plain data (paths, keys, options): the Runtime boots and saves the VM of a template
being built, through the `build` callable it gives `get_or_build()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import cache
from .engines.base import Engine
from .errors import BoxError, ConfigError, NoSpaceForTemplate
from .execution import ExecutionState
from .images import ResolvedImage
from .kernel import BootFiles
from .options import BoxOptions

log = logging.getLogger(__name__)

FORMAT = 1  # of the files below; part of every key
# Run in a boot snapshot before it is saved, so that the image's shell, C library and python are in the page
# cache of every box restored from it: their first commands read nothing from disk (~0.1 s each under TCG).
BOOT_WARMUP = (("sh", "-c", "true"), ("python3", "-c", "pass"))
BOOT_WARMUP_TIMEOUT = 60.0
BOOT_KEY = f"boot {BOOT_WARMUP}"  # the `extra` of boot templates
# Room for the state file and metadata beside the RAM file, which can grow to the box's whole memory.
SPACE_MARGIN_MIB = 64
# What a new template is expected to take on disk, as a share of its box's memory, when making room for it
# under the home's cap (measured: 80 MiB of 512 after the zero pages are dug out).
EXPECTED_RAM_SHARE = 0.25


@dataclass(frozen=True)
class Template:
    key: str
    directory: Path
    options: BoxOptions
    image: ResolvedImage
    next_stream: int  # the first channel stream id free in restored boxes
    warm: ExecutionState | None  # the warm-up's command, still running in every restored box
    data: Any  # what the warm-up returned

    @property
    def ram(self) -> Path:
        return self.directory / "ram"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def discard(self) -> None:
        """Remove a template that failed to restore (the next get_or_build rebuilds it)."""
        with FileLock(str(self.directory) + ".lock"):
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class Saved:
    """What building a template saved besides the VM's RAM and state: from its warm-up."""

    next_stream: int  # the first channel stream id free after the save
    warm: ExecutionState | None  # the warm-up's command, left running
    data: Any  # JSON data the warm-up returned


def check_snapshottable(options: BoxOptions, image: ResolvedImage, engine: Engine) -> None:
    """ConfigError unless boxes of these options can be snapshotted, saying what to change."""
    if not engine.snapshots:
        raise ConfigError(f"the {engine.name} engine cannot snapshot VMs; use engine='qemu'")
    if options.disk_size_gb is not None:
        raise ConfigError("a box with a persistent disk (disk_size_gb) cannot be a snapshot template")
    if image.tree is not None:
        raise ConfigError("the host image is shared through virtiofs, which cannot be snapshotted")
    for vol in options.volumes:
        if not Path(vol.host).is_file():
            raise ConfigError(f"volume {vol.host}:{vol.guest}: virtiofs shares cannot be snapshotted; give "
                              "the volume as an ext4 image file (vmm.volumes.directory_image)")


def boot_options(options: BoxOptions) -> BoxOptions:
    """The options of the boot snapshot boxes of `options` restore: without those given with each exec (its
    environment, working directory and user), so that boxes differing only in them share one."""
    return dataclasses.replace(options, env={}, working_dir=None, user=None)


def _stat(path: Path | str) -> list[Any]:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def template_key(options: BoxOptions, image: ResolvedImage, engine: Engine, boot: BootFiles, agent_digest: str,
                 extra: str) -> str:
    """A digest of everything a template's saved RAM and devices depend on: change any, get a new template.
    `agent_digest`: of the agent in `boot`'s initramfs; `extra`: what the warm-up depends on."""
    parts = {
        "format": FORMAT,
        # The guest sees the same network in "internet" and "full" (the policy is the host's, set up anew for
        # every restored copy): one template serves both, and any host_ports.
        "options": {**{k: v for k, v in options.to_dict().items()
                       if k not in ("name", "auto_remove", "snapshots", "host_ports")},
                    "network": options.network != "none"},
        "image": [image.ref, image.digest, _stat(image.base) if image.base else None],
        "volumes": [_stat(v.host) for v in options.volumes],
        "kernel": [_stat(boot.vmlinux), _stat(boot.initramfs)],
        "agent": agent_digest,
        "engine": engine.snapshot_key(),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def describe(options: BoxOptions) -> str:
    """What a template of these options is, for `boxlite cache ls`."""
    sources = [cache.note(Path(v.host)) or v.host for v in options.volumes]
    return f"{options.image or 'default'} image, {options.cpus} CPU, {options.memory_mib} MiB" + (
        f"; volumes of {', '.join(sources)}" if sources else "")


def load(directory: Path, key: str, options: BoxOptions, image: ResolvedImage) -> Template | None:
    """The template in `directory`, or None if it is missing, unfinished or damaged."""
    try:
        meta = json.loads((directory / "template.json").read_text())
        template = Template(key, directory, options, image, int(meta["next_stream"]),
                            ExecutionState(**{**meta["warm"], "args": tuple(meta["warm"]["args"])})
                            if meta["warm"] else None, meta["data"])
        ram_ok = template.ram.stat().st_size == options.memory_mib << 20
        state_ok = hashlib.sha256(template.state.read_bytes()).hexdigest() == meta["state_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if directory.exists():
            log.warning("snapshot template %s is unreadable (%s): rebuilding it", directory, exc)
        return None
    if not (ram_ok and state_ok and meta.get("key") == key):
        log.warning("snapshot template %s is damaged (its RAM or state file changed): rebuilding it", directory)
        return None
    return template


def get_or_build(directory: Path, key: str, options: BoxOptions, image: ResolvedImage, *, home: Path,
                 build: Callable[[Path], Saved], about: str, boot: bool) -> Template:
    """The template `key` in `directory`, built there first if it is missing or damaged: `build(work)` boots a
    VM with its RAM in `work / "ram"`, warms it up and saves its devices to `work / "state"`. Processes sharing
    the home build it once, under the directory's lock; room is made under the home's cap first, and
    NoSpaceForTemplate raised before building if the disk cannot take the RAM file. `about` (what it is) and
    `boot` (a boot snapshot) are kept with it, for `boxlite cache ls`."""
    template = load(directory, key, options, image)
    if template is not None:
        return template
    cache.make_room(home, int((options.memory_mib << 20) * EXPECTED_RAM_SHARE))
    _check_space(directory.parent, options)
    with FileLock(str(directory) + ".lock"):
        template = load(directory, key, options, image)  # another process built it while we waited
        if template is not None:
            return template
        shutil.rmtree(directory, ignore_errors=True)
        _build(directory, key, build, about, boot)
    template = load(directory, key, options, image)
    if template is None:
        raise BoxError(f"the snapshot template just built in {directory} does not check out; is the disk full?")
    return template


def _check_space(templates: Path, options: BoxOptions) -> None:
    """NoSpaceForTemplate unless the RAM file can grow to the box's memory: on a full disk qemu would die
    of SIGBUS in the middle of the build."""
    free_mib = shutil.disk_usage(templates).free >> 20
    if free_mib < options.memory_mib + SPACE_MARGIN_MIB:
        raise NoSpaceForTemplate(
            f"{templates} has {free_mib} MiB free, and a snapshot of a {options.memory_mib} MiB box needs up to "
            f"{options.memory_mib + SPACE_MARGIN_MIB} MiB: free some space (`boxlite cache prune` removes unused "
            "templates), or turn snapshots off (BoxOptions.snapshots=False, --boxlite-no-snapshots)"
        )


def _build(directory: Path, key: str, build: Callable[[Path], Saved], about: str, boot: bool) -> None:
    """Build into a temporary directory beside `directory`, renamed into place once whole."""
    started = time.monotonic()
    work = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:  # from the first thing made on: a Ctrl-C leaves nothing half-built
        work.mkdir(parents=True)
        saved = build(work)
        cache.dig_holes(work / "ram")
        meta = {"key": key, "about": about, "boot": boot, "next_stream": saved.next_stream,
                "warm": asdict(saved.warm) if saved.warm else None, "data": saved.data,
                "state_sha256": hashlib.sha256((work / "state").read_bytes()).hexdigest(),
                "built": time.time(), "build_seconds": time.monotonic() - started}
        (work / "template.json").write_text(json.dumps(meta, indent=1))
        os.rename(work, directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("built snapshot template %s in %.1f s", key[:12], time.monotonic() - started)
