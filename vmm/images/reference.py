"""Image references: what a user may write as `image=`, parsed before any work is done.

Registry references follow Docker's rules (`alpine` -> `docker.io/library/alpine:latest`); the
local forms are `oci:PATH[:TAG]` (an OCI image layout directory), `docker-archive:PATH` (a tar from
`docker save`, or an OCI layout in a tar) and `dir:PATH` (an unpacked root filesystem).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from vmm.errors import InvalidReference

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API actually lives.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

OCI_PREFIX = "oci:"
ARCHIVE_PREFIX = "docker-archive:"

FORMS_HELP = (
    "write a registry reference (alpine, python:3.12-slim, ghcr.io/org/img:tag, host:5000/x@sha256:<64 hex>), "
    "oci:/path/to/layout[:tag], docker-archive:/path/to/image.tar or dir:/path/to/rootfs"
)


@dataclass(frozen=True)
class RegistryRef:
    """A reference to an image in a registry, normalised (`docker.io/library/alpine:latest`)."""

    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str  # library/alpine
    tag: str | None  # None when only a digest was given
    digest: str | None  # sha256:<hex> pinned by the user

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class LocalRef:
    """An image on the local disk: an OCI layout (`oci`) or an archive (`docker-archive`)."""

    kind: str  # "oci" or "docker-archive"
    path: str  # absolute
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.tag}" if self.tag else "")


def _bad(text: str, why: str) -> InvalidReference:
    return InvalidReference(f"invalid image reference {text!r}: {why}; {FORMS_HELP}")


def parse_registry_ref(text: str) -> RegistryRef:
    """Parse `[registry/]name[:tag][@sha256:hex]` with Docker's normalisation."""
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise _bad(text, "it is empty or contains spaces")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise _bad(text, "the digest must be sha256: followed by 64 lowercase hex digits")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:  # a colon after the last slash separates the tag (not a registry port)
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise _bad(text, f"tag {tag!r} is not valid (letters, digits, _ . -; at most 128)")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, name = first, remainder
        if not _DOMAIN_RE.match(registry):
            raise _bad(text, f"registry {registry!r} is not a valid host[:port]")
    else:
        registry, name = DOCKER_HUB, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if not name or not _NAME_RE.match(name):
        raise _bad(text, f"repository name {name!r} must be lowercase letters and digits separated by . _ - or /")
    if len(name) > 255:
        raise _bad(text, "the repository name is longer than 255 characters")
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return RegistryRef(registry=registry, repository=name, tag=tag, digest=digest or None)


def parse_local_ref(text: str) -> LocalRef:
    """`oci:PATH[:TAG]` or `docker-archive:PATH` (relative paths are taken from the current directory)."""
    if text.startswith(OCI_PREFIX):
        raw = text[len(OCI_PREFIX):]
        tag = None
        head, sep, tail = raw.rpartition(":")
        # a colon followed by something that is not a path is a tag (paths may themselves hold colons)
        if sep and head and "/" not in tail:
            raw, tag = head, tail
            if not _TAG_RE.match(tag):
                raise _bad(text, f"tag {tag!r} is not valid")
        kind = "oci"
    elif text.startswith(ARCHIVE_PREFIX):
        raw, tag, kind = text[len(ARCHIVE_PREFIX):], None, "docker-archive"
    else:
        raise _bad(text, "not a local image form")
    if not raw:
        raise _bad(text, "it names no path")
    return LocalRef(kind=kind, path=os.path.abspath(os.path.expanduser(raw)), tag=tag)


def parse(text: str) -> RegistryRef | LocalRef:
    """Any image reference except `default`, `dir:` and `host` (handled by the caller)."""
    if text.startswith((OCI_PREFIX, ARCHIVE_PREFIX)):
        return parse_local_ref(text)
    return parse_registry_ref(text)
