"""Run at start-up by every python in a box, the tests' subprocesses too (its directory is first on
PYTHONPATH there): the host's site directories are processed as site directories, as on the host, so that
their .pth files work (editable installs, coverage's measurement of subprocesses); then the sitecustomize
module this one hides, if there is one."""

import importlib.machinery
import importlib.util
import os
import site
import sys


def _main() -> None:
    native = set(site.getsitepackages())  # the interpreter's own: processed already
    for path in os.environ.get("PYTEST_BOXLITE_SITEDIRS", "").split(os.pathsep):
        if path and path not in native:
            site.addsitedir(path)
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_main()
