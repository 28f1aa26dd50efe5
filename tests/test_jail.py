"""The VMM jail (vmm/engines/jail.py, docs/security-vmm.md), read from /proc of the running qemu and
virtiofsd of real boxes: a booted box, a box restored from its boot snapshot, a box with a virtiofs volume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmm import Box, BoxOptions, Runtime, Volume, process
from vmm.engines import jail
from vmm.engines.base import ProcessVM
from vmm.engines.qemu import find_qemu
from vmm.engines.qemu_features import QemuFeatures, probe
from vmm.errors import ConfigError

ROOT_RUNNER = os.geteuid() == 0
HOME = Path(os.path.expanduser("~")).resolve()


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def assert_confined(pid: int) -> dict[str, str]:
    fields = status(pid)
    assert fields["Seccomp"] == "2", f"{fields['Name']} runs without a seccomp filter"
    assert fields["NoNewPrivs"] == "1"
    return fields


def vm(box: Box) -> ProcessVM:
    running = box._vm
    assert isinstance(running, ProcessVM), "the box is not running"
    return running


def assert_qemu_jailed(box: Box, other_box: Box | None = None) -> Path:
    """The box's qemu: seccomp, no_new_privs, not root, and a root holding its own files only."""
    fields = assert_confined(vm(box).pid)
    assert fields["Name"].startswith("qemu-system")
    uids = fields["Uid"].split()
    if ROOT_RUNNER:
        assert "0" not in uids, f"qemu runs as root: Uid {uids}"
        assert fields["CapEff"] == "0000000000000000"
    root = Path(f"/proc/{vm(box).pid}/root")
    seen = root / str(box.directory).lstrip("/")
    assert (seen / "box.json").is_file() and (seen / "console.log").is_file()
    if ROOT_RUNNER:  # the mount namespace needs root
        # Of the runner's home, only the way down to the runtime's files (the runtime home may be in it).
        needed = {str(p.relative_to(HOME)).split("/")[0] for p in (box.directory, vm(box).spec.vmlinux)
                  if p.is_relative_to(HOME)}
        seen_home = root / str(HOME).lstrip("/")
        assert not seen_home.exists() or {p.name for p in seen_home.iterdir()} <= needed, f"{HOME} is visible"
        assert not (root / "etc").exists() and not (root / "proc").exists()
        if other_box is not None:
            assert other_box.directory.is_dir()
            assert not (root / str(other_box.directory).lstrip("/")).exists(), "another box's directory is visible"
    return root


def features(sandbox: frozenset[str] = frozenset(jail.SANDBOX_OPTIONS),
             ram_file_options: frozenset[str] = frozenset({"readonly", "rom", "share"})) -> QemuFeatures:
    return QemuFeatures("/usr/bin/qemu-system-x86_64", frozenset(), frozenset(), None, False, None, sandbox,
                        ram_file_options)


def test_jail_off_is_said_and_on_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(jail.ENV, raising=False)
    assert jail.enabled()
    monkeypatch.setenv(jail.ENV, "0")
    assert [p.active for p in jail.status(features())] == [False]
    monkeypatch.setenv(jail.ENV, "perhaps")
    with pytest.raises(ConfigError, match="BOXLITE_JAIL='perhaps'.*say 1"):
        jail.enabled()
    monkeypatch.setenv(jail.ENV, "1")
    monkeypatch.setenv(jail.UID_ENV, "12")
    with pytest.raises(ConfigError, match="BOXLITE_JAIL_UID_BASE='12'"):
        jail.uid_base()


def test_status_says_why_a_part_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(jail.ENV, raising=False)
    parts = {p.name: p for p in jail.status(features(sandbox=frozenset(), ram_file_options=frozenset({"share"})))}
    assert not parts["seccomp"].active and "without seccomp" in parts["seccomp"].detail
    assert not parts["template RAM"].active and "read-write" in parts["template RAM"].detail
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(process, "which", lambda tool: None if tool == "pivot_root" else f"/usr/bin/{tool}")
    jail.namespace_problem.cache_clear()  # asked again, as a uid 1000 runner without pivot_root
    try:
        parts = {p.name: p for p in jail.status(features())}
    finally:
        jail.namespace_problem.cache_clear()
    assert parts["uid"].active and "not root" in parts["uid"].detail
    assert not parts["mount namespace"].active
    assert parts["mount namespace"].detail == "pivot_root missing: install util-linux and mount"


