"""The libkrun engine, as far as a host without libkrun and without hardware virtualization allows.

- The cffi declarations are checked against libkrun.h (a copy of its declarations in tests/libkrun/).
- A TEST DOUBLE of libkrun (tests/libkrun/krun_double.c, built here, loaded through BOXLITE_LIBKRUN)
  records the calls it gets and emulates krun_start_enter by exiting. It boots nothing: these tests prove
  the call sequence, the error mapping and the child-process lifecycle, never a guest.
- Booted-VM tests on real libkrun are in test_exec_libkrun.py (they skip where libkrun cannot run).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmm import engines
from vmm.engines import krun_launcher, libkrun, libkrun_ffi, network
from vmm.engines.base import ComposedTree, Disk, LaunchSpec, Share
from vmm.errors import BoxError, EngineUnavailable, LibkrunError
from vmm.options import Port

from .conftest import ROOT

HERE = Path(__file__).resolve().parent / "libkrun"
HEADER = HERE / "libkrun.h"
CC = shutil.which(os.environ.get("CC", "cc"))
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler to build the libkrun test double")


# -- the binding's declarations --------------------------------------------------------------------

def _declarations(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (return type, parameter types without names), whitespace-normalised."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*|#[^\n]*(\\\n[^\n]*)*", " ", text, flags=re.S)
    found = {}
    for ret, name, params in re.findall(r"(\w+)\s+(krun_\w+)\s*\(([^)]*)\)\s*;", text):
        types = []
        for param in " ".join(params.split()).split(","):
            param = param.strip().replace("*", " * ")
            if param in ("", "void"):
                continue
            words = param.split()[:-1]  # drop the parameter name
            types.append(" ".join(words).replace(" * ", "*").replace("* ", "*").replace(" *", "*"))
        found[name] = (ret, tuple(types))
    return found


def test_header_fixture_names_its_source():
    head = HEADER.read_text()[:600]
    assert "containers/libkrun" in head and "include/libkrun.h" in head and re.search(r"commit [0-9a-f]{40}", head)


def test_cdef_matches_libkrun_header():
    ours = _declarations(libkrun_ffi.CDEF)
    theirs = _declarations(HEADER.read_text())
    assert ours, "no declarations parsed from the cdef"
    for name, signature in ours.items():
        assert name in theirs, f"{name} is not declared in libkrun.h"
        assert signature == theirs[name], f"{name}: binding {signature} != libkrun.h {theirs[name]}"


def test_constants_match_libkrun_header():
    defines = dict(re.findall(r"#define (KRUN_\w+) (\d+)\n", HEADER.read_text()))
    assert libkrun_ffi.KERNEL_FORMAT_ELF == int(defines["KRUN_KERNEL_FORMAT_ELF"])
    assert libkrun_ffi.KERNEL_FORMAT_RAW == int(defines["KRUN_KERNEL_FORMAT_RAW"])
    assert libkrun_ffi.DISK_FORMAT == {"raw": int(defines["KRUN_DISK_FORMAT_RAW"]),
                                       "qcow2": int(defines["KRUN_DISK_FORMAT_QCOW2"])}
    assert libkrun_ffi.LOG_LEVEL["debug"] == int(defines["KRUN_LOG_LEVEL_DEBUG"])
    bits = dict(re.findall(r"#define (NET_FEATURE_\w+) 1 << (\d+)", HEADER.read_text()))
    compat = ("CSUM", "GUEST_CSUM", "GUEST_TSO4", "GUEST_UFO", "HOST_TSO4", "HOST_UFO")
    assert libkrun_ffi.NET_FEATURES == sum(1 << int(bits[f"NET_FEATURE_{b}"]) for b in compat)


@needs_cc
@pytest.mark.parametrize("header", [HEADER, Path("/usr/include/libkrun.h"), Path("/usr/local/include/libkrun.h"),
                                    Path("/opt/homebrew/include/libkrun.h")], ids=lambda p: str(p))
def test_cdef_compiles_against_header(tmp_path, header):
    """A C compiler sees the binding's declarations next to the header's: any conflict is an error."""
    if not header.is_file():
        pytest.skip(f"{header} not present")
    check = tmp_path / "check.c"
    check.write_text(f'#include "{header}"\n{libkrun_ffi.CDEF}\n')
    done = subprocess.run([CC, "-fsyntax-only", "-Werror", str(check)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- the test double --------------------------------------------------------------------------------

def _build(out: Path, *defines: str) -> Path:
    subprocess.run([CC, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", *defines, "-o", str(out),
                    str(HERE / "krun_double.c")], check=True)
    return out


@pytest.fixture(scope="session")
def krun_double_path(tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler to build the libkrun test double")
    return _build(tmp_path_factory.mktemp("krun-double") / "libkrun-double.so")


@pytest.fixture
def krun_double(krun_double_path, tmp_path, monkeypatch):
    """BOXLITE_LIBKRUN points at the double; returns the call log it writes."""
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("BOXLITE_LIBKRUN", str(krun_double_path))
    monkeypatch.setenv("KRUN_DOUBLE_LOG", str(calls))
    for name in ("KRUN_DOUBLE_FAIL", "KRUN_DOUBLE_CONNECT", "KRUN_DOUBLE_SLEEP", "KRUN_DOUBLE_EXIT", "BOXLITE_LOG"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _calls(log: Path) -> list[list[str]]:
    return [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []


def _spec(tmp_path: Path, **kw) -> LaunchSpec:
    # The vmlinux lives where vmm.kernel puts it; a release with no /boot/config-* skips the config check.
    kdir = tmp_path / "kernels" / "0.0-double-0000000000000000"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    (kdir / "initramfs.cpio").write_bytes(b"070701")
    base = tmp_path / "base.ext4"
    base.write_bytes(bytes(4096))
    args = dict(box_dir=tmp_path / "box", vmlinux=kdir / "vmlinux", initramfs=kdir / "initramfs.cpio", cpus=2,
                memory_mib=256, disks=(Disk(base, "boxlite-root", readonly=True),))
    args.update(kw)
    return LaunchSpec(**args)


def _engine(timeout: float = 10.0) -> libkrun.LibkrunEngine:
    return libkrun.LibkrunEngine(libkrun_ffi.load(), connect_timeout=timeout)


def test_double_records_the_call_sequence_for_a_launch_spec(krun_double, tmp_path, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_CONNECT", "1")
    monkeypatch.setenv("KRUN_DOUBLE_SLEEP", "hang")
    upper = tmp_path / "upper.qcow2"
    upper.write_bytes(bytes(512))
    ro_dir, rw_dir = tmp_path / "ro", tmp_path / "rw"
    ro_dir.mkdir(), rw_dir.mkdir()
    _spec(tmp_path)  # writes base.ext4
    spec = _spec(tmp_path, disks=(Disk(tmp_path / "base.ext4", "boxlite-root", True),
                                  Disk(upper, "boxlite-upper", False, "qcow2")),
                 shares=(Share("vol0", ro_dir, True), Share("vol1", rw_dir, False)))
    vm = _engine().launch(spec)
    try:
        assert vm.poll() is None
        calls = _calls(krun_double)
        ctx = "7"  # what the double's krun_create_ctx returned
        cmdline = calls[3][5]
        assert [c[0] for c in calls] == [
            "krun_set_log_level", "krun_create_ctx", "krun_set_vm_config", "krun_set_kernel",
            "krun_set_console_output", "krun_add_disk2", "krun_add_disk2", "krun_add_virtiofs3",
            "krun_add_virtiofs", "krun_add_vsock_port2", "krun_start_enter"]
        assert calls[0] == ["krun_set_log_level", "1"]
        assert calls[2] == ["krun_set_vm_config", ctx, "2", "256"]
        assert calls[3][:5] == ["krun_set_kernel", ctx, str(spec.vmlinux), "1", str(spec.initramfs)]
        assert "boxlite.vsock=1024" in cmdline.split() and "boxlite.modules=vsock,fs" in cmdline.split()
        assert calls[4] == ["krun_set_console_output", ctx, str(spec.console_log)]
        assert calls[5] == ["krun_add_disk2", ctx, "boxlite-root", str(tmp_path / "base.ext4"), "0", "1"]
        assert calls[6] == ["krun_add_disk2", ctx, "boxlite-upper", str(upper), "1", "0"]
        assert calls[7] == ["krun_add_virtiofs3", ctx, "vol0", str(ro_dir), "0", "1"]
        assert calls[8] == ["krun_add_virtiofs", ctx, "vol1", str(rw_dir)]
        assert calls[9] == ["krun_add_vsock_port2", ctx, "1024", str(spec.box_dir / "channel.sock"), "0"]
        assert calls[10] == ["krun_start_enter", ctx]
        # The channel is the connection libkrun made to the socket it was given (here: the double's).
        assert vm.channel.getpeername() == "" and vm.channel.fileno() >= 0
        assert not (spec.box_dir / "channel.sock").exists()  # the listener is gone once connected
        assert vm.disk_serial("boxlite-root") == libkrun.guest_disk_serial(tmp_path / "base.ext4")
    finally:
        vm.kill()


def test_double_sees_the_network_device_and_passt_gets_the_ports(krun_double, tmp_path, monkeypatch):
    passt_args = tmp_path / "passt.args"
    fake_passt = tmp_path / "passt-double"  # a stand-in for passt: records its argv, then waits
    fake_passt.write_text(f'#!/bin/sh\necho "$@" > {passt_args}\nexec sleep 1000\n')
    fake_passt.chmod(0o755)
    monkeypatch.setenv("BOXLITE_PASST", str(fake_passt))
    monkeypatch.setenv("KRUN_DOUBLE_CONNECT", "1")
    monkeypatch.setenv("KRUN_DOUBLE_SLEEP", "hang")
    vm = _engine().launch(_spec(tmp_path, network="full", ports=(Port(8080, 80),)))
    try:
        net = next(c for c in _calls(krun_double) if c[0] == "krun_add_net_unixstream")
        assert net[2] == "NULL" and int(net[3]) >= 3 and net[4] == "52:54:00:12:34:56"
        assert int(net[5]) == libkrun_ffi.NET_FEATURES
        cmdline = next(c for c in _calls(krun_double) if c[0] == "krun_set_kernel")[5]
        assert "boxlite.modules=vsock,net" in cmdline.split()
        deadline = time.monotonic() + 5
        while not passt_args.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        argv = passt_args.read_text().split()
        assert "--tcp-ports" in argv and "127.0.0.1/8080:80" in argv
        assert argv[argv.index("--address") + 1] == "10.0.2.15"
        assert len(vm.helpers) == 1 and vm.helpers[0].poll() is None
    finally:
        vm.kill()
    assert vm.helpers[0].poll() is not None  # passt ends with the VM


@pytest.mark.skipif(bool(network.missing_tools()) or os.geteuid() != 0, reason="needs root, pasta and nft")
def test_internet_runs_passt_in_the_policy_namespace(krun_double, tmp_path, monkeypatch):
    seen = tmp_path / "passt.netns"
    fake_passt = tmp_path / "passt-double"  # a stand-in for passt (pasta is real): says where it runs, waits
    fake_passt.write_text(f'#!/bin/sh\nreadlink /proc/self/ns/net > {seen}.tmp && mv {seen}.tmp {seen}\n'
                          'exec sleep 1000\n')
    fake_passt.chmod(0o755)
    monkeypatch.setenv("BOXLITE_PASST", str(fake_passt))
    monkeypatch.setenv("KRUN_DOUBLE_CONNECT", "1")
    monkeypatch.setenv("KRUN_DOUBLE_SLEEP", "hang")
    vm = _engine().launch(_spec(tmp_path, network="internet", host_ports=(5432,)))
    try:
        deadline = time.monotonic() + 5
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen.read_text().strip() != os.readlink("/proc/self/ns/net")  # not the host's network
        pasta, passt = vm.helpers
        assert "pasta" in pasta.args[0] and "--tcp-ns" in pasta.args and "5432" in pasta.args
        assert (tmp_path / "box" / "network.nft").exists()
    finally:
        vm.kill()
    assert pasta.poll() is not None and passt.poll() is not None  # both end with the VM


def test_double_error_becomes_libkrun_error_naming_call_and_errno(krun_double, tmp_path, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_FAIL", "krun_add_disk2")
    spec = _spec(tmp_path)
    with pytest.raises(LibkrunError) as caught:
        _engine().launch(spec)
    assert caught.value.call == "krun_add_disk2" and caught.value.errno == 22
    assert "krun_add_disk2 failed: EINVAL (Invalid argument)" in str(caught.value)
    names = [c[0] for c in _calls(krun_double)]
    assert names[-2:] == ["krun_add_disk2", "krun_free_ctx"]  # nothing after the failed call, then cleanup
    assert not (spec.box_dir / "channel.sock").exists()
    assert _launchers(krun_double) == []


def test_binding_maps_negative_returns_directly(krun_double, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_FAIL", "krun_set_vm_config")
    monkeypatch.setenv("KRUN_DOUBLE_ERRNO", "12")
    lib = libkrun_ffi.load()
    ctx = lib.call("krun_create_ctx")
    with pytest.raises(LibkrunError, match=r"krun_set_vm_config failed: ENOMEM \(Cannot allocate memory\)"):
        lib.call("krun_set_vm_config", ctx, 1, 128)
    assert lib.call("krun_free_ctx", ctx) == 0


def test_double_vm_exit_code_is_seen_by_poll_and_wait(krun_double, tmp_path, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_CONNECT", "1")
    monkeypatch.setenv("KRUN_DOUBLE_SLEEP", "0.5")
    monkeypatch.setenv("KRUN_DOUBLE_EXIT", "42")
    vm = _engine().launch(_spec(tmp_path))
    try:
        assert vm.poll() is None
        assert vm.wait(10) == 42
        assert vm.poll() == 42
    finally:
        vm.kill()


def test_double_kill_ends_a_hung_start_enter(krun_double, tmp_path, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_CONNECT", "1")
    monkeypatch.setenv("KRUN_DOUBLE_SLEEP", "hang")
    vm = _engine().launch(_spec(tmp_path))
    assert vm.wait(0.3) is None
    vm.kill()
    assert vm.poll() == -signal.SIGKILL
    assert vm.channel.fileno() == -1


def test_double_exit_before_the_guest_connects_is_a_clear_error(krun_double, tmp_path, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_EXIT", "1")
    with pytest.raises(BoxError, match="libkrun exited with status 1 before the guest agent connected"):
        _engine().launch(_spec(tmp_path))


def test_double_no_connection_times_out_and_the_child_is_killed(krun_double, tmp_path, monkeypatch):
    monkeypatch.setenv("KRUN_DOUBLE_SLEEP", "hang")
    started = time.monotonic()
    with pytest.raises(BoxError, match="did not connect within"):
        _engine(timeout=0.5).launch(_spec(tmp_path))
    assert time.monotonic() - started < 5
    assert _launchers(krun_double) == []


def _launchers(log: Path) -> list[int]:
    """Live processes whose environment names this test's call log: its launcher children."""
    marker = f"KRUN_DOUBLE_LOG={log}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0")
                    and _alive(int(entry.name))):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


