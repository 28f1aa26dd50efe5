"""The guest agent binary (PID 1 of every box): `$BOXLITE_AGENT`, else the one the wheel ships, else (a source
checkout) compiled from guest/agent.c into the runtime home ($BOXLITE_HOME, else the default one).

Nothing is written beside the package: an installed package's directory may be read-only or shared.
A checkout's build is named by a digest of its source and compiler command, so a changed agent.c is a new
binary, and the boot files and snapshots keyed on it are rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from filelock import FileLock

from . import agent_build
from .errors import EngineUnavailable
from .home import default_home

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).resolve().parent / "bin" / "boxlite-agent"  # put there by setup.py's build_py
SOURCE = Path(__file__).resolve().parent.parent / "guest" / "agent.c"  # a source checkout (editable install)


def binary(home: Path | None = None) -> Path:
    """The agent to boot: `$BOXLITE_AGENT`, the packaged one, or a checkout's, built as needed into the runtime
    home `home` (default: the one `$BOXLITE_HOME` names)."""
    if os.environ.get("BOXLITE_AGENT"):
        return Path(os.environ["BOXLITE_AGENT"])
    if PACKAGED.is_file():
        return PACKAGED
    if SOURCE.is_file():
        return compiled(SOURCE, (home or default_home()).expanduser().resolve() / "agent")
    raise EngineUnavailable(
        f"pytest-boxlite's guest agent is missing: neither {PACKAGED} (installed from a wheel) nor {SOURCE} "
        "(a source checkout) exists. Reinstall pytest-boxlite (`pip install --force-reinstall pytest-boxlite`), "
        "or set BOXLITE_AGENT to an agent binary"
    )


def compiled(source: Path, directory: Path) -> Path:
    """`source` compiled into `directory`, once: the binary is named by a digest of the source and the compiler
    command, so an edited agent.c is compiled again (hashing ~60 KB per call costs well under a millisecond)."""
    out = directory / f"boxlite-agent-{agent_build.build_key(source, strict=True)[:16]}"
    if out.is_file():
        return out
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".build.lock")):
        if not out.is_file():
            log.info("compiling the guest agent %s into %s", source, out)
            try:
                agent_build.compile_agent(source, out, strict=True)
            except agent_build.AgentBuildError as exc:
                raise EngineUnavailable(str(exc)) from None
    return out


@functools.lru_cache(maxsize=8)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(path: Path) -> str:
    """The agent's content digest, for cache keys: a reinstalled but identical agent (new mtime) keeps the boot
    files and snapshots made with it."""
    st = path.stat()
    return _digest(path, st.st_size, st.st_mtime_ns)