# Run as an unprivileged user: a box restored from its boot snapshot, and what /proc says of its qemu.
UNPRIVILEGED_RUN = """
import json, os, sys
from pathlib import Path
from vmm import BoxOptions, Runtime
with Runtime() as rt, rt.create(BoxOptions()) as box:
    pid = box._vm.pid
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    json.dump({"echo": box.exec("echo", "hi").stdout.decode(), "restored": box._vm.spec.restore_state is not None,
               "uid": os.getuid(), "pid": pid, "box_dir": str(box.directory),
               **{k: fields[k].split() for k in ("Uid", "Seccomp", "NoNewPrivs", "CapEff")},
               "root": sorted(os.listdir(f"/proc/{pid}/root")),
               "ram_file_seen": os.path.isfile(f"/proc/{pid}/root{box._vm.spec.ram_file}")}, sys.stdout)
"""


def readable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o004) and all(p.stat().st_mode & 0o001 for p in path.parents)


@pytest.mark.skipif(not ROOT_RUNNER, reason="needs root to run a box as another, unprivileged user")
@pytest.mark.skipif(not readable_by_others(Path(sys.executable)) or not readable_by_others(Path(__file__)),
                    reason="this checkout and its venv are not readable by other users (in /root?)")
def test_unprivileged_runner_gets_a_jailed_qemu(runtime: Runtime) -> None:
    """A runner that is not root (nobody): qemu keeps its uid, with seccomp, no_new_privs, no capabilities,
    and a mount namespace (in a user namespace) that holds its VM's files only."""
    home = Path(tempfile.mkdtemp(prefix="boxlite-unprivileged-"))  # in /tmp: reachable by nobody
    try:
        # The built default image (nobody does not build it): cp keeps the image files sparse.
        subprocess.run(["cp", "-a", "--sparse=always", *(str(runtime.home.root / part) for part in
                                                         ("images", "kernels", "agent")), str(home)], check=True)
        subprocess.run(["chown", "-R", "nobody:nogroup", str(home)], check=True)
        env = {**os.environ, "BOXLITE_HOME": str(home), "HOME": str(home)}
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                               "-c", UNPRIVILEGED_RUN], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        facts = json.loads(done.stdout)
    finally:
        shutil.rmtree(home)
    assert facts["echo"] == "hi\n" and facts["restored"] and facts["uid"] == 65534
    assert facts["Uid"] == ["65534"] * 4 and facts["Seccomp"] == ["2"] and facts["NoNewPrivs"] == ["1"]
    assert facts["CapEff"] == ["0000000000000000"]
    # Its root: /usr (and the links into it), /dev, and the path down to its own files.
    assert facts["root"] == sorted(["bin", "dev", "lib", "lib64", "sbin", "tmp", "usr"]), facts["root"]
    assert facts["ram_file_seen"]
    assert not Path(facts["box_dir"]).exists(), "the run left its box behind"


def test_booted_box_runs_jailed(runtime: Runtime, shared_box: Box) -> None:
    with runtime.create(BoxOptions(snapshots=False)) as box:
        assert box._template is None
        assert box.exec("echo", "booted").stdout == b"booted\n"
        root = assert_qemu_jailed(box, other_box=shared_box)
        assert (root / str(vm(box).spec.vmlinux).lstrip("/")).is_file()  # what it needs is there


def test_restored_box_runs_jailed(runtime: Runtime, shared_box: Box) -> None:
    with runtime.create(BoxOptions()) as box:
        assert box.exec("echo", "restored").stdout == b"restored\n"
        root = assert_qemu_jailed(box, other_box=shared_box)
        spec = vm(box).spec
        assert spec.restore_state is not None and spec.ram_file is not None, "not restored from a boot snapshot"
        ram = spec.ram_file
        if ROOT_RUNNER:  # its template's RAM, at the path the template was saved with
            assert (root / str(ram).lstrip("/")).is_file()


