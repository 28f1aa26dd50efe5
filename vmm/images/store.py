"""The image cache under the runtime home: content-addressed blobs, the index of pulled references,
and garbage collection.

    images/blobs/sha256/<hex>     verified blobs (manifests, configs, layers), read-only
    images/blobs/partial/<hex>    a download in progress or interrupted (resumed by the next pull)
    images/locks/<hex>.lock       one lock per blob / image: concurrent processes fetch each once
    images/bases/<hex>.ext4       one ext4 base per image id (see ext4.py)
    images/index.json             references -> digests, image config, last-used times

A blob only appears under its digest after its content was verified, by an atomic rename, so a
crash or Ctrl-C leaves at worst a partial file that the next pull resumes or replaces.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from vmm.errors import DigestMismatch, ImageError
from vmm.images.model import base_path  # the one place that knows where bases live

log = logging.getLogger(__name__)

#: last_used is rewritten at most this often per reference: resolving a cached image stays cheap.
TOUCH_INTERVAL_S = 60.0
CHUNK = 1 << 20


def split_digest(digest: str) -> str:
    """The hex part of `sha256:<hex>`, refusing anything else (digests become file names)."""
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise ImageError(f"unsupported or malformed digest {digest!r} (expected sha256:<64 lowercase hex digits)")
    return hexdigest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class BlobWriter:
    """Appends to a partial blob while hashing; `commit()` verifies and renames it into the store.

    An existing partial file (an interrupted download) is hashed first so that the download can
    resume from its end (`offset`); `restart()` throws it away when the server cannot resume.
    """

    def __init__(self, store: BlobStore, digest: str, expected_size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.path = store.partial_path(digest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._hash = hashlib.sha256()
        self._file = open(self.path, "a+b")
        self._file.seek(0)
        while chunk := self._file.read(CHUNK):
            self._hash.update(chunk)
        self.offset = self._file.tell()
        if expected_size is not None and self.offset > expected_size:
            self.restart()

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def close(self) -> None:
        self._file.close()

    def commit(self, source: str) -> Path:
        """Verify size and digest, then publish the blob. On a mismatch the partial is deleted
        (it can never become right) and DigestMismatch names the source."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest or (self.expected_size is not None and self.offset != self.expected_size):
            self.path.unlink(missing_ok=True)
            raise DigestMismatch(
                f"{source}: blob {self.digest} arrived as {self.offset} bytes hashing to {actual}"
                + (f" (expected {self.expected_size} bytes)" if self.expected_size is not None else "")
                + ". The registry or a proxy on the way served corrupt data; nothing was cached. Pull again, "
                "and if it persists, push the image again or report it to the registry's operator."
            )
        final = self.store.path(self.digest)
        os.chmod(self.path, 0o444)
        os.replace(self.path, final)
        return final


