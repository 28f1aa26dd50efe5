"""The `boxlite` console script, run as a subprocess against a fresh runtime home."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.oci_registry import OciEnv

REPO = Path(__file__).resolve().parent.parent


def boxlite(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BOXLITE_HOME=str(home), PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_images_pull_ls_rm_prune(oci_env: OciEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    ref = f"{oci_env.front.host}/test/busybox:v1"
    quiet = boxlite(home, "images", "pull", ref)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith(ref) and "digest:   sha256:" in quiet.stdout
    assert " / " not in quiet.stdout  # not a terminal: no progress

    loud = boxlite(home, "images", "pull", "--progress", f"{oci_env.front.host}/test/two:v2")
    assert loud.returncode == 0, loud.stderr
    assert "1.0 MB / 1.0 MB" in loud.stdout  # bytes/total per layer (\r reads as \n here)
    assert "building ext4 base" in loud.stdout

    local = boxlite(home, "images", "pull", f"oci:{oci_env.busybox_layout}:v1")
    assert local.returncode == 0, local.stderr

    ls = boxlite(home, "images", "ls")
    assert ls.returncode == 0
    header, *rows = ls.stdout.splitlines()
    assert header.split() == ["REF", "DIGEST", "SIZE", "LAST", "USED"]
    assert len(rows) == 3 and any(r.startswith(ref) for r in rows)
    assert all("just now" in r for r in rows)

    bases = home / "images" / "bases"
    rm = boxlite(home, "images", "rm", f"{oci_env.front.host}/test/two:v2")
    assert rm.returncode == 0, rm.stderr
    assert "removed" in rm.stdout and "freed" in rm.stdout
    assert len(list(bases.glob("*.ext4"))) == 1  # busybox's base is shared by the registry and oci: refs

    missing = boxlite(home, "images", "rm", "nothing-here")
    assert missing.returncode == 1 and "no image 'nothing-here'" in missing.stderr

    keep = boxlite(home, "images", "prune", "--older-than", "1")
    assert keep.returncode == 0 and "removed" not in keep.stdout
    assert len(list(bases.glob("*.ext4"))) == 1
    gone = boxlite(home, "images", "prune", "--max-size", "0")
    assert gone.returncode == 0 and gone.stdout.count("removed") == 2
    assert not list(bases.glob("*.ext4")) and not list((home / "images" / "blobs" / "sha256").iterdir())
    assert boxlite(home, "images", "ls").stdout.splitlines()[1:] == []


def test_boxlite_log_turns_on_the_runtime_logging(oci_env: OciEnv, tmp_path: Path) -> None:
    quiet = boxlite(tmp_path / "quiet", "images", "pull", f"oci:{oci_env.busybox_layout}:v1")
    assert quiet.returncode == 0 and "DEBUG" not in quiet.stderr, quiet.stderr
    loud = boxlite(tmp_path / "loud", "images", "pull", f"oci:{oci_env.busybox_layout}:v1",
                   env={"BOXLITE_LOG": "debug"})
    assert loud.returncode == 0, loud.stderr
    assert "vmm.images.ext4 DEBUG running " in loud.stderr  # the mkfs command line, to run by hand
    bad = boxlite(tmp_path / "bad", "doctor", env={"BOXLITE_LOG": "loud"})
    assert bad.returncode == 1
    assert bad.stderr == ("error: BOXLITE_LOG='loud' is not a log level: use one of debug, info, warning, error, "
                          "critical\n")


def test_importing_vmm_configures_no_logging() -> None:
    """Only a program's start (the CLI, the plugin, or a call to vmm.log.enable_from_env()) attaches a handler."""
    script = ("import logging, vmm, vmm.log; "
              "assert not logging.getLogger('vmm').handlers; "
              "vmm.log.enable_from_env(); vmm.log.enable_from_env(); "
              "logging.getLogger('vmm.box').debug('seen once')")
    env = dict(os.environ, BOXLITE_LOG="debug", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("vmm.box DEBUG seen once") == 1


def test_pull_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    bad = boxlite(tmp_path, "images", "pull", "Not A Ref")
    assert bad.returncode == 1 and bad.stderr.startswith("error: invalid image reference")
    assert not (tmp_path / "images" / "blobs").exists()


def test_doctor(tmp_path: Path) -> None:
    result = boxlite(tmp_path, "doctor")
    lines = result.stdout.splitlines()
    names = [line.split()[1] for line in lines if line[:4] in ("OK  ", "WARN", "FAIL")]
    assert names == ["KVM", "engine", "qemu", "kernel", "virtiofsd", *["jail:"] * 6, "busybox", "mkfs.ext4",
                     "network", "cache", "home", "snapshots"], result.stderr
    assert "enforced: a network namespace per box" in result.stdout  # the policy's tools are installed here
    jail = {line.split()[2]: line for line in lines if line[6:11] == "jail:"}
    assert jail.keys() == {"seccomp", "no_new_privs", "template", "uid", "mount", "virtiofsd"}
    assert jail["seccomp"].startswith("OK") and "-sandbox on,obsolete=deny" in jail["seccomp"]  # Debian's qemu
    assert "snapshots" in result.stdout and "restored from boot snapshots" in result.stdout  # qemu here
    failed = [line for line in lines if line.startswith("FAIL")]
    assert result.returncode == (1 if failed else 0), result.stdout
    assert lines[-1].startswith("not ready: fix what FAIL says" if failed else "ready: this host runs boxes")
    if failed:  # every failure says how to fix it
        assert "fix:" in result.stdout


@pytest.mark.skipif(not os.path.exists(REPO / ".venv" / "bin" / "boxlite"), reason="console script not installed")
def test_console_script_is_installed(tmp_path: Path) -> None:
    result = subprocess.run([str(REPO / ".venv" / "bin" / "boxlite"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "images" in result.stdout and "doctor" in result.stdout


def test_cache_ls_path_prune(tmp_path: Path) -> None:
    from vmm.volumes import directory_image

    home = tmp_path / "home"
    images = []
    for name, mib in (("old", 1), ("new", 3)):
        src = tmp_path / name
        src.mkdir()
        (src / "data").write_bytes(os.urandom(mib << 20))
        images.append(directory_image(src, home))
    past = time.time() - 3 * 86400
    os.utime(str(images[0]) + ".use", (past, past))
    (home / "templates" / "k.tmp-0123abcd").mkdir(parents=True)  # an interrupted build: its owner is gone

    assert boxlite(home, "cache", "path").stdout == f"{home}\n"
    ls = boxlite(home, "cache", "ls", env={"BOXLITE_CACHE_MAX": "1G"})
    assert ls.returncode == 0, ls.stderr
    header, *rows, summary = ls.stdout.splitlines()
    assert header.split() == ["KIND", "SIZE", "LAST", "USED", "NAME", "FOR"]
    assert [r.split()[0] for r in rows] == ["volume", "volume"]
    assert "just now" in rows[0] and rows[0].endswith(str(tmp_path / "new"))  # most recently used first
    assert "3d ago" in rows[1] and rows[1].endswith(str(tmp_path / "old"))
    assert summary.startswith("2 entries") and "of its 1.0 GiB cap ($BOXLITE_CACHE_MAX)" in summary

    aged = boxlite(home, "cache", "prune", "--older-than", "1")
    assert aged.returncode == 0, aged.stderr
    assert aged.stdout.count("removed volume") == 1 and str(tmp_path / "old") in aged.stdout
    assert not images[0].exists() and images[1].exists()
    assert not (home / "templates" / "k.tmp-0123abcd").exists()
    kept = boxlite(home, "cache", "prune", "--max-size", "1G")
    assert "removed" not in kept.stdout and images[1].exists()
    assert "removed volume" in boxlite(home, "cache", "prune", "--all").stdout and not images[1].exists()
    bad = boxlite(home, "cache", "prune", "--max-size", "lots")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --max-size 'lots' is not a size")
    images_prune = boxlite(home, "images", "prune", "--help").stdout  # still its own command, pointing here
    assert "--max-size GB" in images_prune and "boxlite cache prune" in " ".join(images_prune.split())
