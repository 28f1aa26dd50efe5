"""Getting OCI images into the cache: pull from a registry or import a local layout/archive,
unpack the layers and build one ext4 base per image id, then record the reference in the index.

Every step is safe to run from several processes at once: blobs are fetched under a per-blob
lock (one download), the base is built under a per-image lock (one unpack), and the index is
written last, so an interrupted pull is simply resumed by the next one.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from vmm.images import layers as layer_mod
from vmm.images.ext4 import build_ext4_base, is_valid_base
from vmm.images.local import open_local
from vmm.images.model import ImageConfig, ResolvedImage, base_path
from vmm.images.oci import Descriptor, LoadedImage, Source, load_image
from vmm.images.reference import LocalRef, RegistryRef
from vmm.images.registry import RegistryClient
from vmm.images.store import BlobStore, ImageIndex, IndexEntry

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: (layer short digest, bytes done, bytes total) while a blob downloads
ByteProgress = Callable[[str, int, int], None]


class RegistrySource:
    """Manifests from the registry; blobs through the store (downloaded once, verified)."""

    def __init__(self, ref: RegistryRef, store: BlobStore, client: RegistryClient,
                 progress: Progress | None = None, on_bytes: ByteProgress | None = None) -> None:
        self.ref = ref
        self.store = store
        self.client = client
        self.progress = progress
        self.on_bytes = on_bytes
        self._kept: list[str] = []

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        body, media, digest = self.client.manifest(self.ref.repository, reference, str(self.ref))
        self.store.import_bytes(body, digest, str(self.ref))
        self._kept.append(digest)
        return body, media, digest

    def blob(self, desc: Descriptor) -> Path:
        self._kept.append(desc.digest)
        path = self.store.path(desc.digest)
        if path.is_file():
            return path
        with self.store.lock(desc.digest):
            if path.is_file():  # another process fetched it while we waited
                log.debug("blob %s arrived while waiting for its lock", desc.digest)
                return path
            writer = self.store.writer(desc.digest, desc.size)
            try:
                if self.progress:
                    resumed = f" (resuming at {writer.offset} bytes)" if writer.offset else ""
                    self.progress(f"pulling {desc.short} ({desc.size} bytes){resumed}")
                on_bytes = self.on_bytes
                bytes_cb = (lambda done, total: on_bytes(desc.short, done, total)) if on_bytes else None
                self.client.fetch_blob(self.ref.repository, desc.digest, writer, f"blob {desc.short} of {self.ref}",
                                       bytes_cb)
                return writer.commit(f"{self.ref}")
            finally:
                writer.close()

    def kept_blobs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self._kept))


# ---------------------------------------------------------------- the ext4 base of an image


def ensure_base(home: Path, store: BlobStore, image: LoadedImage, source: Source,
                progress: Progress | None = None) -> Path:
    """Fetch the image's layers, unpack them into a temporary tree and build its base, once per image id."""
    base = base_path(home, image.image_id)
    if is_valid_base(base):
        return base
    with store.lock(image.image_id):
        if is_valid_base(base):
            return base
        tmp_parent = Path(home) / "images" / "tmp"
        tmp_parent.mkdir(parents=True, exist_ok=True)
        prefix = f".unpack-{image.image_id.split(':')[1][:16]}-"
        for stale in tmp_parent.glob(prefix + "*"):  # we hold the image's lock: nobody works there
            log.info("removing %s left by an interrupted unpack", stale)
            force_rmtree(stale)
        blobs = [(source.blob(layer), f"{layer.short} of {image.what}") for layer in image.layers]
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_parent))
        try:
            rootfs = work / "rootfs"
            rootfs.mkdir()
            started = time.monotonic()
            if progress:
                progress(f"unpacking {len(image.layers)} layers")
            layer_mod.unpack(blobs, rootfs)
            log.info("unpacked %d layers of %s in %.2f s", len(image.layers), image.image_id,
                     time.monotonic() - started)
            build_ext4_base(rootfs, base, progress)
        finally:
            force_rmtree(work)
    return base


def force_rmtree(path: Path) -> None:
    """rmtree that also removes read-only directories (images have them: 0555 /proc mount points)."""
    def onerror(func: Callable[[str], object], failed: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            func(failed)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


# ---------------------------------------------------------------- entry points


def _record(home: Path, ref: str, image: LoadedImage) -> IndexEntry:
    now = time.time()
    entry = IndexEntry(ref=ref, digest=image.manifest_digest, image_id=image.image_id,
                       config=asdict(image.config), blobs=list(image.blobs), pulled=now, last_used=now)
    ImageIndex(Path(home) / "images").put(entry)
    return entry


def pull(ref: RegistryRef, home: Path, *, insecure: Iterable[str] | str | None = None,
         progress: Progress | None = None, on_bytes: ByteProgress | None = None) -> IndexEntry:
    """Fetch the image from its registry (what is cached is not fetched again) and build its base."""
    store = BlobStore(Path(home) / "images")
    client = RegistryClient(ref.api_host, insecure=insecure, ref_host=ref.registry)
    source = RegistrySource(ref, store, client, progress, on_bytes)
    image = load_image(source, ref.reference, str(ref))
    ensure_base(home, store, image, source, progress)
    return _record(home, str(ref), image)


def import_local(ref: LocalRef, home: Path, progress: Progress | None = None) -> IndexEntry:
    """An `oci:` layout or `docker-archive:` tar: read (and verify) it, build its base."""
    store = BlobStore(Path(home) / "images")
    source, files = open_local(ref, store)
    try:
        image = load_image(source, "", str(ref))
        ensure_base(home, store, image, source, progress)
    finally:
        close = getattr(files, "close", None)
        if close:
            close()
    return _record(home, str(ref), image)


def resolved(home: Path, entry: IndexEntry) -> ResolvedImage:
    return ResolvedImage(ref=entry.ref, digest=entry.image_id, base=base_path(home, entry.image_id),
                         config=ImageConfig.from_dict(entry.config))


def resolve_oci(ref: RegistryRef | LocalRef, home: Path, progress: Progress | None = None,
                insecure: Iterable[str] | str | None = None) -> ResolvedImage:
    """A registry reference is pulled only when the cache does not have it (like `docker run`):
    `boxlite images pull` refreshes a tag. Local layouts/archives are re-read (cheap), so edits show."""
    index = ImageIndex(Path(home) / "images")
    if isinstance(ref, RegistryRef):
        entry = index.get(str(ref))
        if entry and is_valid_base(base_path(home, entry.image_id)):
            index.touch(entry)
            return resolved(home, entry)
        entry = pull(ref, home, insecure=insecure, progress=progress)
    else:
        entry = import_local(ref, home, progress)
    return resolved(home, entry)


# exported for the typing of callers building their own sources
__all__ = ["ByteProgress", "Progress", "RegistrySource", "Source", "ensure_base", "import_local", "pull",
           "force_rmtree", "resolve_oci", "resolved"]
