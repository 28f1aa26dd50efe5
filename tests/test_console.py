"""The host's copy of a VM console is bounded, whatever the guest writes."""

from __future__ import annotations

from vmm.console import ConsoleLog


def test_a_flooding_console_is_rotated_and_bounded(tmp_path):
    console = ConsoleLog(tmp_path / "console.log", cap=1000)
    for i in range(500):
        console.guest_end.sendall(f"line {i}\n".encode())
    console.close_guest_end()
    console.join()
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.old"]
    assert max(sizes) <= 1000 and sum(sizes) <= 2000
    assert console.tail(3).splitlines() == ["line 497", "line 498", "line 499"]


def test_tail_reads_across_the_rotation(tmp_path):
    console = ConsoleLog(tmp_path / "console.log", cap=30)
    console.guest_end.sendall(b"first line of many\n")
    console.guest_end.sendall(b"second line\n")
    console.guest_end.sendall(b"third\n")
    console.close_guest_end()
    console.join()
    assert console.tail(2) == "second line\nthird"
