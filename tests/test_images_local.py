"""Local images (default and dir:) and their ext4 bases, with the real tools (mkfs.ext4, debugfs,
e2fsck, mmdebstrap). The default image test builds a Debian tree: about a minute with a near
mirror; deselect it with `-m "not slow"`."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmm import process
from vmm.errors import ImageError
from vmm.images import ImageConfig, ResolvedImage, base_path, ext4, resolve_image
from vmm.images import default as default_mod
from vmm.images.ext4 import build_ext4_base, is_valid_base
from vmm.images.rootfs import fingerprint

REPO = Path(__file__).resolve().parent.parent
SBIN = "/usr/sbin:/sbin"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=SBIN)
    if not found:
        pytest.skip(f"{name} is not installed (apt-get install e2fsprogs)")
    return found


def debugfs(base: Path, request: str) -> str:
    proc = subprocess.run([tool("debugfs"), "-R", request, str(base)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def names(ls_l: str) -> list[str]:
    """Entry names in `debugfs -R 'ls -l DIR'` output."""
    return [line.split()[-1] for line in ls_l.splitlines() if line.strip()]


def fsck_clean(base: Path) -> None:
    proc = subprocess.run([tool("e2fsck"), "-fn", str(base)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def make_tree(root: Path) -> Path:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("box\n")
    tool_file = root / "usr" / "bin" / "hello"
    tool_file.write_text("#!/bin/sh\necho hello\n")
    tool_file.chmod(0o755)
    (root / "usr" / "bin" / "hello-again").symlink_to("hello")
    (root / "emptydir").mkdir()
    (root / "data.bin").write_bytes(os.urandom(300_000))
    os.link(root / "data.bin", root / "data-link.bin")
    if os.geteuid() == 0:
        os.chown(root / "etc" / "hostname", 1234, 4321)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "rootfs")


# ---------------------------------------------------------------- ext4 bases


def test_build_ext4_base_from_tree(tree: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    base = build_ext4_base(tree, tmp_path / "out" / "base.ext4", progress=messages.append)
    assert base == tmp_path / "out" / "base.ext4"
    assert is_valid_base(base)
    st = base.stat()
    assert st.st_blocks * 512 < st.st_size, "the base should be a sparse file"
    assert stat.S_IMODE(st.st_mode) == 0o444  # shared by every box: nobody writes to it
    assert any("building ext4 base" in m for m in messages)
    assert not list(base.parent.glob(".base.ext4.tmp-*")), "no temporary file left behind"

    listing = debugfs(base, "ls -l /")
    assert {"usr", "bin", "etc", "emptydir", "data.bin", "data-link.bin"} <= set(names(listing)), listing
    root_line = next(line for line in listing.splitlines() if line.split()[-1] == ".")
    assert root_line.split()[1:4] == ["40755", "(2)", "0"], root_line  # root dir owned by root

    hello = debugfs(base, "stat /usr/bin/hello")
    assert "Mode:  0755" in hello and "Type: regular" in hello
    link = debugfs(base, "stat /usr/bin/hello-again")
    assert "Type: symlink" in link and 'Fast link dest: "hello"' in link
    assert "Type: symlink" in debugfs(base, "stat /bin")
    assert "Links: 2" in debugfs(base, "stat /data.bin")  # hard link kept, data stored once
    assert names(debugfs(base, "ls -l /emptydir")) == [".", ".."]
    assert debugfs(base, "cat /etc/hostname") == "box\n"
    if os.geteuid() == 0:
        assert "User:  1234   Group:  4321" in debugfs(base, "stat /etc/hostname")

    fs = subprocess.run([tool("dumpe2fs"), "-h", str(base)], check=False, capture_output=True, text=True).stdout
    assert "boxlite-root" in fs and "has_journal" not in fs
    assert "Reserved block count:     0" in fs
    fsck_clean(base)


def test_base_is_reused_not_rebuilt(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "base.ext4"
    build_ext4_base(tree, dest)
    before = dest.stat().st_mtime_ns
    messages: list[str] = []
    build_ext4_base(tree, dest, progress=messages.append)
    assert dest.stat().st_mtime_ns == before and messages == []


@pytest.mark.parametrize("damage", ["zero", "truncate", "garbage"])
def test_damaged_base_is_rebuilt(tree: Path, tmp_path: Path, damage: str) -> None:
    dest = tmp_path / "base.ext4"
    build_ext4_base(tree, dest)
    dest.chmod(0o644)
    if damage == "zero":
        os.truncate(dest, 0)
    elif damage == "truncate":
        os.truncate(dest, dest.stat().st_size // 2)  # superblock intact, the rest missing
    else:
        dest.write_bytes(b"\0" * 8192)
    assert not is_valid_base(dest)
    build_ext4_base(tree, dest)
    assert is_valid_base(dest)
    fsck_clean(dest)


def test_truncated_base_is_rebuilt_by_resolve(tree: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    image = resolve_image(f"dir:{tree}", home)
    image.base.chmod(0o644)
    os.truncate(image.base, 4096)
    again = resolve_image(f"dir:{tree}", home)
    assert again.base == image.base and is_valid_base(again.base)
    fsck_clean(again.base)


def test_mkfs_failure_is_an_image_error_with_its_stderr(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the real mkfs.ext4, given a file system far too small for the tree
    monkeypatch.setattr(ext4, "_size_for", lambda data, inodes: 1024 * 1024)
    (tree / "big").write_bytes(b"x" * (4 * 1024 * 1024))
    dest = tmp_path / "base.ext4"
    with pytest.raises(ImageError, match="mkfs.ext4 failed") as info:
        build_ext4_base(tree, dest)
    assert "free space" in str(info.value)
    assert len(str(info.value).splitlines()) > 2  # mkfs's own words are in there
    assert not dest.exists() and not list(tmp_path.glob(".base.ext4.tmp-*"))


def test_missing_mkfs_names_the_package(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(process, "SBIN_PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(ImageError, match="apt-get install e2fsprogs"):
        build_ext4_base(tree, tmp_path / "base.ext4")


def test_concurrent_builds_build_once(tree: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from vmm.images import resolve_image
        img = resolve_image({f"dir:{tree}"!r}, Path({str(home)!r}), progress=lambda m: print("P", m))
        print("BASE", img.base)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    bases = {line for out, _ in outs for line in out.splitlines() if line.startswith("BASE ")}
    builds = [line for out, _ in outs for line in out.splitlines() if "building ext4 base" in line]
    assert len(bases) == 1 and len(builds) == 1, outs
    fsck_clean(Path(bases.pop().split(" ", 1)[1]))


# ---------------------------------------------------------------- dir: images


def test_resolve_dir_image(tree: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    image = resolve_image(f"dir:{tree}", home)
    assert isinstance(image, ResolvedImage)
    assert image.ref == f"dir:{tree}"
    assert image.digest == fingerprint(tree) and image.digest.startswith("sha256:")
    assert image.base == base_path(home, image.digest)
    assert image.base.parent == home / "images" / "bases"
    assert image.config == ImageConfig()
    assert image.config.env[0].startswith("PATH=") and image.config.user == "root"
    # relative paths are made absolute
    rel = os.path.relpath(tree)
    assert resolve_image(f"dir:{rel}", home).ref == f"dir:{tree}"


def test_fingerprint_follows_changes(tree: Path) -> None:
    first = fingerprint(tree)
    assert fingerprint(tree) == first
    hello = tree / "usr" / "bin" / "hello"
    hello.write_text("#!/bin/sh\necho hello world\n")  # size and mtime change
    second = fingerprint(tree)
    assert second != first
    st = hello.stat()
    os.utime(hello, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, new mtime
    third = fingerprint(tree)
    assert third != second
    hello.chmod(0o700)
    assert fingerprint(tree) != third
    (tree / "usr" / "bin" / "hello-again").unlink()
    (tree / "usr" / "bin" / "hello-again").symlink_to("/usr/bin/hello")  # new symlink target
    assert fingerprint(tree) not in (first, second, third)


def test_changed_dir_gets_a_new_base(tree: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = resolve_image(f"dir:{tree}", home)
    (tree / "etc" / "new-file").write_text("new\n")
    second = resolve_image(f"dir:{tree}", home)
    assert second.digest != first.digest and second.base != first.base
    assert debugfs(second.base, "cat /etc/new-file") == "new\n"


def test_dir_spec_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = tmp_path / "missing"
    with pytest.raises(ImageError, match="no such directory") as info:
        resolve_image(f"dir:{missing}", home)
    assert str(missing) in str(info.value)

    a_file = tmp_path / "rootfs.tar"
    a_file.write_bytes(b"")
    with pytest.raises(ImageError, match="is not a directory") as info:
        resolve_image(f"dir:{a_file}", home)
    assert str(a_file) in str(info.value)

    not_root = tmp_path / "project"
    (not_root / "usr").mkdir(parents=True)
    with pytest.raises(ImageError, match=r"no /bin\b") as info:
        resolve_image(f"dir:{not_root}", home)
    assert str(not_root) in str(info.value) and "top of the tree" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match=r"no /bin or /usr"):
        resolve_image(f"dir:{empty}", home)

    with pytest.raises(ImageError, match="names no directory"):
        resolve_image("dir:", home)
    assert not list(home.glob("images/bases/*.ext4"))  # nothing was built


# ---------------------------------------------------------------- default image: helpers


def test_host_suite(tmp_path: Path) -> None:
    osr = tmp_path / "os-release"
    osr.write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n')
    assert default_mod.host_suite(osr) == "trixie"
    osr.write_text('NAME="Something"\n')
    with pytest.raises(ImageError, match="VERSION_CODENAME"):
        default_mod.host_suite(osr)


def test_host_sources_keep_only_the_release(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# comment\n"
        "deb http://deb.debian.org/debian bookworm main contrib\n"
        "deb-src http://deb.debian.org/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian "
        "bookworm stable\n"
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
        "deb http://deb.debian.org/debian trixie main\n"
    )
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\n"
        "# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://deb.debian.org/debian\n"
        "Suites: bookworm bookworm-updates trixie\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://deb.debian.org/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (etc / "sources.list.d" / "nodesource.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n"
    )
    (etc / "sources.list.d" / "old.list.disabled").write_text("deb http://x/debian bookworm main\n")
    found = default_mod.host_sources("bookworm", etc)
    assert found["host.list"] == "deb http://deb.debian.org/debian bookworm main contrib\n"
    assert found["host.sources"] == (
        "Types: deb\n"
        "URIs: http://deb.debian.org/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    assert default_mod.host_sources("bullseye", etc) == {}


def test_recipe_key_depends_on_suite() -> None:
    assert default_mod.recipe_key("bookworm").startswith("bookworm-")
    assert default_mod.recipe_key("bookworm") == default_mod.recipe_key("bookworm")
    assert default_mod.recipe_key("bookworm") != default_mod.recipe_key("trixie")


def test_remove_tree(tmp_path: Path) -> None:
    victim = make_tree(tmp_path / "victim")
    assert default_mod.remove_tree(victim) and not victim.exists()
    assert default_mod.remove_tree(tmp_path / "never-existed")


# ---------------------------------------------------------------- default image: the real build


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ResolvedImage, float, list[str]]:
    """Build the default image once per session in a fresh home, with debris of a crashed build
    (a half-built temp tree and an incomplete final directory) that must be cleaned, never used."""
    if os.geteuid() != 0:
        pytest.skip("building the default image needs root (mmdebstrap --mode=root)")
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap)")
    tool("mkfs.ext4")
    home = tmp_path_factory.mktemp("default-home")
    key = default_mod.recipe_key(default_mod.host_suite())
    parent = default_mod.default_dir(home)
    stale = parent / f".tmp-{key}-crashed"
    (stale / "rootfs" / "usr" / "bin").mkdir(parents=True)
    (stale / "rootfs" / "usr" / "bin" / "half").write_text("")
    incomplete = parent / key / "rootfs"
    incomplete.mkdir(parents=True)
    (incomplete / "junk").write_text("")
    messages: list[str] = []
    started = time.monotonic()
    image = resolve_image(None, home, progress=messages.append)
    return home, image, time.monotonic() - started, messages


@pytest.mark.slow
def test_default_image_builds(default_build: tuple[Path, ResolvedImage, float, list[str]]) -> None:
    home, image, _elapsed, messages = default_build
    key = default_mod.recipe_key(default_mod.host_suite())
    parent = default_mod.default_dir(home)
    rootfs = parent / key / "rootfs"
    assert image.ref == "default"
    assert image.digest == json.loads((parent / key / "image.json").read_text())["digest"]
    assert image.base == base_path(home, image.digest) and is_valid_base(image.base)
    assert "LANG=C.UTF-8" in image.config.env
    assert any("mmdebstrap" in m for m in messages) and any("built in" in m for m in messages)
    # crash debris cleaned, not used
    assert not list(parent.glob(".tmp-*")) and not (rootfs / "junk").exists()

    assert os.path.lexists(rootfs / "usr" / "bin" / "python3")
    assert (rootfs / "bin").is_symlink()  # merged /usr
    assert not list((rootfs / "var" / "lib" / "apt" / "lists").glob("*_Packages"))
    assert not list((rootfs / "var" / "cache" / "apt").rglob("*.deb"))
    assert not list((rootfs / "var" / "cache" / "apt").glob("*.bin"))
    assert not (rootfs / "usr" / "share" / "man" / "man1").exists()
    assert not any(p.name != "copyright" for p in (rootfs / "usr" / "share" / "doc").glob("*/*"))
    status = (rootfs / "var" / "lib" / "dpkg" / "status").read_text()
    assert "Package: python3\n" in status
    assert "Package: usrmerge\n" not in status and "Package: perl\n" not in status  # ~50 MB saved
    proc = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c", "import json, sqlite3; print(6*7)"],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "42\n", proc.stderr

    assert "Type: symlink" in debugfs(image.base, "stat /usr/bin/python3")
    target = debugfs(image.base, "stat /usr/bin/python3").split('Fast link dest: "')[1].split('"')[0]
    assert "Type: regular" in debugfs(image.base, f"stat /usr/bin/{target}")
    su = debugfs(image.base, "stat /usr/bin/su")
    assert re.search(r"User:\s+0\s+Group:\s+0\s", su) and "Mode:  04755" in su, su  # setuid root kept
    fsck_clean(image.base)


@pytest.mark.slow
def test_default_image_is_cached(default_build: tuple[Path, ResolvedImage, float, list[str]]) -> None:
    home, image, _elapsed, _ = default_build
    started = time.monotonic()
    messages: list[str] = []
    again = resolve_image("default", home, progress=messages.append)
    assert again == image and messages == []
    assert time.monotonic() - started < 5
    key = default_mod.recipe_key(default_mod.host_suite())
    assert default_mod.build_default_rootfs(home) == default_mod.default_dir(home) / key / "rootfs"


@pytest.mark.slow
def test_prebuild_command(default_build: tuple[Path, ResolvedImage, float, list[str]]) -> None:
    home, image, _elapsed, _ = default_build
    proc = subprocess.run([sys.executable, "-m", "vmm.images", "--home", str(home)],
                          check=False, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert f"base:   {image.base}" in proc.stdout and image.digest in proc.stdout
    assert "rootfs: " in proc.stdout
