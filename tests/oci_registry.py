"""Test helpers for OCI images: layouts built offline, Debian's `docker-registry` on loopback, and an
auth front (bearer tokens, basic credentials for `private/` repositories, fault injection) in front of it.

Repositories behave by their first path component at the front:
  private/...    tokens only with basic credentials alice:secret (else the token service answers 401)
  corrupt/...    blob bodies have one byte flipped (same length): a digest mismatch
  truncated/...  blob bodies stop halfway (with the full Content-Length): a truncated transfer
  slow/...       blob bodies are throttled, so that concurrent pulls overlap
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MTIME = 1_700_000_000  # fixed: the same layout gives the same digests every run
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "ls", "pwd", "id", "env", "true", "test")
USER, PASSWORD = "alice", "secret"


# ---------------------------------------------------------------- layers and layouts


@dataclass
class Entry:
    """One tar member of a hand-made layer."""

    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, chr
    data: bytes = b""
    mode: int = 0o644
    link: str = ""


def tar_bytes(entries: list[Entry], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mtime = MTIME
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = e.mode if e.mode != 0o644 else 0o755
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.link
            elif e.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, e.link
            elif e.kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            else:
                info.size = len(e.data)
            tar.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def tree_layer(root: Path, compress: bool = True, level: int = 6) -> bytes:
    """A layer holding the tree at `root` (owners and modes as on disk)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(top, name)
                tar.add(path, arcname=os.path.relpath(path, root), recursive=False)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=level, mtime=0) if compress else raw


