"""A client for OCI distribution (Docker registry v2) on the standard library only.

What it does: ping (`/v2/`, also picks https or http), the bearer-token flow from a
`WWW-Authenticate` challenge (anonymous, or with basic credentials), basic auth, credentials from
`~/.docker/config.json` (`auths`; no credential helpers), manifests by tag or digest, blobs streamed
into the blob store with their sha256 checked before use, retries with backoff on 5xx / 429 /
dropped connections, and resumed partial downloads (HTTP Range).

`http://` is only used for loopback registries and hosts the user marks insecure
(`insecure=` / `$BOXLITE_INSECURE_REGISTRIES`, comma or space separated `host[:port]`); https is
tried first even there, like Docker does.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmm.errors import DigestMismatch, ImageError, ImageNotFound, RegistryAuthError, RegistryUnreachable, TruncatedBlob
from vmm.images.reference import DOCKER_HUB, DOCKER_HUB_API
from vmm.images.store import BlobWriter

log = logging.getLogger(__name__)

INSECURE_ENV = "BOXLITE_INSECURE_REGISTRIES"
USER_AGENT = "pytest-boxlite"
MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 1 << 20

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))

#: Connection failures worth retrying (the server may come back); refused/DNS are answered at once.
_TRANSIENT = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError, socket.timeout,
              http.client.RemoteDisconnected, http.client.IncompleteRead)

Progress = Callable[[int, int], None]
#: Retries after a 5xx / 429 / dropped connection, and the first back-off (doubled each time).
RETRIES = 4
BACKOFF_S = 0.5


# ---------------------------------------------------------------- configuration


def insecure_hosts(extra: Iterable[str] | str | None = None) -> frozenset[str]:
    """Hosts allowed over plain http: `extra` plus `$BOXLITE_INSECURE_REGISTRIES`."""
    items: list[str] = []
    for source in (extra, os.environ.get(INSECURE_ENV, "")):
        if isinstance(source, str):
            items += re.split(r"[,\s]+", source)
        elif source:
            items += list(source)
    return frozenset(i.strip().lower() for i in items if i.strip())


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.endswith("]") or "]:" in host else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    token: str = ""  # a bearer token given directly (`registrytoken`)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def load_credentials(registry: str, config: Path | None = None) -> Credentials | None:
    """Credentials for `registry` (host[:port] as in the reference) from Docker's config.json."""
    path = config or docker_config_path()
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None
    wanted = {registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/",
              f"https://{registry}/v2/"}
    if registry == DOCKER_HUB:
        wanted |= {"https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB_API}
    for key, entry in auths.items():
        if key.rstrip("/") in {w.rstrip("/") for w in wanted} and isinstance(entry, dict):
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return Credentials(user, password)
            if entry.get("username"):
                return Credentials(entry["username"], entry.get("password", ""))
            if entry.get("registrytoken"):
                return Credentials(token=entry["registrytoken"])
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


# ---------------------------------------------------------------- the client


class _NoRedirectAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects (blob storage) without ever carrying our Authorization header along;
    urllib already drops headers added with add_unredirected_header, this also refuses https->http."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and newurl.startswith("http:"):
            raise RegistryUnreachable(f"the registry redirected {req.full_url} to plain http ({newurl}); refusing")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RegistryClient:
    """One registry (host[:port] of its API). Not thread-safe; cheap to make."""

    def __init__(self, host: str, *, insecure: Iterable[str] | str | None = None,
                 credentials: Credentials | None = None, retries: int | None = None, backoff: float | None = None,
                 timeout: float = 60.0, ref_host: str | None = None) -> None:
        self.host = host
        self.allow_http = is_loopback(host) or host.lower() in insecure_hosts(insecure)
        self.credentials = credentials if credentials is not None else load_credentials(ref_host or host)
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF_S if backoff is None else backoff
        self.timeout = timeout
        self._scheme: str | None = None
        self._tokens: dict[str, str] = {}
        self._opener = urllib.request.build_opener(_NoRedirectAuth())

    # -- transport ----------------------------------------------------------------------------------------
    def _open(self, url: str, headers: dict[str, str], auth: str | None) -> http.client.HTTPResponse:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
        if auth:
            req.add_unredirected_header("Authorization", auth)
        response: http.client.HTTPResponse = self._opener.open(req, timeout=self.timeout)
        return response

    def ping(self) -> str:
        """Find how to talk to the registry (https, else http where allowed); returns the scheme."""
        if self._scheme:
            return self._scheme
        errors = []
        for scheme in ("https", "http") if self.allow_http else ("https",):
            try:
                with self._open(f"{scheme}://{self.host}/v2/", {}, None):
                    pass
            except urllib.error.HTTPError as e:
                if e.code in (200, 401):  # 401: a registry that wants auth is still a registry
                    self._scheme = scheme
                    return scheme
                errors.append(f"{scheme}: HTTP {e.code}")
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                errors.append(f"{scheme}: {_reason(e)}")
                continue
            self._scheme = scheme
            return scheme
        hint = "" if self.allow_http else (
            f" If it is a plain-http registry you trust, mark it insecure with {INSECURE_ENV}={self.host} "
            "(or the boxlite_insecure_registries ini option).")
        raise RegistryUnreachable(
            f"registry {self.host} is unreachable ({'; '.join(errors)}). Check the name, the network and "
            f"proxy settings.{hint}")

    def _request(self, path: str, scope: str, headers: dict[str, str] | None = None,
                 what: str = "") -> http.client.HTTPResponse:
        """GET with auth and retries; returns an open response (2xx). Maps failures to ImageErrors."""
        scheme = self.ping()
        url = f"{scheme}://{self.host}{path}"
        headers = headers or {}
        authed_once = False
        delay = self.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._open(url, headers, self._auth_for(scope))
            except urllib.error.HTTPError as e:
                if e.code == 401 and not authed_once:
                    authed_once = True
                    self._authenticate(e.headers.get("WWW-Authenticate", ""), scope, what)
                    e.close()
                    continue
                if e.code in (401, 403):
                    e.close()
                    raise RegistryAuthError(self._denied(e.code, what)) from None
                if e.code == 404:
                    e.close()
                    raise ImageNotFound(f"{what}: not found on {self.host} (HTTP 404). Check the repository "
                                        "name and tag (`skopeo list-tags docker://...` lists tags), and that "
                                        "you are logged in if it is private.") from None
                if (e.code >= 500 or e.code == 429) and attempt <= self.retries:
                    log.info("%s: HTTP %d from %s, retrying in %.1f s", what, e.code, self.host, delay)
                    e.close()
                    time.sleep(delay)
                    delay *= 2
                    continue
                e.close()
                raise RegistryUnreachable(f"{what}: {self.host} answered HTTP {e.code} {e.reason} "
                                          f"(after {attempt} attempts); try again later") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, _TRANSIENT) and attempt <= self.retries:
                    log.info("%s: %s, retrying in %.1f s", what, _reason(e), delay)
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise RegistryUnreachable(f"{what}: cannot reach {self.host} ({_reason(e)}); check the "
                                          "network and that the registry is up") from None

    def _denied(self, code: int, what: str) -> str:
        who = "with the credentials from " + str(docker_config_path()) if self.credentials else "anonymously"
        return (f"{what}: access denied by {self.host} (HTTP {code}) {who}. If the image is private, add "
                f"credentials for {self.host} to {docker_config_path()} (`docker login {self.host}` or "
                "`skopeo login`); otherwise check the repository name.")

    # -- auth -----------------------------------------------------------------------------------------------
    def _auth_for(self, scope: str) -> str | None:
        if scope in self._tokens:
            return self._tokens[scope]
        if "*" in self._tokens:
            return self._tokens["*"]
        return None

    def _authenticate(self, challenge: str, scope: str, what: str) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self.credentials
        if scheme == "basic":
            if not creds or not creds.username:
                raise RegistryAuthError(self._denied(401, what))
            self._tokens["*"] = creds.basic()
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryAuthError(f"{what}: {self.host} asks for an unsupported authentication "
                                    f"({challenge or 'no WWW-Authenticate header'})")
        if creds and creds.token:
            self._tokens[scope] = f"Bearer {creds.token}"
            return
        query = {"service": params.get("service", ""), "scope": params.get("scope") or scope}
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(
            {k: v for k, v in query.items() if v})
        realm_host = urllib.parse.urlsplit(url).netloc
        if url.startswith("http:") and not (is_loopback(realm_host) or realm_host.lower() in insecure_hosts()
                                            or realm_host == self.host and self.allow_http):
            raise RegistryAuthError(f"{what}: the token service {params['realm']} is plain http; refusing to "
                                    f"send credentials there (mark {realm_host} insecure if you trust it)")
        try:
            with self._open(url, {}, creds.basic() if creds and creds.username else None) as resp:
                body = json.loads(resp.read(MAX_MANIFEST_BYTES))
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (401, 403):
                raise RegistryAuthError(self._denied(e.code, what) + " (the token service refused)") from None
            raise RegistryUnreachable(f"{what}: token service {params['realm']} answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            raise RegistryUnreachable(f"{what}: token service {params['realm']} failed: {_reason(e)}") from None
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryAuthError(f"{what}: token service {params['realm']} returned no token")
        self._tokens[scope] = f"Bearer {token}"

    # -- API --------------------------------------------------------------------------------------------
    def manifest(self, repository: str, reference: str, what: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index; the digest is checked when pinned."""
        with self._request(f"/v2/{repository}/manifests/{reference}", _scope(repository),
                           {"Accept": ACCEPT}, what) as resp:
            body = resp.read(MAX_MANIFEST_BYTES + 1)
            media = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest")
        if len(body) > MAX_MANIFEST_BYTES:
            raise ImageError(f"{what}: the manifest is larger than {MAX_MANIFEST_BYTES} bytes; refusing it")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = reference if reference.startswith("sha256:") else header_digest
        if expected and expected.startswith("sha256:") and expected != digest:
            raise DigestMismatch(f"{what}: the manifest hashes to {digest}, not {expected}. The registry or a "
                                 "proxy served corrupt data; nothing was cached.")
        return body, media, digest

    def fetch_blob(self, repository: str, digest: str, writer: BlobWriter, what: str,
                   progress: Progress | None = None) -> None:
        """Stream a blob into `writer`, resuming from its offset; retries dropped transfers."""
        total = writer.expected_size or 0
        short_reads = 0
        while True:
            headers = {"Range": f"bytes={writer.offset}-"} if writer.offset else {}
            try:
                with self._request(f"/v2/{repository}/blobs/{digest}", _scope(repository), headers, what) as resp:
                    if writer.offset and resp.status != 206:
                        writer.restart()  # the server sends the whole blob again
                    while chunk := resp.read(CHUNK):
                        writer.write(chunk)
                        if progress:
                            progress(writer.offset, total)
            except _TRANSIENT as e:
                log.info("%s: transfer dropped at %d bytes (%s)", what, writer.offset, _reason(e))
            if not total or writer.offset >= total:
                return
            short_reads += 1
            if short_reads > self.retries:
                raise TruncatedBlob(
                    f"{what}: the registry sent only {writer.offset} of {total} bytes, {short_reads} times. "
                    "The partial download is kept and the next pull resumes it; if it persists the registry "
                    "is serving a broken blob.")
            log.info("%s: %d of %d bytes, resuming", what, writer.offset, total)
            time.sleep(self.backoff * short_reads)


def _scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    if isinstance(reason, ssl.SSLError):
        return f"TLS error: {reason.reason or reason}"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return f"{type(e).__name__}: {e}"
