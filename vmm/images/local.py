"""Local image sources: OCI layout directories (`oci:PATH[:TAG]`) and archives
(`docker-archive:PATH`: a `docker save` tar, or an OCI layout packed in a tar).

Blobs of a layout directory are verified and used in place; blobs inside an archive are copied
into the blob store (verified while copying), since the unpacker reads files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from pathlib import Path
from typing import IO, Any

from vmm.errors import DigestMismatch, ImageError, ImageNotFound
from vmm.images.oci import Descriptor
from vmm.images.reference import LocalRef
from vmm.images.store import BlobStore, file_digest, split_digest

log = logging.getLogger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"


def _pick(index: dict[str, Any], tag: str | None, what: str) -> dict[str, Any] | None:
    """The index.json entry for `tag`; without a tag the only entry. None: treat index.json itself
    as a multi-platform index (several untagged platform entries)."""
    entries: list[dict[str, Any]] = index.get("manifests") or []
    if tag:
        for entry in entries:
            name = (entry.get("annotations") or {}).get(REF_NAME, "")
            if name == tag or name.endswith(f":{tag}"):
                return entry
        tags = sorted({(e.get("annotations") or {}).get(REF_NAME, "") for e in entries} - {""})
        raise ImageNotFound(f"{what}: no image tagged {tag!r} in the layout (tags: {', '.join(tags) or 'none'})")
    if len(entries) == 1:
        return entries[0]
    if entries and all(e.get("platform") for e in entries):
        return None
    tags = sorted({(e.get("annotations") or {}).get(REF_NAME, "") for e in entries} - {""})
    if not entries:
        raise ImageNotFound(f"{what}: the layout's index.json lists no image")
    raise ImageError(f"{what}: the layout holds {len(entries)} images; name one with oci:PATH:TAG "
                     f"(tags: {', '.join(tags) or 'none'})")


class _Files:
    """Read access to a layout's files, in a directory or inside a tar."""

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def blob(self, desc: Descriptor, what: str) -> Path:
        raise NotImplementedError

    @property
    def kept(self) -> tuple[str, ...]:
        """The blobs this source put in the store (a layout directory's stay where they are)."""
        return ()


class _DirFiles(_Files):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: set[str] = set()

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def blob(self, desc: Descriptor, what: str) -> Path:
        path = self.root / "blobs" / "sha256" / split_digest(desc.digest)
        if desc.digest in self._verified:
            return path
        if not path.is_file():
            raise ImageNotFound(f"{what}: blob {desc.digest} is missing from the layout ({path})")
        actual = file_digest(path)
        if actual != desc.digest or (desc.size >= 0 and path.stat().st_size != desc.size):
            raise DigestMismatch(f"{what}: {path} hashes to {actual}, not {desc.digest} (or has the wrong size); "
                                 "the layout is corrupt: rebuild or copy it again")
        self._verified.add(desc.digest)
        return path


class _TarFiles(_Files):
    def __init__(self, path: Path, store: BlobStore) -> None:
        self.path = path
        self.store = store
        try:
            self.tar = tarfile.open(path)
        except (OSError, tarfile.TarError) as e:
            raise ImageError(f"docker-archive:{path}: cannot read the archive ({e})") from None
        self.members = {m.name.removeprefix("./"): m
                        for m in self.tar.getmembers() if m.isfile()}
        self.kept_list: list[str] = []

    def close(self) -> None:
        self.tar.close()

    def has(self, rel: str) -> bool:
        return rel in self.members

    def _open(self, rel: str, what: str) -> IO[bytes]:
        member = self.members.get(rel)
        stream = self.tar.extractfile(member) if member else None
        if stream is None:
            raise ImageNotFound(f"{what}: {rel} is missing from the archive {self.path}")
        return stream

    def read(self, rel: str) -> bytes:
        with self._open(rel, f"docker-archive:{self.path}") as f:
            return f.read()

    def import_member(self, rel: str, what: str, digest: str | None = None, size: int | None = None) -> str:
        with self._open(rel, what) as f:
            digest = self.store.import_stream(f, what, digest, size)
        self.kept_list.append(digest)
        return digest

    def blob(self, desc: Descriptor, what: str) -> Path:
        self.import_member(f"blobs/sha256/{split_digest(desc.digest)}", what, desc.digest,
                           desc.size if desc.size >= 0 else None)
        return self.store.path(desc.digest)

    @property
    def kept(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.kept_list))


