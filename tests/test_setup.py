"""`boxlite setup` and the list of system packages behind it (vmm/hostpackages.py)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.installed import user_env
from vmm import hostpackages
from vmm.hostpackages import AGENT, DEV, RUNTIME, Distro

from .conftest import vm_processes

REPO = Path(__file__).resolve().parent.parent
HIDDEN = ("qemu-system-x86", "mmdebstrap")  # what the tests' dpkg database lacks


def names(host: Distro, groups=(RUNTIME,)) -> list[str]:
    return [n.package for n in hostpackages.needs(host, groups)]


@pytest.mark.parametrize("os_release, expected", [
    ('ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n', Distro("debian", (12,), "debian")),
    ('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_ID="13"\n',
     Distro("debian", (13,), "Debian GNU/Linux 13 (trixie)")),
    ("ID=debian\nVERSION_CODENAME=forky\n", Distro("debian", (), "debian")),  # testing: no VERSION_ID
    ('ID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\n', Distro("ubuntu", (24, 4), "ubuntu")),
    ('ID=raspbian\nID_LIKE=debian\nVERSION_ID="12"\n', Distro("debian", (12,), "raspbian")),
    ("ID=fedora\nVERSION_ID=41\n", Distro("fedora", (41,), "fedora")),
])
def test_the_distribution_comes_from_os_release(tmp_path: Path, os_release: str, expected: Distro):
    (tmp_path / "os-release").write_text(os_release)
    assert hostpackages.distro(tmp_path / "os-release") == expected


def test_package_names_follow_the_release():
    bookworm, trixie = Distro("debian", (12,), ""), Distro("debian", (13,), "")
    jammy, noble = Distro("ubuntu", (22, 4), ""), Distro("ubuntu", (24, 4), "")
    for host in (bookworm, trixie, jammy, noble):
        assert {"qemu-system-x86", "qemu-utils", "busybox-static", "e2fsprogs", "mmdebstrap"} <= set(names(host))
        assert not {"gcc", "docker-registry"} & set(names(host))  # not what a user of the wheel needs
        assert all(n.purpose for n in hostpackages.needs(host, (RUNTIME, AGENT, DEV)))
    assert "linux-image-cloud-amd64" in names(bookworm) and "linux-image-cloud-amd64" in names(trixie)
    # Debian 13 and Ubuntu 24.04 package virtiofsd on its own; before, qemu's packages bring it.
    assert "virtiofsd" in names(trixie) and "virtiofsd" in names(noble)
    assert "virtiofsd" not in names(bookworm) and "virtiofsd" not in names(jammy)
    (kernel,) = [n for n in hostpackages.needs(noble) if n.purpose.startswith("the guest kernel")]
    assert kernel.packages == ("linux-image-virtual", "linux-image-kvm")
    assert {"gcc", "libc6-dev"} <= set(names(bookworm, (RUNTIME, AGENT)))
    assert {"docker-registry", "skopeo", "umoci", "make"} <= set(names(bookworm, (RUNTIME, AGENT, DEV)))


@pytest.fixture
def dpkg_lacking_packages() -> Path:
    """A copy of this host's dpkg database without HIDDEN (dpkg-query reads $DPKG_ADMINDIR), readable by all."""
    admindir = Path(tempfile.mkdtemp(prefix="dpkg-"))
    os.chmod(admindir, 0o755)
    stanzas = Path("/var/lib/dpkg/status").read_text().split("\n\n")
    kept = [s for s in stanzas if not re.match(rf"Package: ({'|'.join(HIDDEN)})\n", s)]
    assert len(kept) == len(stanzas) - len(HIDDEN)
    (admindir / "status").write_text("\n\n".join(kept))
    os.chmod(admindir / "status", 0o644)
    yield admindir
    subprocess.run(["rm", "-rf", str(admindir)], check=True)


