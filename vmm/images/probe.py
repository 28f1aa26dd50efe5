"""What an image holds, read from its ext4 base on the host (debugfs, read-only) instead of booting it."""

from __future__ import annotations

import posixpath
import re
import subprocess
from pathlib import Path

from vmm import process
from vmm.errors import ImageError

# Where `python3` is found on an image's default PATH, first match first.
PYTHON3 = ("/usr/local/bin/python3", "/usr/bin/python3", "/bin/python3")
_VERSIONED = re.compile(r"python(3\.\d+)$")
_MAX_LINKS = 8


def _debugfs(base: Path, requests: list[str]) -> dict[str, str]:
    """request -> its output, for debugfs requests run on `base` in one process."""
    found = process.which("debugfs")
    if not found:
        raise ImageError("debugfs was not found (it reads images without booting them): "
                         "install it with `apt-get install e2fsprogs`")
    run = subprocess.run([found, "-f", "-", str(base)], input="\n".join(requests) + "\n",
                         capture_output=True, text=True, timeout=60)
    answers: dict[str, str] = {}
    current = None
    for line in run.stdout.splitlines():
        if line.startswith("debugfs: "):
            current = line.removeprefix("debugfs: ")
            answers[current] = ""
        elif current is not None:
            answers[current] += line + "\n"
    return answers


def _link_target(stat_output: str) -> str | None:
    match = re.search(r'Fast link dest: "(.*)"', stat_output)
    return match.group(1) if match else None


def python_version(base: Path) -> str | None:
    """The "X.Y" of the image's `python3` (the first one on the default PATH), or None if it has none.

    Follows symlinks (python3 -> python3.11); for a python3 that is a file itself, the version is that of
    the one python3.Y directory in the lib directory beside its bin directory.
    """
    for path in PYTHON3:
        for _ in range(_MAX_LINKS):
            answer = _debugfs(base, [f"stat {path}"]).get(f"stat {path}", "")
            if "Type: symlink" in answer:
                target = _link_target(answer)
                if target is None:
                    break
                path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
                continue
            if "Type: regular" not in answer:
                break
            match = _VERSIONED.search(path)
            if match:
                return match.group(1)
            lib = posixpath.join(posixpath.dirname(posixpath.dirname(path)), "lib")
            listing = _debugfs(base, [f"ls -p {lib}"]).get(f"ls -p {lib}", "")
            versions = {m.group(1) for m in re.finditer(r"/040\d+/\d+/\d+/python(3\.\d+)/", listing)}
            return versions.pop() if len(versions) == 1 else None
    return None


__all__ = ["python_version"]
