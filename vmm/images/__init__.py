"""Images: turn what the user wrote (`image=`) into a read-only ext4 base every box can share.

Forms: the embedded default image (`None` / "default"), root filesystem directories (`dir:PATH`),
registry references (`alpine`, `ghcr.io/org/img:tag`, `host:5000/x@sha256:...`), OCI layouts
(`oci:PATH[:TAG]`) and archives (`docker-archive:PATH`), and `host`: the host's own root, read-only,
limited to what a test needs (vmm/images/host.py), which has no base: it is shared over virtiofs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from vmm.errors import ImageError
from vmm.images.ext4 import build_ext4_base, is_valid_base
from vmm.images.model import DEFAULT_PATH, ImageConfig, ResolvedImage, base_path
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

SUPPORTED_FORMS = (
    "'default' (or no image): a Debian root filesystem with python3, built from the host's apt sources",
    "'dir:/path/to/rootfs': an unpacked root filesystem directory",
    "a registry reference: 'alpine', 'python:3.12-slim', 'ghcr.io/org/img:tag', 'host:5000/x@sha256:<hex>'",
    "'oci:/path/to/layout[:tag]': an OCI image layout directory",
    "'docker-archive:/path/to/image.tar': a `docker save` tar or an OCI layout in a tar",
    "'host': the host's own root, read-only (system directories and the running interpreter only)",
)

DEFAULT_CONFIG = ImageConfig(env=(DEFAULT_PATH, "LANG=C.UTF-8"))


def resolve_image(
    spec: str | None, home: Path, progress: Callable[[str], None] | None = None,
    insecure_registries: Iterable[str] | str | None = None,
) -> ResolvedImage:
    """Resolve an image spec to a ready ext4 base, pulling/building the image and its base if needed.

    `insecure_registries` (plus `$BOXLITE_INSECURE_REGISTRIES`) names registries that may be reached
    over plain http; loopback registries always may.
    """
    home = Path(home)
    text = (spec or "").strip()
    if text == "host":
        from vmm.images.host import resolve_host

        return resolve_host()
    if text in ("", "default"):
        from vmm.images.default import ensure_default_image

        image = ensure_default_image(home, progress)
        ref, digest, rootfs, config = "default", image.digest, image.rootfs, DEFAULT_CONFIG
    elif text.startswith(DIR_PREFIX):
        rootfs = validate_rootfs(parse_dir_spec(text))
        ref, digest, config = f"{DIR_PREFIX}{rootfs}", fingerprint(rootfs), ImageConfig()
    else:
        from vmm.images import reference
        from vmm.images.pull import resolve_oci

        parsed = reference.parse(text)  # malformed references fail here, before any work
        return resolve_oci(parsed, home, progress, insecure_registries)
    base = base_path(home, digest)
    if not is_valid_base(base):
        build_ext4_base(rootfs, base, progress)
    _record_local(home, ref, digest, config)
    log.debug("image %s -> %s (%s)", ref, base, digest)
    return ResolvedImage(ref=ref, digest=digest, base=base, config=config)


def _record_local(home: Path, ref: str, digest: str, config: ImageConfig) -> None:
    """List default and dir: bases in the index too, so `boxlite images ls/rm/prune` see them
    (and prune does not take a base in use for unreferenced)."""
    from vmm.images.store import ImageIndex, IndexEntry

    index = ImageIndex(home / "images")
    entry = index.get(ref)
    if entry and entry.image_id == digest:
        index.touch(entry)
        return
    now = time.time()
    index.put(IndexEntry(ref=ref, digest=digest, image_id=digest, config=asdict(config), pulled=now, last_used=now))
