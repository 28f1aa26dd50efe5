"""Images: turn what the user wrote (`image=`) into a read-only ext4 base every box can share.

Supported now: the embedded default image (`None` / "default") and root filesystem directories
(`dir:PATH`). OCI references, layouts and archives come with the images issue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmm.errors import ImageError
from vmm.images.ext4 import build_ext4_base, is_valid_base
from vmm.images.rootfs import DIR_PREFIX, fingerprint, parse_dir_spec, validate_rootfs

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_FORMS",
    "ImageConfig",
    "ImageError",
    "ResolvedImage",
    "base_path",
    "resolve_image",
]

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUPPORTED_FORMS = (
    "'default' (or no image): a Debian root filesystem with python3, built from the host's apt sources",
    "'dir:/path/to/rootfs': an unpacked root filesystem directory",
)


@dataclass(frozen=True)
class ImageConfig:
    """Defaults a box takes from its image (an OCI image config will feed the same fields)."""

    env: tuple[str, ...] = (DEFAULT_PATH,)
    working_dir: str = "/"
    user: str = "root"
    cmd: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResolvedImage:
    ref: str  # what the user wrote, normalised ("default", "dir:/abs/path")
    digest: str  # "sha256:..." identity of the content (for dir: a fingerprint of the tree)
    base: Path  # the ext4 base file, read-only, shared by all boxes
    config: ImageConfig


DEFAULT_CONFIG = ImageConfig(env=(DEFAULT_PATH, "LANG=C.UTF-8"))


def base_path(home: Path, digest: str) -> Path:
    """Where the ext4 base of the image with this digest is cached."""
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64:
        raise ImageError(f"invalid image digest {digest!r} (expected sha256:<64 hex digits>)")
    return Path(home) / "images" / "bases" / f"{hexdigest}.ext4"


def resolve_image(
    spec: str | None, home: Path, progress: Callable[[str], None] | None = None
) -> ResolvedImage:
    """Resolve an image spec to a ready ext4 base, building the image and its base if needed."""
    home = Path(home)
    text = (spec or "").strip()
    if text in ("", "default"):
        from vmm.images.default import ensure_default_image

        image = ensure_default_image(home, progress)
        ref, digest, rootfs, config = "default", image.digest, image.rootfs, DEFAULT_CONFIG
    elif text.startswith(DIR_PREFIX):
        rootfs = validate_rootfs(parse_dir_spec(text))
        ref, digest, config = f"{DIR_PREFIX}{rootfs}", fingerprint(rootfs), ImageConfig()
    else:
        raise ImageError(
            f"image {text!r}: this kind of image is not supported yet (OCI references, oci: layouts and "
            "docker-archive: tars come with the images issue). Supported now:\n  "
            + "\n  ".join(SUPPORTED_FORMS)
        )
    base = base_path(home, digest)
    if not is_valid_base(base):
        build_ext4_base(rootfs, base, progress)
    log.debug("image %s -> %s (%s)", ref, base, digest)
    return ResolvedImage(ref=ref, digest=digest, base=base, config=config)
