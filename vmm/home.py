"""Where the runtime keeps its state: images, kernels (initramfs), boxes, snapshot templates."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """`$BOXLITE_HOME`, else `$XDG_CACHE_HOME/pytest-boxlite`, else `~/.cache/pytest-boxlite`."""
    if os.environ.get("BOXLITE_HOME"):
        return Path(os.environ["BOXLITE_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pytest-boxlite"


class Home:
    """The layout of one runtime home; several processes may share it."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_home()
        self.root = self.root.expanduser().resolve()
        for sub in (self.images, self.kernels, self.boxes, self.templates):
            sub.mkdir(parents=True, exist_ok=True)

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def boxes(self) -> Path:
        return self.root / "boxes"

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    def box_dir(self, box_id: str) -> Path:
        return self.boxes / box_id
