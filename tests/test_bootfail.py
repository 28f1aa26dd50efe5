"""What a failed boot's console says, in words (the real-VM case is in test_boxes.py)."""

from vmm.bootfail import explain, firmware_gave_up

SEABIOS = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.3-debian-1.16.3-2)\nBooting from ROM.."


def test_no_bootable_device():
    console = SEABIOS + "\nNo bootable device.  Retrying in 60 seconds."
    assert firmware_gave_up(console)
    assert explain(console, stopped=False).startswith("the firmware found no kernel to boot")


def test_a_panic_is_named():
    console = "[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n[qemu] terminating"
    assert not firmware_gave_up(console)
    assert "panicked while booting (VFS: Unable to mount root fs)" in explain(console, stopped=True)


def test_an_early_crash_is_named():
    console = "[    0.161418] Oops: divide error: 0000 [#1] PREEMPT SMP NOPTI\n[    0.16] RIP: 0010:x"
    assert "crashed while booting (divide error: 0000 [#1] PREEMPT SMP NOPTI)" in explain(console, stopped=True)


def test_silence_and_firmware_only():
    assert explain("", stopped=False).startswith("the console stayed empty")
    assert explain("[qemu] qemu-system-x86_64: warning: x", stopped=True).startswith("the console stayed empty")
    said = explain(SEABIOS, stopped=True)
    assert said.startswith("the firmware ran, but the kernel printed nothing before the VM stopped")


def test_a_kernel_that_ran_without_an_agent():
    console = "[    1.0] Run /init as init process\n[    1.1] boxlite: cannot load virtio_blk"
    assert "agent never answered" in explain(console, stopped=False)
    assert "stopped before its agent started" in explain(console, stopped=True)
