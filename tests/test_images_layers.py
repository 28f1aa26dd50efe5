"""Layer unpacking: whiteouts, links, devices, and layers that try to write outside the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.oci_registry import Entry, busybox_entries, tar_bytes, write_layout
from vmm.errors import ImageError, UnsafeLayer, UnsupportedImage
from vmm.images import layers, resolve_image


def layer_file(tmp_path: Path, name: str, entries: list[Entry], compress: bool = True) -> Path:
    path = tmp_path / name
    path.write_bytes(tar_bytes(entries, compress))
    return path


def snapshot(path: Path) -> set[str]:
    return {os.path.join(top, n) for top, dirs, files in os.walk(path) for n in dirs + files}


def test_whiteouts_links_and_devices(tmp_path: Path) -> None:
    lower = layer_file(tmp_path, "lower", [
        Entry("etc", "dir"), Entry("etc/old", data=b"old"), Entry("etc/keep", data=b"keep"),
        Entry("opt/a/x", data=b"x"),  # no directory entries: parents are made
        Entry("opt/a/y", data=b"y"), Entry("usr/bin", "dir"), Entry("bin", "symlink", link="usr/bin"),
        Entry("dev/null", "chr"), Entry("sbin-abs", "symlink", link="/usr/bin"),
        Entry("secret", data=b"s", mode=0o600),
    ])
    upper = layer_file(tmp_path, "upper", [
        Entry("opt/a/z", data=b"z"),  # before the opaque marker, same layer: must survive it
        Entry("etc/.wh.old"), Entry("opt/a/.wh..wh..opq"),
        Entry("bin/tool", data=b"#!/bin/sh\n", mode=0o755),  # through the bin -> usr/bin symlink
        Entry("sbin-abs/abs-tool", data=b"t"),  # absolute symlink: resolved inside the root
        Entry("etc/link", "hardlink", link="etc/keep"),
        Entry("etc/keep-2", "hardlink", link="bin/tool"),  # hard link through a symlink, inside the root
    ], compress=False)
    root = tmp_path / "root"
    root.mkdir()
    layers.unpack([(lower, "lower"), (upper, "upper")], root)
    assert not (root / "etc" / "old").exists() and (root / "etc" / "keep").read_bytes() == b"keep"
    assert sorted(os.listdir(root / "opt" / "a")) == ["z"]
    assert (root / "usr" / "bin" / "tool").read_bytes() == b"#!/bin/sh\n"
    assert oct((root / "usr" / "bin" / "tool").stat().st_mode & 0o777) == oct(0o755)
    assert (root / "usr" / "bin" / "abs-tool").read_bytes() == b"t"
    assert os.path.samefile(root / "etc" / "link", root / "etc" / "keep")
    assert os.path.samefile(root / "etc" / "keep-2", root / "usr" / "bin" / "tool")
    assert not (root / "dev" / "null").exists()  # device nodes skipped
    assert (root / "secret").stat().st_mode & 0o777 == 0o600
    assert (root / "bin").is_symlink()


def test_file_replaces_symlink_without_following_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("untouched")
    root = tmp_path / "root"
    root.mkdir()
    first = layer_file(tmp_path, "l1", [Entry("x", "symlink", link=str(victim))])
    second = layer_file(tmp_path, "l2", [Entry("x", data=b"replaced")])
    layers.unpack([(first, "l1"), (second, "l2")], root)
    assert victim.read_text() == "untouched"
    assert not (root / "x").is_symlink() and (root / "x").read_bytes() == b"replaced"


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-then-file", "hardlink-out",
                                  "hardlink-dotdot", "symlink-chain"])
def test_malicious_layers_are_rejected(case: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    up = "../" * 30
    entries = {
        "dotdot": [Entry(f"{up}{outside.relative_to('/')}/pwned", data=b"x")],
        "absolute": [Entry(f"{outside}/pwned", data=b"x")],
        "symlink-then-file": [Entry("escape", "symlink", link=f"{up}{outside.relative_to('/')}"),
                              Entry("escape/pwned", data=b"x")],
        "hardlink-out": [Entry("passwd", "hardlink", link="/etc/passwd")],
        "hardlink-dotdot": [Entry("passwd", "hardlink", link=f"{up}etc/passwd")],
        "symlink-chain": [Entry("a", "symlink", link="b/.."), Entry("b", "symlink", link=".."),
                          Entry("a/b/pwned", data=b"x")],
    }[case]
    bad = layer_file(tmp_path, "bad", [Entry("ok", data=b"fine")] + entries)
    root = tmp_path / "cache" / "root"
    root.mkdir(parents=True)
    before = snapshot(tmp_path) - snapshot(root)
    with pytest.raises(UnsafeLayer) as info:
        layers.unpack([(bad, "bad-layer")], root)
    assert "bad-layer" in str(info.value) and "refusing" in str(info.value)
    assert snapshot(tmp_path) - snapshot(root) == before  # nothing new outside the root
    assert not list(outside.iterdir())


def test_malicious_image_fails_resolve_and_builds_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, [tar_bytes(busybox_entries([Entry("/etc/pwned", data=b"x")]))])
    home = tmp_path / "home"
    with pytest.raises(UnsafeLayer, match="absolute path"):
        resolve_image(f"oci:{layout}", home)
    assert not list((home / "images" / "bases").glob("*.ext4"))
    assert not list((home / "images" / "tmp").iterdir())  # the half-unpacked tree is gone


def test_zstd_layer_is_a_clear_error(tmp_path: Path) -> None:
    blob = tmp_path / "zstd-layer"
    blob.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    root = tmp_path / "root"
    root.mkdir()
    try:
        from compression import zstd  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedImage, match="zstd"):
            layers.unpack([(blob, "z")], root)
    else:
        with pytest.raises(ImageError):  # garbage zstd data
            layers.unpack([(blob, "z")], root)


def test_corrupt_gzip_is_a_clear_error(tmp_path: Path) -> None:
    blob = tmp_path / "layer"
    blob.write_bytes(tar_bytes([Entry("a", data=os.urandom(100_000))])[:5000])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageError, match="corrupt or truncated|not a valid tar"):
        layers.unpack([(blob, "broken")], root)
