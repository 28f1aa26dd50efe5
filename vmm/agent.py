"""The guest agent binary, built from guest/agent.c by guest/Makefile (make rebuilds it when the source changes)."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

from filelock import FileLock

from .errors import EngineUnavailable

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent.parent / "guest"
BINARY = SOURCE_DIR / "build" / "boxlite-agent"


def binary() -> Path:
    """`$BOXLITE_AGENT` if set, else guest/build/boxlite-agent, built or rebuilt as needed (once a process)."""
    if os.environ.get("BOXLITE_AGENT"):
        return Path(os.environ["BOXLITE_AGENT"])
    return _built()


@functools.lru_cache(maxsize=1)
def _built() -> Path:
    if not (SOURCE_DIR / "agent.c").is_file():
        raise EngineUnavailable(f"the guest agent source {SOURCE_DIR / 'agent.c'} is missing: reinstall pytest-boxlite")
    for tool in ("make", os.environ.get("CC", "cc")):
        if shutil.which(tool) is None:
            raise EngineUnavailable(
                f"`{tool}` is missing, and the guest agent is built from source: "
                "install the build tools with `sudo apt-get install make gcc libc6-dev` (or run `make setup`)"
            )
    BINARY.parent.mkdir(exist_ok=True)
    with FileLock(str(BINARY.parent / ".build.lock")):
        done = subprocess.run(["make", "-s", "-C", str(SOURCE_DIR), "build/boxlite-agent"],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise EngineUnavailable(
            f"building the guest agent failed (static linking needs libc6-dev):\n{done.stderr[-2000:]}"
        )
    return BINARY
