"""A hostile guest cannot hang or crash the host side, nor grow its memory, and no VM process outlives its run.

The hostile guests are real VMs whose PID 1 is a test-only agent (tests/hostile/flood_agent.c, through
BOXLITE_AGENT) that does the handshake and then floods the channel with what the protocol does not allow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmm import BoxOptions, EngineUnavailable, GuestProtocolError, Runtime, kernel

from .conftest import ROOT, vm_processes

pytest_plugins = ["pytester"]

RSS_BOUND = 64 << 20  # the flood is 256 MiB: held by the host, it would show far above this
FLOODS = {
    "stream0": r"the guest sent PONG on the control stream after READY",
    "unopened": r"more than 64 frames for streams that are not open",
    "credit": r"the guest sent output beyond its flow-control window",
    "garbage": r"guest sent (a frame of \d+ bytes|unknown frame type|a host-only frame type)",
}


@pytest.fixture(scope="session")
def flood_agent(runtime, tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("hostile") / "flood-agent"
    subprocess.run([os.environ.get("CC", "cc"), "-static", "-O2", "-o", str(binary),
                    str(ROOT / "tests" / "hostile" / "flood_agent.c")], check=True)
    # Its initramfs is built now, not inside the measurement (unpacking the kernel takes memory of its own).
    kernel.boot_files(runtime.home.kernels, runtime.kernel, binary)
    return binary


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_a_flooding_guest_is_cut_off_with_the_host_memory_bounded(runtime, flood_agent, monkeypatch, flood):
    monkeypatch.setenv("BOXLITE_AGENT", str(flood_agent))
    box = runtime.create(BoxOptions(name=flood, network=False, snapshots=False))  # the agent reads its mode
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from here
    before = _status_kib("VmHWM")
    with pytest.raises(GuestProtocolError) as caught:
        with box:
            execution = box.spawn("anything")  # stream 1, which the `credit` flood targets
            # Not reading its output: the host stops granting credit, and the flood overruns the window.
            execution.wait(timeout=120)
    growth = (_status_kib("VmHWM") - before) << 10
    message = str(caught.value)
    assert f"box {box.id}: the guest broke the protocol (" in message and "the box was stopped" in message
    assert re.search(FLOODS[flood], message), message
    assert growth < RSS_BOUND, f"the host grew by {growth >> 20} MiB while the guest flooded it"
    _wait_until_gone(box.id)


def test_a_boxed_test_whose_guest_breaks_the_protocol_errors_with_it(pytester, runtime, flood_agent, monkeypatch):
    monkeypatch.setenv("BOXLITE_HOME", str(runtime.home.root))  # pytester moves HOME; keep the image cache
    monkeypatch.setenv("BOXLITE_AGENT", str(flood_agent))  # its box has no name: the agent floods stream 0
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("--boxlite", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*box *: the guest broke the protocol (the guest sent PONG on the control stream after READY); the box was "
        "stopped",
    ])


def _default_sigint() -> None:
    """Children start with SIGINT at its default, even when this run inherited it ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until_gone(marker: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while vm_processes(marker):
        assert time.monotonic() < deadline, f"VM processes left behind: {vm_processes(marker)}"
        time.sleep(0.2)


CHILD = textwrap.dedent("""
    import sys, time, tempfile
    from vmm import Runtime, BoxOptions
    rt = Runtime()
    box = rt.create(BoxOptions(volumes=[(tempfile.mkdtemp(), "/mnt/shared", "ro")]))
    box.start()
    print(box.id, flush=True)
    if sys.argv[1] == "exception":
        sys.stdin.readline()
        raise RuntimeError("a failure with the box still running")
    time.sleep(600)
""")


@pytest.mark.parametrize("ending", ["exception", "SIGINT", "SIGTERM", "SIGKILL"])
def test_no_vm_process_outlives_its_process(child_env, ending):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ending.lower()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env, text=True,
                            preexec_fn=_default_sigint)
    box_id = proc.stdout.readline().strip()
    assert box_id, proc.stderr.read()
    assert vm_processes(box_id), "the box should be running (qemu and virtiofsd)"
    if ending == "exception":
        proc.stdin.write("go\n")
        proc.stdin.flush()
    else:
        proc.send_signal(getattr(signal, ending))
    proc.wait(60)
    _wait_until_gone(box_id)


TEST_FILE = textwrap.dedent("""
    import time
    from vmm import Runtime, BoxOptions

    def test_with_a_box():
        with Runtime() as rt, rt.create(BoxOptions()) as box:
            print("BOX", box.id, flush=True)
            assert box.exec("true").exit_code == 0
            time.sleep(600)
""")


def test_ctrl_c_during_a_pytest_run_leaves_nothing(tmp_path, child_env):
    (tmp_path / "test_sleepy.py").write_text(TEST_FILE)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True,
                            cwd=tmp_path, preexec_fn=_default_sigint)
    for line in proc.stdout:
        if "BOX " in line:  # pytest -s prints it after the test file's name
            box_id = line.split("BOX ")[1].split()[0]
            break
    else:
        pytest.fail("the inner pytest never started its box")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert "KeyboardInterrupt" in rest
    _wait_until_gone(box_id)
    assert not os.path.exists(Runtime().home.box_dir(box_id))


def test_missing_qemu_names_the_fix(runtime, monkeypatch):
    monkeypatch.setenv("BOXLITE_QEMU", "/nonexistent/qemu-system-x86_64")
    with pytest.raises(EngineUnavailable,
                       match=r"qemu-system-x86_64 not found: install it with `sudo apt-get install qemu-system-x86`"):
        runtime.create(BoxOptions())


def test_no_kvm_access_names_the_fix(child_env):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as an unprivileged user")
    code = "from vmm.engines import select; select('qemu-kvm')"
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                           code], capture_output=True, text=True, env={**child_env, "HOME": "/tmp"}, cwd=ROOT)
    assert done.returncode != 0
    assert "no read/write access to /dev/kvm" in done.stderr
    assert "sudo usermod -aG kvm $USER" in done.stderr
