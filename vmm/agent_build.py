"""How the guest agent (guest/agent.c) is compiled: the one place for its compiler command.

Standard library only: setup.py loads this file by path to compile the agent into the wheel (the build
environment has none of the runtime's dependencies), and vmm.agent uses it to build a checkout's agent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

# PID 1 of every box: static (the guest has no C library before the image's root is mounted) and small.
CFLAGS = ("-std=gnu11", "-Os", "-Wall", "-Wextra")
LDFLAGS = ("-static", "-s")
INSTALL_HINT = "sudo apt-get install gcc libc6-dev"


class AgentBuildError(Exception):
    """The agent could not be compiled; the message says what to install or fix."""


def compiler() -> str:
    """`$CC`, else `cc`."""
    return os.environ.get("CC") or "cc"


def command(source: Path, output: Path, strict: bool = False) -> list[str]:
    """The compiler command; `strict` makes warnings errors (checkouts: a new warning is a bug to fix there,
    not a reason for a user's install to fail)."""
    return [compiler(), *CFLAGS, *(("-Werror",) if strict else ()), *LDFLAGS, "-o", str(output), str(source)]


def build_key(source: Path, strict: bool = False) -> str:
    """A digest of what the binary is made from: the source and the command (not the paths)."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update("\0".join(command(Path("agent.c"), Path("out"), strict)).encode())
    return digest.hexdigest()


def compile_agent(source: Path, output: Path, strict: bool = False) -> None:
    """Compile `source` into `output`, atomically (a half-written binary never has the final name)."""
    cc = compiler()
    if shutil.which(cc) is None:
        raise AgentBuildError(
            f"the C compiler `{cc}` is missing, and the guest agent ({source}) is compiled from source: "
            f"install it with `{INSTALL_HINT}` (static linking needs libc6-dev), or set CC"
        )
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        done = subprocess.run(command(source, tmp, strict), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AgentBuildError(
                f"compiling the guest agent {source} failed (`{' '.join(command(source, output, strict))}`); "
                f"static linking needs libc6-dev (`{INSTALL_HINT}`):\n{done.stderr[-2000:]}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