def busybox_entries(extra: list[Entry] | None = None) -> list[Entry]:
    entries = [Entry("bin", "dir"), Entry("bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755),
               Entry("usr", "dir"), Entry("work", "dir"), Entry("etc", "dir"), Entry("tmp", "dir", mode=0o1777)]
    entries += [Entry(f"bin/{a}", "symlink", link="busybox") for a in APPLETS]
    return entries + (extra or [])


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, layers: list[bytes], config: dict | None = None, tag: str = "latest",
                 arch: str = "amd64") -> str:
    """An OCI image layout with these (compressed) layers; returns the manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_ids = []
    for layer in layers:
        raw = gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    cfg = {"architecture": arch, "os": "linux", "config": config or {},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_desc = _blob(layout, json.dumps(cfg, sort_keys=True).encode())
    layer_descs = []
    for layer in layers:
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if layer[:2] == b"\x1f\x8b" else "")
        layer_descs.append({"mediaType": media, **_blob(layout, layer)})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
                "layers": layer_descs}
    manifest_desc = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_desc,
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return str(manifest_desc["digest"])


# ---------------------------------------------------------------- docker-registry on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """Debian's docker-registry with filesystem storage in `workdir`, on 127.0.0.1:<free port>."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = workdir / "config.yml"
        workdir.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.log = open(workdir / "registry.log", "wb")
        self.proc = subprocess.Popen([shutil.which("docker-registry") or "docker-registry", "serve", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("docker-registry did not start: "
                                       + (workdir / "registry.log").read_text()[-2000:]) from None
                time.sleep(0.05)

    def push(self, layout: Path, repo: str, tag: str = "latest") -> None:
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                        f"docker://{self.host}/{repo}:{tag}"], check=True, capture_output=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- the auth front


@dataclass
class FrontState:
    backend: str
    realm: str = ""
    blob_gets: collections.Counter = field(default_factory=collections.Counter)
    token_requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: FrontState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/token":
            return self._token(urllib.parse.parse_qs(url.query))
        if not url.path.startswith("/v2/"):
            return self._send(404)
        repo = url.path[4:].split("/manifests/")[0].split("/blobs/")[0].strip("/")
        scope = f"repository:{repo}:pull" if repo else ""
        if self.headers.get("Authorization") != f"Bearer tok:{scope}" and not (
                not repo and (self.headers.get("Authorization") or "").startswith("Bearer tok:")):
            challenge = f'Bearer realm="{self.state.realm}",service="boxlite-test"'
            if scope:
                challenge += f',scope="{scope}"'
            return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                              {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        self._proxy(url, repo)

    def _token(self, query: dict[str, list[str]]) -> None:
        scope = (query.get("scope") or [""])[0]
        with self.state.lock:
            self.state.token_requests.append(scope)
        if scope.startswith("repository:private/"):
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                return self._send(401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
        self._send(200, json.dumps({"token": f"tok:{scope}"}).encode(), {"Content-Type": "application/json"})

    def _proxy(self, url: urllib.parse.SplitResult, repo: str) -> None:
        is_blob = "/blobs/" in url.path
        if is_blob and self.command == "GET":
            with self.state.lock:
                self.state.blob_gets[url.path.rsplit("/", 1)[1]] += 1
        conn = http.client.HTTPConnection(self.state.backend, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        conn.request(self.command, url.path, headers=headers)
        resp = conn.getresponse()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("content-type", "content-length", "docker-content-digest", "content-range",
                             "www-authenticate", "location"):
                self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            conn.close()
            return
        body = resp.read()
        conn.close()
        top = repo.split("/", 1)[0]
        if is_blob and resp.status in (200, 206) and body:
            if top == "corrupt":
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            elif top == "truncated":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            elif top == "slow":
                for i in range(0, len(body), 64 * 1024):
                    self.wfile.write(body[i:i + 64 * 1024])
                    time.sleep(0.05)
                return
        self.wfile.write(body)


class AuthFront:
    """Bearer-token auth in front of a registry: /token issues tokens, /v2/ demands them."""

    def __init__(self, backend: str) -> None:
        self.state = FrontState(backend=backend)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.state.realm = f"http://{self.host}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- fixtures


@dataclass
class OciEnv:
    registry: Registry
    front: AuthFront
    busybox_layout: Path
    two_layer_layout: Path
    image_config: dict


IMAGE_CONFIG = {"Env": ["PATH=/bin", "GREETING=hello from the image"], "WorkingDir": "/work",
                "Cmd": ["sh"], "Entrypoint": ["/bin/busybox"]}


@pytest.fixture(scope="session")
def oci_env(tmp_path_factory: pytest.TempPathFactory):
    """docker-registry + auth front on loopback, with the test images pushed into several repositories."""
    for tool in ("docker-registry", "skopeo"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (apt-get install docker-registry skopeo; `make setup`)")
    work = tmp_path_factory.mktemp("oci")
    busybox = work / "busybox-layout"
    write_layout(busybox, [tar_bytes(busybox_entries())], IMAGE_CONFIG, tag="v1")
    two = work / "two-layer-layout"
    lower = tar_bytes(busybox_entries([
        Entry("etc/old", data=b"old\n"), Entry("opt", "dir"), Entry("opt/a", "dir"),
        Entry("opt/a/x", data=b"x"), Entry("opt/a/y", data=b"y"), Entry("etc/keep", data=b"keep\n")]))
    upper = tar_bytes([Entry("etc/.wh.old"), Entry("opt/a", "dir"), Entry("opt/a/.wh..wh..opq"),
                       Entry("opt/a/z", data=b"z"), Entry("etc/new", data=b"new\n"),
                       Entry("etc/new-link", "hardlink", link="etc/new")])
    write_layout(two, [lower, upper], {"Env": ["GREETING=two"], "User": "0:0"}, tag="v2")
    registry = Registry(work / "registry")
    front = None
    try:
        for repo in ("test/busybox", "private/busybox", "corrupt/busybox", "truncated/busybox", "slow/busybox"):
            registry.push(busybox, repo, "v1")
        registry.push(two, "test/two", "v2")
        front = AuthFront(registry.host)
        yield OciEnv(registry, front, busybox, two, IMAGE_CONFIG)
    finally:
        if front:
            front.stop()
        registry.stop()
