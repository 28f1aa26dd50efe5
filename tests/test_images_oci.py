"""OCI images for real: references, a loopback `docker-registry` behind a bearer-token front, local
layouts and archives, errors, concurrent pulls, and one box booted from a pulled image."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.oci_registry import PASSWORD, USER, OciEnv, free_port
from vmm import BoxOptions
from vmm.errors import (
    DigestMismatch,
    ImageError,
    ImageNotFound,
    InvalidReference,
    PlatformNotFound,
    RegistryAuthError,
    RegistryUnreachable,
    TruncatedBlob,
)
from vmm.images import base_path, reference, registry, resolve_image
from vmm.images.ext4 import is_valid_base
from vmm.images.oci import image_config, select_platform
from vmm.images.store import BlobStore, ImageIndex

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "BACKOFF_S", 0.01)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")  # no ~/.docker/config.json of the user's


def debugfs(base: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(base)], capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("text,expected", [
    ("alpine", "docker.io/library/alpine:latest"),
    ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
    ("user/img", "docker.io/user/img:latest"),
    ("index.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
    ("ghcr.io/org/img:tag", "ghcr.io/org/img:tag"),
    ("localhost/x", "localhost/x:latest"),
    ("registry:5000/x@sha256:" + "a" * 64, "registry:5000/x@sha256:" + "a" * 64),
    ("127.0.0.1:5000/a/b/c:v1.2_3", "127.0.0.1:5000/a/b/c:v1.2_3"),
])
def test_reference_normalisation(text: str, expected: str) -> None:
    assert str(reference.parse(text)) == expected


def test_reference_parts() -> None:
    ref = reference.parse_registry_ref("alpine@sha256:" + "b" * 64)
    assert (ref.registry, ref.repository, ref.tag, ref.api_host) == ("docker.io", "library/alpine", None,
                                                                     "registry-1.docker.io")
    assert ref.reference == "sha256:" + "b" * 64
    local = reference.parse("oci:/some/layout:v1")
    assert (local.kind, local.path, local.tag) == ("oci", "/some/layout", "v1")
    assert reference.parse("oci:/a:b/layout").tag is None  # a colon inside the path is not a tag
    assert reference.parse("docker-archive:img.tar").path == os.path.abspath("img.tar")


@pytest.mark.parametrize("text", ["Alpine Linux", "upper/CASE", "x@sha256:123", "x:bad tag", "x::y", "-x",
                                  "registry:99999999/x", "x@md5:" + "0" * 32, "oci:", "a//b", ""])
def test_malformed_references_fail_before_any_work(text: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(ImageError) as info:
        resolve_image(text or " ", home) if text else reference.parse_registry_ref(text)
    assert isinstance(info.value, InvalidReference)
    assert "oci:" in str(info.value)  # the message lists the accepted forms
    assert not (home / "images" / "blobs").exists()


def test_platform_selection_and_config() -> None:
    index = {"manifests": [
        {"digest": "sha256:" + "1" * 64, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:" + "2" * 64, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    assert select_platform(index, "x").digest == "sha256:" + "2" * 64
    with pytest.raises(PlatformNotFound, match="linux/amd64.*linux/arm64"):
        select_platform({"manifests": index["manifests"][:1]}, "x")
    with pytest.raises(PlatformNotFound):
        image_config({"os": "linux", "architecture": "arm64"}, "x")
    cfg = image_config({"os": "linux", "architecture": "amd64", "config": {"Env": ["A=1"]}}, "x")
    assert cfg.env[0].startswith("PATH=") and cfg.env[1] == "A=1" and cfg.user == "0" and cfg.working_dir == "/"


def test_insecure_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.RegistryClient("127.0.0.1:5000").allow_http
    assert registry.RegistryClient("localhost:5000").allow_http
    assert registry.RegistryClient("[::1]:5000").allow_http
    assert not registry.RegistryClient("registry.example:5000").allow_http
    assert registry.RegistryClient("registry.example:5000", insecure="registry.example:5000").allow_http
    monkeypatch.setenv(registry.INSECURE_ENV, "a.example, registry.example:5000")
    assert registry.RegistryClient("registry.example:5000").allow_http


# ---------------------------------------------------------------- pulling


def test_pull_with_token_auth_then_cached(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    front = oci_env.front
    ref = f"{front.host}/test/busybox:v1"
    tokens_before = len(front.state.token_requests)
    messages: list[str] = []
    image = resolve_image(ref, home, progress=messages.append)
    assert len(front.state.token_requests) > tokens_before  # the bearer flow really ran
    assert image.ref == ref and is_valid_base(image.base)
    assert image.base == base_path(home, image.digest)
    assert image.config.env == ("PATH=/bin", "GREETING=hello from the image")
    assert (image.config.working_dir, image.config.user) == ("/work", "0")
    assert image.config.entrypoint == ("/bin/busybox",) and image.config.cmd == ("sh",)
    assert any(m.startswith("pulling ") for m in messages)
    assert "Type: regular" in debugfs(image.base, "stat /bin/busybox")
    entry = ImageIndex(home / "images").get(ref)
    assert entry and entry.image_id == image.digest
    assert all(BlobStore(home / "images").has(b) for b in entry.blobs)

    gets = sum(front.state.blob_gets.values())
    again = resolve_image(ref, home)
    assert again == image and sum(front.state.blob_gets.values()) == gets  # cached: no network


def test_pull_resumes_a_partial_download(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    layout_blobs = sorted((oci_env.busybox_layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    big = layout_blobs[-1]  # the layer
    store = BlobStore(home / "images")
    partial = store.partial_path("sha256:" + big.name)
    partial.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
    image = resolve_image(f"{oci_env.registry.host}/test/busybox:v1", home)  # straight to the registry, no auth
    assert is_valid_base(image.base)
    assert store.has("sha256:" + big.name) and not partial.exists()


def test_whiteouts_through_the_registry(oci_env: OciEnv, tmp_path: Path) -> None:
    image = resolve_image(f"{oci_env.front.host}/test/two:v2", tmp_path / "home")
    assert "File not found" in subprocess.run(["debugfs", "-R", "stat /etc/old", str(image.base)],
                                              capture_output=True, text=True).stderr
    listing = debugfs(image.base, "ls -p /opt/a")
    assert "/z/" in listing and "/x/" not in listing and "/y/" not in listing
    assert "Links: 2" in debugfs(image.base, "stat /etc/new")
    assert image.config.user == "0:0" and "GREETING=two" in image.config.env


def test_private_repository_needs_credentials(oci_env: OciEnv, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ref = f"{oci_env.front.host}/private/busybox:v1"
    with pytest.raises(RegistryAuthError, match="access denied.*HTTP 401.*anonymously"):
        resolve_image(ref, tmp_path / "home")
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    import base64

    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {oci_env.front.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    assert is_valid_base(resolve_image(ref, tmp_path / "home").base)

    (config_dir / "config.json").write_text(json.dumps({"auths": {oci_env.front.host: {"auth": "eDp5"}}}))
    with pytest.raises(RegistryAuthError, match="with the credentials from"):
        resolve_image(f"{oci_env.front.host}/private/busybox@sha256:" + "0" * 64, tmp_path / "home")


def test_unknown_image_is_404(oci_env: OciEnv, tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="not found.*404"):
        resolve_image(f"{oci_env.front.host}/test/nope:v1", tmp_path / "home")
    with pytest.raises(ImageNotFound, match="not found.*404"):
        resolve_image(f"{oci_env.front.host}/test/busybox:no-such-tag", tmp_path / "home")


def test_digest_mismatch(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(DigestMismatch, match="corrupt data; nothing was cached"):
        resolve_image(f"{oci_env.front.host}/corrupt/busybox:v1", home)
    store = BlobStore(home / "images")
    assert not list(store.partial.iterdir())  # a wrong blob is never kept
    assert not list((home / "images" / "bases").glob("*.ext4"))


def test_truncated_blob(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(TruncatedBlob, match="sent only .* bytes.*resumes"):
        resolve_image(f"{oci_env.front.host}/truncated/busybox:v1", home)
    store = BlobStore(home / "images")
    assert list(store.partial.iterdir())  # kept for a resume
    assert not list((home / "images" / "bases").glob("*.ext4"))


def test_unreachable_registry(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RegistryUnreachable, match=f"registry 127.0.0.1:{port} is unreachable"):
        resolve_image(f"127.0.0.1:{port}/x:v1", tmp_path / "home")
    with socket.socket() as s:  # a server that accepts and hangs up: retried, then unreachable
        s.bind(("127.0.0.1", 0))
        s.listen()
        host = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(RegistryUnreachable):
            registry.RegistryClient(host, timeout=0.5, retries=0).ping()


# ---------------------------------------------------------------- local layouts and archives


def test_oci_layout_and_docker_archive(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    from_layout = resolve_image(f"oci:{oci_env.busybox_layout}:v1", home)
    assert from_layout.config.working_dir == "/work" and is_valid_base(from_layout.base)
    assert resolve_image(f"oci:{oci_env.busybox_layout}", home) == \
        resolve_image(f"oci:{oci_env.busybox_layout}", home)  # one image: no tag needed
    with pytest.raises(ImageNotFound, match="no image tagged 'v9'.*v1"):
        resolve_image(f"oci:{oci_env.busybox_layout}:v9", home)
    archive = tmp_path / "image.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{oci_env.two_layer_layout}:v2",
                    f"docker-archive:{archive}:test/two:v2"], check=True, capture_output=True)
    from_archive = resolve_image(f"docker-archive:{archive}", home)
    assert "GREETING=two" in from_archive.config.env and is_valid_base(from_archive.base)
    assert "/z/" in debugfs(from_archive.base, "ls -p /opt/a")
    with pytest.raises(ImageNotFound, match="is not a file"):
        resolve_image(f"docker-archive:{tmp_path / 'missing.tar'}", home)

    # a layout whose blob was tampered with
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-a", str(oci_env.busybox_layout), str(tampered)], check=True)
    layer = max((tampered / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer.chmod(0o644)
    with open(layer, "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2")
    with pytest.raises(DigestMismatch, match="layout is corrupt"):
        resolve_image(f"oci:{tampered}", tmp_path / "home2")


# ---------------------------------------------------------------- concurrency


def test_two_processes_pull_once(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    ref = f"{oci_env.front.host}/slow/busybox:v1"
    env = dict(os.environ, BOXLITE_HOME=str(home), PYTHONPATH=str(REPO))
    script = ("import sys; from vmm.images import resolve_image; "
              "print(resolve_image(sys.argv[1], sys.argv[2]).digest)")
    before = dict(oci_env.front.state.blob_gets)
    procs = [subprocess.Popen([sys.executable, "-c", script, ref, str(home)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert results[0][0] == results[1][0]
    fetched = {d: n - before.get(d, 0) for d, n in oci_env.front.state.blob_gets.items() if n - before.get(d, 0)}
    assert len(fetched) == 2 and set(fetched.values()) == {1}, fetched  # config + layer, once each


# ---------------------------------------------------------------- a box from a pulled image


def test_boot_a_box_from_a_pulled_image(oci_env: OciEnv, runtime) -> None:  # type: ignore[no-untyped-def]
    ref = f"{oci_env.front.host}/test/busybox:v1"
    with runtime.create(BoxOptions(image=ref, memory_mib=256)) as box:
        result = box.exec("sh", "-c", 'echo "$GREETING"; pwd; id -u; cat /etc/hostname 2>/dev/null; echo ok')
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["hello from the image", "/work", "0"] and lines[-1] == "ok"
