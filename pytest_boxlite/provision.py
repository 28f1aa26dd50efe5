"""What the boxes of boxed tests are made of: their `vmm.BoxOptions` (the project at its own path, the host's
packages read-only, the host's interpreter), the volume images of those directories for snapshot templates,
and the python and environment their worker starts with."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from collections.abc import Callable

import pytest

from vmm import (
    BoxliteError,
    BoxOptions,
    HostPython,
    PythonMismatch,
    Runtime,
    Volume,
    directory_image,
    host_python,
    image_python_version,
    interpreter_dirs,
    resolve_image,
    select_engine,
    system_python,
)

from .config import Settings

# Its sitecustomize makes every python in a box process the host's site directories (guestsite/).
GUEST_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guestsite")


@functools.cache
def site_directories() -> tuple[str, ...]:
    """The directories the host's pytest and this plugin import from, each once (the guest mounts them).
    Fixed for the process: planning asks for every boxed item."""
    import _pytest
    import execnet
    import iniconfig
    import packaging
    import pluggy

    import pytest_boxlite
    import vmm

    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__ or "")))
             for m in (_pytest, pluggy, execnet, iniconfig, packaging, pytest_boxlite, vmm)]
    import site
    roots += [p for p in site.getsitepackages() if os.path.isdir(p)]
    return tuple(dict.fromkeys(os.path.realpath(r) for r in roots))


def runs_host_python(settings: Settings) -> bool:
    """Whether boxes of `settings` run the host's interpreter carried in as images (vmm.host_python)."""
    return settings.python == "host"


def worker_env() -> dict[str, str]:
    """The environment of a worker's python in a box: the host's site directories, processed as such."""
    paths = os.pathsep.join(site_directories())
    return {"PYTHONPATH": os.pathsep.join([GUEST_SITE, paths]), "PYTEST_BOXLITE_SITEDIRS": paths,
            "PYTHONDONTWRITEBYTECODE": "1"}


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


class Provisioner:
    """Box options for the session's settings, over its runtime (`runtime` is called when one is needed)."""

    def __init__(self, config: pytest.Config, runtime: Callable[[], Runtime], keep: bool,
                 say: Callable[[str], None]) -> None:
        self.rootpath = str(config.rootpath.resolve())
        self._runtime = runtime
        self.keep = keep  # boxes of failed tests are kept: not removed when they stop
        self._say = say
        self._lock = threading.Lock()
        self._host_python: HostPython | None = None
        self._image_pythons: dict[str | None, str | None] = {}  # image -> its python3's X.Y (python="image")
        self._said_system_python = False

    def snapshots_possible(self, settings: Settings) -> bool:
        """Whether boxes of `settings` can be clones of a snapshot template (else each one boots)."""
        if settings.scope != "test" or not settings.snapshots or settings.volumes:
            return False
        if settings.image == "host" and not runs_host_python(settings):
            return False  # the host's root as it is, over virtiofs
        try:
            return select_engine(settings.engine, self._runtime().kernel.release).snapshots
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
        return dataclasses.replace(settings, python="image")

    def check_python(self, settings: Settings) -> None:
        """With python="image": PythonMismatch unless the image's python3 has the host's minor version (read
        from the image's files, not booted). The `host` image's python3 is the host's own."""
        if runs_host_python(settings) or settings.image == "host":
            return
        runtime = self._runtime()
        with self._lock:
            if settings.image not in self._image_pythons:
                try:
                    image = resolve_image(settings.image, runtime.home.root, runtime.progress)
                except BoxliteError:
                    return  # the image itself is the problem: each of its tests' boxes reports it
                self._image_pythons[settings.image] = image_python_version(image.base) if image.base else None
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
        runtime = self._runtime()
        with self._lock:
            if self._host_python is None:
                self._host_python = host_python(runtime.home.root, self._shared_dirs(), runtime.progress,
                                                 runtime.holds)
            return self._host_python

    def python(self, settings: Settings) -> str:
        """The command that starts the worker's python in the box."""
        return self.interpreter().executable if runs_host_python(settings) else "python3"

    def _shared_dirs(self) -> list[str]:
        """The directories with the host's packages that boxes mount at their own paths, besides the project:
        the site directories, and for python="host" the venv (its pyvenv.cfg and bin/)."""
        return [p for p in dict.fromkeys([*site_directories(), *interpreter_dirs()[1:]]) if p != self.rootpath]

    def box_options(self, settings: Settings, images: bool = False) -> BoxOptions:
        """The box for `settings`: the project at its own path (copy-on-write), the host's packages read-only,
        and with python="host" the host's interpreter (always as images: see vmm/hostpython.py).

        `images`: as ext4 image files of those directories (for snapshot templates) instead of virtiofs shares.
        """
        interpreter: tuple[Volume, ...] = ()
        if runs_host_python(settings):
            interpreter = tuple(Volume.parse(v) for v in self.interpreter().volumes)
            sites = [p for p in self._shared_dirs()
                     if not any(p == v.guest or _inside(p, v.guest) for v in interpreter)]
        else:
            sites = [p for p in site_directories() if p != self.rootpath]
        volumes = self._images(sites) if images else self._shares(sites)
        volumes += interpreter
        volumes.sort(key=lambda v: v.guest.count("/"))  # a parent is mounted before what is mounted inside it
        # The `host` image, for the plugin: the default image's root with the host's interpreter in it, so that
        # its boxes restore from snapshots like any other (the runtime's own `host` image is a virtiofs view of
        # the host's root, which a snapshot cannot hold; docs/images.md).
        carried = settings.image == "host" and runs_host_python(settings)
        options = BoxOptions(image=None if carried else settings.image, engine=settings.engine,
                             cpus=settings.cpus, memory_mib=settings.memory_mib, env=dict(settings.env),
                             network=settings.network, host_ports=settings.host_ports,
                             volumes=(*volumes, *map(Volume.parse, settings.volumes)), auto_remove=not self.keep,
                             snapshots=settings.snapshots)
        return options.validated()

    def _shares(self, sites: list[str]) -> list[Volume]:
        """The project and the host's packages as virtiofs shares at their own paths."""
        volumes = [Volume(self.rootpath, self.rootpath, "cow")]
        return volumes + [Volume(p, p, "ro") for p in sites if not _inside(p, self.rootpath)]  # else in the project

    def _images(self, sites: list[str]) -> list[Volume]:
        """The project and the host's packages as ext4 image files (built once per content, cached in the
        runtime home), mounted at their own paths."""
        runtime = self._runtime()
        home = runtime.home.root

        def image(path: str, project: bool) -> str:
            # Left out: what changes on every run (pytest's cache), what is mounted separately (packages inside
            # it, such as a .venv), a runtime home inside it; and git's objects, but the project's.
            exclude = [".pytest_cache", *(p for p in (*sites, str(home.resolve())) if _inside(p, path))]
            if not project:
                exclude.append(".git")
            else:  # coverage's data files: new on every run with --cov (the template would be too)
                exclude += [n for n in os.listdir(path) if n == ".coverage" or n.startswith(".coverage.")]
            return str(directory_image(path, home, exclude, runtime.progress, holds=runtime.holds))

        return [Volume(image(self.rootpath, True), self.rootpath, "cow"),
                *(Volume(image(p, False), p, "ro") for p in sites)]
