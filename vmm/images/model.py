"""What a resolved image is: the shared ext4 base and the defaults a box takes from the image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmm.engines.base import ComposedTree
from vmm.errors import ImageError

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageConfig:
    """Defaults a box takes from its image (from the OCI image config for pulled images)."""

    env: tuple[str, ...] = (DEFAULT_PATH,)
    working_dir: str = "/"
    user: str = "root"
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageConfig:
        """From `dataclasses.asdict()` of one, read back from JSON (its lists are tuples again)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


@dataclass(frozen=True)
class ResolvedImage:
    ref: str  # what the user wrote, normalised ("default", "dir:/abs/path", "docker.io/library/x:tag")
    digest: str  # "sha256:..." identity of the content: the image id (config digest) for OCI images,
    #              a fingerprint of the tree for dir:
    base: Path | None  # the ext4 base file, read-only, shared by all boxes (None: `tree` is the root)
    config: ImageConfig
    tree: ComposedTree | None = None  # the `host` image: a view of the host's own root, shared read-only


def base_path(home: Path, digest: str) -> Path:
    """Where the ext4 base of the image with this digest is cached."""
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64:
        raise ImageError(f"invalid image digest {digest!r} (expected sha256:<64 hex digits>)")
    return Path(home) / "images" / "bases" / f"{hexdigest}.ext4"