class BlobStore:
    def __init__(self, images_dir: Path) -> None:
        self.images = Path(images_dir)
        self.blobs = self.images / "blobs" / "sha256"
        self.partial = self.images / "blobs" / "partial"
        self.locks = self.images / "locks"
        for d in (self.blobs, self.partial, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.blobs / split_digest(digest)

    def partial_path(self, digest: str) -> Path:
        return self.partial / split_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def lock(self, key: str) -> FileLock:
        """A lock named by a digest (a blob, or an image id while its base is built)."""
        return FileLock(str(self.locks / f"{split_digest(key)}.lock"))

    def writer(self, digest: str, expected_size: int | None) -> BlobWriter:
        return BlobWriter(self, digest, expected_size)

    def import_stream(self, stream: IO[bytes], source: str, digest: str | None = None,
                      size: int | None = None) -> str:
        """Copy a local stream into the store, hashing as it goes; returns its digest. With `digest`
        the content must match it (DigestMismatch otherwise)."""
        if digest and self.has(digest):
            return digest
        fd, tmp_name = tempfile.mkstemp(prefix=".import-", dir=self.partial)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            count = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    count += len(chunk)
            actual = "sha256:" + h.hexdigest()
            if (digest and actual != digest) or (size is not None and count != size):
                raise DigestMismatch(f"{source}: content of {digest or 'a blob'} ({count} bytes) hashes to {actual}"
                                     + (f", expected {size} bytes" if size is not None else "")
                                     + ". The file is corrupt or was changed; rebuild or re-export it.")
            os.chmod(tmp, 0o444)
            os.replace(tmp, self.path(actual))  # same content under the same name: a race is harmless
            return actual
        finally:
            tmp.unlink(missing_ok=True)

    def import_bytes(self, data: bytes, digest: str, source: str) -> str:
        """Store small content held in memory (manifests), verified like any blob."""
        return self.import_stream(io.BytesIO(data), source, digest, len(data))


# ---------------------------------------------------------------- the index of references


@dataclass
class IndexEntry:
    ref: str  # normalised reference as the user would write it again
    digest: str  # manifest digest (registry, oci:), or the tree fingerprint (default, dir:)
    image_id: str  # digest that names the ext4 base (the config digest for OCI images)
    config: dict[str, Any] = field(default_factory=dict)  # ImageConfig fields
    blobs: list[str] = field(default_factory=list)  # blobs this image keeps in the store
    pulled: float = 0.0
    last_used: float = 0.0


class ImageIndex:
    """`images/index.json`, rewritten atomically under a lock (several processes share it)."""

    def __init__(self, images_dir: Path) -> None:
        self.path = Path(images_dir) / "index.json"
        self._lock = FileLock(str(self.path) + ".lock")

    def _read(self) -> dict[str, IndexEntry]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("image index %s is unreadable (%s): starting a new one", self.path, e)
            return {}
        entries = {}
        for ref, data in raw.get("images", {}).items():
            try:
                entries[ref] = IndexEntry(**data)
            except TypeError:
                log.warning("ignoring a malformed entry for %s in %s", ref, self.path)
        return entries

    def _write(self, entries: dict[str, IndexEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "images": {r: asdict(e) for r, e in sorted(entries.items())}}, f, indent=1)
        os.replace(tmp, self.path)

    @contextmanager
    def _editing(self) -> Iterator[dict[str, IndexEntry]]:
        with self._lock:
            entries = self._read()
            yield entries
            self._write(entries)

    def entries(self) -> dict[str, IndexEntry]:
        return self._read()

    def get(self, ref: str) -> IndexEntry | None:
        return self._read().get(ref)

    def put(self, entry: IndexEntry) -> None:
        with self._editing() as entries:
            old = entries.get(entry.ref)
            if old and not entry.pulled:
                entry.pulled = old.pulled
            entries[entry.ref] = entry

    def touch(self, entry: IndexEntry) -> None:
        """Record a use; skipped when the last one is recent (saves a rewrite per box)."""
        now = time.time()
        if now - entry.last_used < TOUCH_INTERVAL_S:
            return
        with self._editing() as entries:
            if entry.ref in entries:
                entries[entry.ref].last_used = now
        entry.last_used = now

    def remove(self, ref: str) -> IndexEntry | None:
        with self._editing() as entries:
            return entries.pop(ref, None)


# ---------------------------------------------------------------- garbage collection


def referenced_by_boxes(home: Path) -> set[str]:
    """Base files named in box state: a stopped persistent box still needs its base."""
    keep = set()
    for state in (home / "boxes").glob("*/box.json"):
        try:
            keep.add(os.path.realpath(json.loads(state.read_text())["image"]["base"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return keep


def collect_garbage(home: Path) -> int:
    """Delete bases and blobs no index entry or box refers to, and interrupted downloads.
    Returns the bytes freed. Files locked by another process (being written) are left alone."""
    images = Path(home) / "images"
    store = BlobStore(images)
    entries = ImageIndex(images).entries().values()
    keep_bases = {os.path.realpath(base_path(home, e.image_id)) for e in entries} | referenced_by_boxes(home)
    keep_blobs = {b for e in entries for b in e.blobs}
    freed = 0
    for base in (images / "bases").glob("*.ext4"):
        if os.path.realpath(base) not in keep_bases:
            freed += _unlink_locked(base, FileLock(str(base) + ".lock"))
    for blob in list(store.blobs.iterdir()) + list(store.partial.iterdir()):
        digest = "sha256:" + blob.name
        if blob.parent == store.partial or digest not in keep_blobs:
            try:
                lock = store.lock(digest)
            except ImageError:  # not a blob name: leave foreign files alone
                continue
            freed += _unlink_locked(blob, lock)
    return freed


def _unlink_locked(path: Path, lock: FileLock) -> int:
    try:
        with lock.acquire(timeout=0):
            size = path.lstat().st_blocks * 512
            path.unlink()
            log.info("removed %s (%d bytes)", path, size)
            return size
    except Timeout:
        log.info("kept %s: another process holds its lock", path)
    except FileNotFoundError:
        pass
    return 0


def disk_usage(path: Path) -> int:
    try:
        return path.lstat().st_blocks * 512
    except OSError:
        return 0
