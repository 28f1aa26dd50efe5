"""A box's state on disk, `<box directory>/box.json`: the one module that writes and reads it.

The state says what the box is (options, image), what became of it (status, engine) and, while it may be in
use, whose it is (the owner's pid): a runtime home may be shared by several processes, and the boxes a dead
process left are found and swept by the next runtime.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cache
from .engines.base import ComposedTree
from .images import ImageConfig, ResolvedImage
from .options import BoxOptions

log = logging.getLogger(__name__)

FILE = "box.json"
LIVE = ("created", "running")  # the statuses in which a box has an owner


@dataclass(frozen=True)
class BoxState:
    id: str
    options: BoxOptions
    image: ResolvedImage
    created: float  # seconds since the epoch
    status: str
    engine: str | None
    owner: int | None = None  # the pid whose box it is, while it may be in use (saved as this process's)


def exists(directory: Path) -> bool:
    """True if `directory` holds a box's state."""
    return (directory / FILE).exists()


def save(directory: Path, state: BoxState) -> None:
    """Write `state` atomically; the owner is this process while the box is created or running."""
    data = {
        "id": state.id,
        "options": state.options.to_dict(),
        "image": dataclasses.asdict(state.image),
        "created": state.created,
        "status": state.status,
        "engine": state.engine,
        "owner": os.getpid() if state.status in LIVE else None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp")
    tmp.write_text(json.dumps(data, default=str, indent=1))
    os.replace(tmp, directory / FILE)


def load(directory: Path) -> BoxState:
    """The state in `directory`; a box its dead owner left running is stopped. OSError, ValueError, KeyError or
    TypeError if it is missing or unreadable."""
    data = _read(directory)
    image: dict[str, Any] = dict(data["image"])
    config: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in image["config"].items()}
    image["config"] = ImageConfig(**config)
    image["base"] = Path(image["base"]) if image.get("base") is not None else None
    if image.get("tree") is not None:  # JSON has lists where the tree has tuples
        tree: dict[str, Any] = {k: tuple(tuple(i) if isinstance(i, list) else i for i in v)
                                for k, v in image["tree"].items()}
        image["tree"] = ComposedTree(**tree)
    status, owner = data["status"], data.get("owner")
    if status == "running" and not _alive(owner):
        status = "stopped"
    return BoxState(data["id"], BoxOptions.from_dict(data["options"]), ResolvedImage(**image), data["created"],
                    status, data.get("engine"), owner)


def sweep(boxes: Path) -> None:
    """Remove ephemeral boxes whose process died without cleaning up (SIGKILL, power loss), and box
    directories that never got their state file (their process died creating them)."""
    for path in boxes.iterdir():
        try:
            data = _read(path)
        except (OSError, ValueError):
            if not exists(path) and time.time() - path.stat().st_mtime > cache.ORPHAN_AGE_S:
                log.debug("removing box directory %s without state", path.name)
                shutil.rmtree(path, ignore_errors=True)
            continue
        owner, options = data.get("owner"), data.get("options", {})
        if owner and not _alive(owner) and options.get("auto_remove") and not options.get("disk_size_gb"):
            log.debug("removing box %s left by dead process %s", path.name, owner)
            shutil.rmtree(path, ignore_errors=True)


def _read(directory: Path) -> dict[str, Any]:
    data = json.loads((directory / FILE).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{directory / FILE} is not a mapping")
    return data


def _alive(pid: object) -> bool:
    return isinstance(pid, int) and pid > 0 and cache.owner_pid_alive(pid)
