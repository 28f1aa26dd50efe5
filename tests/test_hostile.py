"""A hostile guest cannot hang or crash the host side, and no VM process outlives its run.

The hostile guests are real VMs whose PID 1 is a small busybox script in place of the agent
(BOXLITE_AGENT), speaking the protocol just far enough to then break it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vmm import BoxOptions, EngineUnavailable, GuestProtocolError, Runtime

from .conftest import ROOT, vm_processes

# PID 1 in the initramfs: load the modules, open the channel, say HELLO and READY, then misbehave.
HOSTILE_INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev; $B mount -t proc proc /proc; $B mount -t sysfs sys /sys
while read -r m; do $B insmod "/$m" 2>/dev/null; done < /modules.order
for i in $($B seq 100); do
  name=$($B grep -l boxlite.0 /sys/class/virtio-ports/*/name 2>/dev/null) && break
  $B sleep 0.05
done
exec 3<>/dev/$($B basename $($B dirname "$name"))
$B printf '\0\0\0\0\0\0\0\0\001' >&3   # HELLO
$B printf '\0\0\0\0\0\0\0\0\003' >&3   # READY (SETUP is never read)
$B sleep 2
%s
$B sleep 1000
"""

MISBEHAVIOUR = {
    # A frame header announcing 16 MiB, far past the 64 KiB cap.
    "oversized frame": r"$B printf '\001\0\0\0\0\0\0\001\023' >&3",
    # An unknown frame type.
    "unknown frame type": r"$B printf '\0\0\0\0\0\0\0\001\177' >&3",
    # STDOUT for stream 1 forever, never waiting for credit.
    "output flood ignoring flow control": (
        r"$B head -c 65536 /dev/zero > /tmp/z; { $B printf '\0\001\0\0\0\0\0\001\023'; $B cat /tmp/z; } > /tmp/f;"
        r" while :; do $B dd if=/tmp/f bs=65545 2>/dev/null; done >&3"
    ),
}


@pytest.mark.parametrize("misbehaviour", sorted(MISBEHAVIOUR))
def test_protocol_violations_are_errors_and_the_vm_is_killed(runtime, tmp_path, monkeypatch, misbehaviour):
    init = tmp_path / "hostile-init"
    init.write_text(HOSTILE_INIT % MISBEHAVIOUR[misbehaviour])
    init.chmod(0o755)
    monkeypatch.setenv("BOXLITE_AGENT", str(init))
    box = runtime.create(BoxOptions())
    with pytest.raises(GuestProtocolError):
        with box:
            execution = box.spawn("anything")  # stream 1, which the flood targets
            # Not reading its output: the host stops granting credit, and the flood overruns the window.
            execution.wait(timeout=120)
    _wait_until_gone(box.id)


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
    with pytest.raises(EngineUnavailable, match=r"qemu-system-x86_64 not found: install it with `sudo apt-get install qemu-system-x86`"):
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
