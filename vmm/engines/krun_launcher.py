"""The process that becomes a libkrun VM: `python -m vmm.engines.krun_launcher CONFIG_FD STATUS_FD`.

krun_start_enter() never returns on success: libkrun takes the process over and exit()s with the VM. So
each VM gets this fresh interpreter (never a fork of a threaded pytest). It reads its plan, a JSON list of
libkrun calls, from CONFIG_FD, makes them in order, and reports on STATUS_FD, one JSON line each:
`{"starting": true}` just before krun_start_enter, `{"error": ..., "call": ..., "errno": ...}` if a call
fails (then it exits with EXIT_CONFIG). The parent sees EOF on STATUS_FD when this process ends.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

EXIT_CONFIG = 3  # a libkrun call failed before the VM started


def _report(status_fd: int, message: dict[str, Any]) -> None:
    os.write(status_fd, (json.dumps(message) + "\n").encode())


def run(plan: dict[str, Any], status_fd: int) -> int:
    # Imported here so that a broken install is reported on STATUS_FD like any other failure.
    from ..errors import BoxliteError, LibkrunError
    from . import libkrun_ffi

    ctx: int | None = None
    lib = None
    try:
        lib = libkrun_ffi.load()
        for name, *args in plan["calls"]:
            if name == "krun_start_enter":
                _report(status_fd, {"starting": True})
            result = lib.call(name, *args) if name in libkrun_ffi.GLOBAL_CALLS else lib.call(name, ctx, *args)
            if name == "krun_create_ctx":
                ctx = result
        # krun_start_enter returned: libkrun refused the configuration (it only returns on error).
        raise LibkrunError("krun_start_enter", 22, "it returned instead of running the VM")
    except LibkrunError as exc:
        failure: dict[str, Any] = {"error": str(exc), "call": exc.call, "errno": exc.errno}
    except BoxliteError as exc:
        failure = {"error": str(exc)}
    # Free before reporting: the parent kills this process as soon as it reads the report.
    if lib is not None and ctx is not None and lib.has("krun_free_ctx"):
        lib.lib.krun_free_ctx(ctx)
    _report(status_fd, failure)
    return EXIT_CONFIG


def main(argv: list[str]) -> int:
    config_fd, status_fd = int(argv[1]), int(argv[2])
    with os.fdopen(config_fd, "rb") as config:
        plan = json.loads(config.read())
    return run(plan, status_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