def test_setup_prints_the_apt_get_command_when_told_not_to_install(dpkg_lacking_packages: Path, tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "vmm.cli", "--home", str(tmp_path / "home"), "setup",
                           "--no-install"], env=dict(os.environ, DPKG_ADMINDIR=str(dpkg_lacking_packages)),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "apt-get update && apt-get install -y --no-install-recommends qemu-system-x86 mmdebstrap\n" in done.stdout
    assert re.search(r"qemu-system-x86 +QEMU, the virtual machine monitor", done.stdout)
    assert re.search(r"mmdebstrap +builds the default image", done.stdout)
    assert "then run `boxlite setup` again" in done.stderr
    assert "== the default image" not in done.stdout  # it stopped there


def test_a_user_without_root_gets_the_sudo_command(dpkg_lacking_packages: Path):
    """The system python3, not root, before any venv exists: as tools/install-system-packages runs the list."""
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
                           "-I", str(REPO / "vmm" / "hostpackages.py"), "--dev"],
                          env=dict(os.environ, DPKG_ADMINDIR=str(dpkg_lacking_packages)), cwd="/",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("sudo apt-get update && sudo apt-get install -y --no-install-recommends qemu-system-x86 mmdebstrap\n"
            in done.stdout)


def test_setup_on_a_ready_host(installed_venv: Path, tmp_path: Path):
    """Run from the installed wheel, as a user would after `pip install pytest-boxlite`."""
    done = subprocess.run([installed_venv.parent / "boxlite", "setup"], env=user_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"nothing to install: qemu-system-x86, .*mmdebstrap.* are installed", out)
    assert "gcc" not in out.split("nothing to install")[1].split("\n")[0]  # the wheel ships the agent
    assert re.search(r"default image: sha256:[0-9a-f]{64}", out)
    assert re.search(r"boot snapshot: (restored from it|saved it, then restored a box from it)", out)
    assert out.rstrip().endswith("ready: this host runs boxes") or "ready: this host runs boxes (with" in out


def test_interrupted_setup_leaves_nothing_half_built(runtime, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "images").symlink_to(runtime.home.images)  # the session's images; no boot snapshot yet
    argv = [sys.executable, "-m", "vmm.cli", "--home", str(home), "setup"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("saving a boot snapshot"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted: nothing half-built is kept" in err
    assert "Traceback" not in err
    assert not vm_processes(str(home))
    assert not [p.name for p in (home / "templates").iterdir()
                if ".tmp-" in p.name or not (p / "template.json").exists() and p.is_dir()]
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "boot snapshot: saved it, then restored a box from it" in again.stdout


def test_sudo_setup_hands_the_home_to_the_user(runtime, tmp_path: Path):
    """`sudo boxlite setup` builds as root, then the user who ran sudo owns the home (and runs the boxes), but
    not the image root trees: their files keep their owners, which the images' ext4 bases copy."""
    home = tmp_path / "home"
    images = home / "images"
    (images / "default").mkdir(parents=True)
    (images / "bases").symlink_to(runtime.home.images / "bases")  # the session's image, without a rebuild
    shutil.copy(runtime.home.images / "index.json", images / "index.json")
    for built in (runtime.home.images / "default").iterdir():
        if built.is_dir():
            (images / "default" / built.name).symlink_to(built)
    tree = images / "default" / "another-release" / "rootfs"  # an image root tree made by root
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "shadow").write_text("root:*:1::::::\n")
    nobody = pwd.getpwnam("nobody")
    done = subprocess.run([sys.executable, "-m", "vmm.cli", "--home", str(home), "setup"], cwd=REPO,
                          env=dict(os.environ, SUDO_UID=str(nobody.pw_uid), SUDO_GID=str(nobody.pw_gid)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{home} handed over to nobody" in done.stdout
    owners = {str(p.relative_to(home)): p.lstat().st_uid for p in home.rglob("*")}
    assert {p for p, uid in owners.items() if uid != nobody.pw_uid} == {
        "images/default/another-release/rootfs", "images/default/another-release/rootfs/etc",
        "images/default/another-release/rootfs/etc/shadow"}
    assert any(p.startswith("templates/") for p in owners)  # the boot snapshot, the user's too
    assert home.stat().st_uid == nobody.pw_uid