PARENT = """
import sys, time
from pathlib import Path
from tests.test_libkrun import _spec, _engine
vm = _engine().launch(_spec(Path(sys.argv[1])))
print(vm.pid, flush=True)
time.sleep(1000)
"""


def test_double_parent_death_kills_the_child(krun_double, tmp_path, monkeypatch, child_env):
    child_env.update(KRUN_DOUBLE_CONNECT="1", KRUN_DOUBLE_SLEEP="hang", BOXLITE_LIBKRUN=os.environ["BOXLITE_LIBKRUN"],
                     KRUN_DOUBLE_LOG=str(krun_double))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=ROOT, env=child_env,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the libkrun launcher outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent (here: init) has not reaped it yet


# -- options libkrun cannot honour -----------------------------------------------------------------

def test_udp_ports_are_refused_before_start(krun_double, tmp_path):
    with pytest.raises(EngineUnavailable, match="tcp ports only"):
        _engine().launch(_spec(tmp_path, network="full", ports=(Port(5353, 53, "udp"),)))
    assert not _calls(krun_double)


def test_old_libkrun_cannot_share_read_only(krun_double_path, tmp_path, monkeypatch):
    old = _build(tmp_path / "libkrun-double-old.so", "-DKRUN_DOUBLE_OLD")
    monkeypatch.setenv("BOXLITE_LIBKRUN", str(old))
    lib = libkrun_ffi.load()
    assert not lib.has("krun_add_virtiofs3") and lib.has("krun_add_virtiofs") and lib.missing() == []
    with pytest.raises(EngineUnavailable, match="cannot share a volume read-only"):
        libkrun.check_spec(_spec(tmp_path, shares=(Share("vol0", tmp_path, True),)), lib)
    libkrun.check_spec(_spec(tmp_path, shares=(Share("vol0", tmp_path, False),)), lib)  # rw is fine


