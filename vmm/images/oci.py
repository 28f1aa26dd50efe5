"""OCI / Docker v2 image documents: indexes and manifest lists, manifests, image configs.

`load_image(source, reference)` walks index -> manifest (linux/amd64) -> config + layers for any
`Source` (a registry, an OCI layout, an archive), and returns the verified blob files to unpack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmm.errors import ImageError, PlatformNotFound, UnsupportedImage
from vmm.images.model import DEFAULT_PATH, ImageConfig
from vmm.images.store import split_digest

#: The runtime boots x86_64 guests (qemu-system-x86_64): that is the only platform it can run.
PLATFORM_OS = "linux"
PLATFORM_ARCH = "amd64"

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_SCHEMA1_TYPES = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.digest.split(":", 1)[1][:12]


@dataclass(frozen=True)
class Manifest:
    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class LoadedImage:
    """An image's documents, read and verified; its layers are fetched only if its base must be built
    (an image id already built, under another name or tag, costs no layer download at all)."""

    what: str
    manifest_digest: str
    image_id: str  # the config digest: names the ext4 base
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    blobs: tuple[str, ...]  # manifest, config and layer digests (kept in the store while the image is)


class Source(Protocol):
    """Where image documents and blobs come from."""

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type or "", digest) of the index or manifest named by a tag or digest."""

    def blob(self, desc: Descriptor) -> Path:
        """A file with the blob's content, verified against its digest."""

    def kept_blobs(self) -> tuple[str, ...]:
        """Digests this source put into the blob store (to keep them until the image is removed)."""


def descriptor(raw: Any, what: str) -> Descriptor:
    try:
        digest = str(raw["digest"])
        split_digest(digest)
        return Descriptor(media_type=str(raw.get("mediaType", "")), digest=digest, size=int(raw["size"]),
                          platform=dict(raw.get("platform") or {}), annotations=dict(raw.get("annotations") or {}))
    except (KeyError, TypeError, ValueError, ImageError) as e:
        raise ImageError(f"{what}: malformed descriptor {raw!r} ({e})") from None


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ImageError(f"{what}: not a JSON document ({e})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return doc


def kind_of(doc: dict[str, Any], media: str) -> str:
    media = doc.get("mediaType") or media
    if media in _SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        return "schema1"
    if media in _INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        return "index"
    if media in _MANIFEST_TYPES or "layers" in doc:
        return "manifest"
    return "unknown"


def select_platform(doc: dict[str, Any], what: str) -> Descriptor:
    """The linux/amd64 entry of an index or manifest list (attestations are skipped)."""
    seen = []
    for raw in doc.get("manifests") or []:
        desc = descriptor(raw, what)
        plat = desc.platform
        seen.append(f"{plat.get('os', '?')}/{plat.get('architecture', '?')}")
        if plat.get("os") == PLATFORM_OS and plat.get("architecture") == PLATFORM_ARCH:
            return desc
    raise PlatformNotFound(
        f"{what} has no {PLATFORM_OS}/{PLATFORM_ARCH} variant (it has: {', '.join(seen) or 'none'}). Boxes are "
        f"x86_64 VMs: use an image published for {PLATFORM_OS}/{PLATFORM_ARCH}.")


def parse_manifest(body: bytes, digest: str, what: str) -> Manifest:
    doc = _json(body, what)
    layers = tuple(descriptor(d, what) for d in doc.get("layers") or [])
    if "config" not in doc:
        raise ImageError(f"{what}: manifest {digest} has no config")
    for layer in layers:
        if "foreign" in layer.media_type or "nondistributable" in layer.media_type:
            raise UnsupportedImage(f"{what}: layer {layer.digest} is a foreign (Windows) layer; use a Linux image")
    return Manifest(digest=digest, config=descriptor(doc["config"], what), layers=layers)


def image_config(doc: dict[str, Any], what: str) -> ImageConfig:
    """Box defaults from an image config, with Docker's defaults for what it leaves out."""
    arch = doc.get("architecture")
    if (doc.get("os") not in (None, PLATFORM_OS)) or arch not in (None, PLATFORM_ARCH):
        raise PlatformNotFound(f"{what} is built for {doc.get('os')}/{arch}; boxes are {PLATFORM_OS}/{PLATFORM_ARCH} "
                               "VMs. Use an image published for linux/amd64.")
    cfg = doc.get("config") or {}
    env = tuple(str(e) for e in cfg.get("Env") or ())
    if not any(e.startswith("PATH=") for e in env):
        env = (DEFAULT_PATH, *env)  # as Docker does: images relying on a default PATH still work
    return ImageConfig(
        env=env,
        working_dir=str(cfg.get("WorkingDir") or "/"),
        # an image without a User runs as uid 0, even without /etc/passwd (distroless, scratch)
        user=str(cfg.get("User") or "0"),
        cmd=tuple(str(c) for c in cfg.get("Cmd") or ()),
        entrypoint=tuple(str(c) for c in cfg.get("Entrypoint") or ()),
    )


def load_image(source: Source, reference: str, what: str) -> LoadedImage:
    """Index -> linux/amd64 manifest -> config and layers, every blob verified on disk."""
    body, media, digest = source.manifest(reference)
    for _ in range(3):  # an index may point at another index (nested OCI indexes)
        doc = _json(body, what)
        kind = kind_of(doc, media)
        if kind == "schema1":
            raise UnsupportedImage(f"{what} uses the Docker schema 1 manifest format, retired in 2019; "
                                   "push it again with a current tool")
        if kind != "index":
            break
        chosen = select_platform(doc, what)
        body, media, digest = source.manifest(chosen.digest)
    if kind != "manifest":
        raise UnsupportedImage(f"{what}: unsupported manifest type {doc.get('mediaType') or media or 'unknown'}")
    manifest = parse_manifest(body, digest, what)
    config_doc = _json(source.blob(manifest.config).read_bytes(), f"{what} config")
    config = image_config(config_doc, what)
    blobs = (*source.kept_blobs(), *(layer.digest for layer in manifest.layers))
    return LoadedImage(what=what, manifest_digest=digest, image_id=manifest.config.digest, config=config,
                       layers=manifest.layers, blobs=tuple(dict.fromkeys(blobs)))