def test_box_with_a_volume_runs_jailed(runtime: Runtime, shared_box: Box, tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("shared")
    with runtime.create(BoxOptions(volumes=(Volume(str(tmp_path), "/mnt/v", "rw"),))) as box:
        assert box.exec("cat", "/mnt/v/marker").stdout == b"shared"
        # What the guest's root writes lands as the shared directory's owner, as with a root virtiofsd.
        box.exec("sh", "-c", "echo new > /mnt/v/new && mkdir /mnt/v/d && chmod 600 /mnt/v/new")
        for made in (tmp_path / "new", tmp_path / "d"):
            assert (made.stat().st_uid, made.stat().st_gid) == (tmp_path.stat().st_uid, tmp_path.stat().st_gid)
        assert (tmp_path / "new").read_text() == "new\n"
        assert_qemu_jailed(box, other_box=shared_box)
        # Its helpers: virtiofsd, and pasta (the network policy's way out).
        (helper,) = [h for h in vm(box).helpers if "virtiofsd" in Path(f"/proc/{h.pid}/cmdline").read_text()]
        # virtiofsd forks its worker into its own namespaces (sandbox=namespace): the worker serves the files.
        worker = [helper.pid, *children(helper.pid)][-1]
        fields = assert_confined(worker)
        # Not root, and not its qemu's uid (which could then ptrace it); as root where this file system has no
        # idmapped mounts or no user namespaces (in a chroot: Debian 13's stage), as the log says.
        if ROOT_RUNNER and jail.idmap_problem(tmp_path) is None:
            for pid in (helper.pid, worker):
                uids = status(pid)["Uid"].split()
                assert "0" not in uids, f"virtiofsd runs as root: Uid {uids}"
                assert uids[0] != status(vm(box).pid)["Uid"].split()[0]
            # Its capabilities are those of its own user namespace's root: none on the host.
            assert Path(f"/proc/{worker}/ns/user").resolve() != Path("/proc/self/ns/user").resolve()
        root = Path(f"/proc/{worker}/root")
        assert sorted(p.name for p in root.iterdir()) == ["d", "marker", "new"], "virtiofsd's root is not the volume"
        assert fields["CapEff"] != "000001ffffffffff", "virtiofsd kept every capability"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_clone_cannot_change_its_templates_ram(runtime: Runtime) -> None:
    with runtime.create(BoxOptions()) as box:
        spec = vm(box).spec
        assert spec.restore_state is not None and spec.ram_file is not None, "not restored from a boot snapshot"
        ram = spec.ram_file
        before = sha256(ram)
        # 200 MiB of the box's 512 written (its /dev/shm is guest RAM), then read back.
        done = box.exec("sh", "-c", "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=200 2>/dev/null && "
                                    "wc -c < /dev/shm/fill")
        assert done.stdout.strip() == str(200 << 20).encode(), done.stderr
        pid = vm(box).pid
        ram_id = (ram.stat().st_dev, ram.stat().st_ino)
        (fd,) = [fd for fd in Path(f"/proc/{pid}/fd").iterdir() if (fd.stat().st_dev, fd.stat().st_ino) == ram_id]
        flags = int(dict(line.split(":\t") for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                         if ":\t" in line)["flags"], 8)
        if probe(find_qemu()).private_ram_read_only():  # qemu 8.2+: readonly=on,rom=off
            assert flags & os.O_ACCMODE == os.O_RDONLY, "the clone's qemu has its template's RAM file open to write"
            if ROOT_RUNNER:  # and in its mount namespace, a read-only bind
                (mount,) = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                            if line.split()[4] == str(ram)]
                assert "ro" in mount[5].split(","), mount
        else:  # qemu 7.2 opens it read-write even to map it copy-on-write (docs/security-vmm.md)
            assert flags & os.O_ACCMODE == os.O_RDWR
    assert sha256(ram) == before, "a restored clone changed its template's RAM file"


def test_jail_can_be_turned_off(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jail.ENV, "0")
    with runtime.create(BoxOptions()) as box:  # restored from the boot snapshot a jailed box saved
        fields = status(vm(box).pid)
        assert fields["Seccomp"] == "0" and fields["Uid"].split()[0] == str(os.geteuid())
        assert Path(f"/proc/{vm(box).pid}/root/{box.directory.parent}").is_dir()