def test_kernel_without_cmdline_mmio_devices_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(libkrun.platform, "machine", lambda: "x86_64")
    spec = _spec(tmp_path)
    release = spec.vmlinux.parent.name.rsplit("-", 1)[0]
    config = tmp_path / f"config-{release}"
    config.write_text("# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n")
    with pytest.raises(EngineUnavailable, match="CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"):
        libkrun._check_kernel_config(spec, boot=tmp_path)
    config.write_text("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n")
    libkrun._check_kernel_config(spec, boot=tmp_path)


def test_the_host_image_is_refused_before_start(krun_double, tmp_path):
    tree = ComposedTree(binds=("/usr",))
    with pytest.raises(EngineUnavailable, match="host image is not available on the libkrun engine"):
        libkrun.check_spec(_spec(tmp_path, shares=(Share("hostroot", tmp_path, True, tree),)), None)


def test_auto_skips_libkrun_for_a_kernel_it_cannot_boot(krun_double, monkeypatch):
    monkeypatch.setattr(engines, "hardware_virtualization", lambda: (True, "hardware KVM (test)"))
    monkeypatch.setattr(libkrun, "kernel_problem", lambda release, boot=None: f"{release} lacks it (test)")
    assert engines.select("auto", "6.1.0-test").name.startswith("qemu")
    with pytest.raises(EngineUnavailable, match="6.1.0-test lacks it"):
        engines.select("libkrun", "6.1.0-test")