class LayoutSource:
    """An OCI image layout, in a directory or a tar."""

    def __init__(self, files: _Files, tag: str | None, what: str) -> None:
        self.files = files
        self.tag = tag
        self.what = what
        self._media: dict[str, str] = {}
        self._sizes: dict[str, int] = {}

    def _blob_bytes(self, digest: str, size: int) -> bytes:
        return self.files.blob(Descriptor("", digest, size), self.what).read_bytes()

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        if reference.startswith("sha256:"):
            size = self._sizes.get(reference, -1)
            return self._blob_bytes(reference, size), self._media.get(reference, ""), reference
        try:
            index_bytes = self.files.read("index.json")
            index = json.loads(index_bytes)
        except (OSError, ValueError) as e:
            raise ImageError(f"{self.what}: no readable index.json ({e}); is this an OCI image layout?") from None
        self._sizes = {str(m.get("digest")): int(m.get("size", 0)) for m in index.get("manifests") or []}
        for m in index.get("manifests") or []:
            self._media[str(m.get("digest"))] = str(m.get("mediaType", ""))
        entry = _pick(index, self.tag, self.what)
        if entry is None:
            return index_bytes, "application/vnd.oci.image.index.v1+json", "sha256:" + hashlib.sha256(
                index_bytes).hexdigest()
        digest = str(entry.get("digest"))
        return self._blob_bytes(digest, int(entry.get("size", 0))), str(entry.get("mediaType", "")), digest

    def blob(self, desc: Descriptor) -> Path:
        return self.files.blob(desc, self.what)

    def kept_blobs(self) -> tuple[str, ...]:
        return self.files.kept


class DockerSaveSource:
    """A `docker save` tar (manifest.json + config + layer tars), presented as a v2 manifest."""

    def __init__(self, files: _TarFiles, what: str) -> None:
        self.files = files
        self.what = what

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        try:
            entries = json.loads(self.files.read("manifest.json"))
            entry = entries[0]
            config_rel, layer_rels = entry["Config"], list(entry["Layers"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ImageError(f"{self.what}: manifest.json is not a docker save manifest ({e})") from None
        if len(entries) > 1:
            log.warning("%s holds %d images; using the first (%s)", self.what, len(entries),
                        ", ".join(entry.get("RepoTags") or []) or "untagged")
        config = self._descriptor(config_rel, DOCKER_CONFIG)
        layers = [self._descriptor(rel, DOCKER_LAYER) for rel in layer_rels]
        manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config, "layers": layers}
        body = json.dumps(manifest, sort_keys=True).encode()
        return body, DOCKER_MANIFEST, "sha256:" + hashlib.sha256(body).hexdigest()

    def _descriptor(self, rel: str, media: str) -> dict[str, Any]:
        # newer docker names blobs by digest (blobs/sha256/<hex>): then the name is checked too
        expected = "sha256:" + rel.rsplit("/", 1)[1] if rel.startswith("blobs/sha256/") else None
        digest = self.files.import_member(rel, self.what, expected)
        return {"mediaType": media, "digest": digest, "size": self.files.store.path(digest).stat().st_size}

    def blob(self, desc: Descriptor) -> Path:
        return self.files.store.path(desc.digest)

    def kept_blobs(self) -> tuple[str, ...]:
        return self.files.kept


def open_local(ref: LocalRef, store: BlobStore) -> tuple[LayoutSource | DockerSaveSource, _Files]:
    """The source for a local reference (close `files` when done if it is an archive)."""
    path = Path(ref.path)
    what = str(ref)
    if ref.kind == "oci":
        if not path.is_dir():
            raise ImageNotFound(f"{what}: {path} is not a directory; oci: takes an OCI image layout directory "
                                "(with oci-layout and index.json); for a tar use docker-archive:")
        if not (path / "oci-layout").is_file():
            raise ImageError(f"{what}: {path} has no oci-layout file; it is not an OCI image layout")
        return LayoutSource(_DirFiles(path), ref.tag, what), _Files()
    if not path.is_file():
        raise ImageNotFound(f"{what}: {path} is not a file; docker-archive: takes a tar from `docker save` or "
                            "`skopeo copy ... docker-archive:FILE`")
    files = _TarFiles(path, store)
    if files.has("manifest.json"):
        return DockerSaveSource(files, what), files
    if files.has("index.json"):
        return LayoutSource(files, ref.tag, what), files
    files.close()
    raise ImageError(f"{what}: the archive has neither manifest.json (docker save) nor index.json (OCI layout)")