# -- selection ---------------------------------------------------------------------------------------

def test_select_libkrun_where_it_is_not_installed_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("BOXLITE_LIBKRUN", str(tmp_path / "libkrun.so.1"))
    with pytest.raises(EngineUnavailable) as caught:
        engines.select("libkrun")
    assert "libkrun not installed" in str(caught.value) and "dnf install libkrun" in str(caught.value)
    assert "brew install libkrun" in str(caught.value)


def test_select_libkrun_without_hardware_virtualization_says_so(krun_double):
    if engines.hardware_virtualization()[0]:
        pytest.skip("this host has hardware virtualization")
    with pytest.raises(EngineUnavailable, match="no hardware virtualization: libkrun needs KVM or HVF"):
        engines.select("libkrun")


def test_auto_prefers_libkrun_only_where_it_can_run(krun_double, monkeypatch):
    monkeypatch.setattr(engines, "hardware_virtualization", lambda: (True, "hardware KVM (test)"))
    assert engines.select("auto").name == "libkrun"
    monkeypatch.setattr(engines, "hardware_virtualization", lambda: (False, "none (test)"))
    try:
        assert engines.select("auto").name.startswith("qemu")
    except EngineUnavailable as exc:  # no qemu on this host: the error is qemu's, libkrun was skipped
        assert "qemu" in str(exc)


def test_report_names_every_engine_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("BOXLITE_LIBKRUN", str(tmp_path / "missing.so"))
    statuses = {s.name: s for s in engines.report()}
    assert set(statuses) == {"libkrun", "qemu-kvm", "qemu-tcg"}
    assert not statuses["libkrun"].usable and "libkrun not installed" in statuses["libkrun"].reason
    assert all(s.reason for s in statuses.values())


def test_launcher_reports_a_missing_library(tmp_path, monkeypatch, child_env):
    """The launcher child itself turns a load failure into a status line, not a traceback."""
    child_env["BOXLITE_LIBKRUN"] = str(tmp_path / "nothing.so")
    script = textwrap.dedent("""
        import os, json
        from vmm.engines import krun_launcher
        r, w = os.pipe()
        code = krun_launcher.run({"calls": [["krun_create_ctx"]]}, w)
        os.close(w)
        print(code, os.read(r, 4096).decode())
    """)
    out = subprocess.run([sys.executable, "-c", script], env=child_env, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.startswith(f"{krun_launcher.EXIT_CONFIG} ") and "libkrun not installed" in out.stdout
