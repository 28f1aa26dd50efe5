"""The host's channel holds only what the protocol allows from the guest (guest/PROTOCOL.md, "Host bounds").

No VM here: the test plays the guest on the other end of a socket pair, frame by frame, to reach each bound
exactly (the same bounds against a real VM and a hostile agent are in test_hostile.py).
"""

from __future__ import annotations

import socket
import time

import pytest

from vmm.channel import HANDSHAKE_FRAMES, STRAY_FRAMES, Channel
from vmm.errors import BoxError, GuestProtocolError
from vmm.execution import Execution
from vmm.protocol import T, frame, records


class Peer:
    """The guest's end: sends frames, reads what the host sends."""

    def __init__(self) -> None:
        host, self.sock = socket.socketpair()
        self.lost: list[tuple[str, bool]] = []
        self.channel = Channel(host, self._lost)

    def _lost(self, reason: str, protocol: bool) -> BaseException:
        self.lost.append((reason, protocol))
        return (GuestProtocolError if protocol else BoxError)(reason)

    def send(self, kind: T, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(frame(kind, stream, payload))

    def handshake(self) -> None:
        self.send(T.HELLO, 0)
        self.send(T.READY, 0)
        assert self.channel.control(5)[0] == T.HELLO
        assert self.channel.control(5)[0] == T.READY

    def wait_lost(self) -> tuple[str, bool]:
        deadline = time.monotonic() + 10
        while not self.lost:
            assert time.monotonic() < deadline, "the channel did not give up on the guest"
            time.sleep(0.01)
        return self.lost[0]

    def close(self) -> None:
        self.channel.close()
        self.sock.close()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.mark.parametrize("kind", [T.PONG, T.HELLO, T.READY, T.STDOUT])
def test_a_control_frame_after_ready_ends_the_connection(peer, kind):
    peer.handshake()
    peer.send(kind, 0, b"x" * 100)
    reason, protocol = peer.wait_lost()
    assert protocol and reason == f"the guest sent {kind.name} on the control stream after READY"
    with pytest.raises(GuestProtocolError):
        peer.channel.open_stream(object())  # type: ignore[arg-type]


def test_an_error_on_the_control_stream_after_ready_ends_the_connection_with_its_text(peer):
    peer.handshake()
    peer.send(T.ERROR, 0, b"protocol: unexpected frame type 0x7e on stream 0")
    reason, protocol = peer.wait_lost()
    assert protocol and "refused a request: 'protocol: unexpected frame type 0x7e on stream 0'" in reason


def test_control_frames_before_ready_are_bounded(peer):
    for _ in range(HANDSHAKE_FRAMES):
        peer.send(T.HELLO, 0)
    time.sleep(0.2)
    assert not peer.lost, "a handshake's worth of frames is held"
    peer.send(T.HELLO, 0)
    reason, protocol = peer.wait_lost()
    assert protocol and f"more than {HANDSHAKE_FRAMES} control frames before READY" in reason


def test_frames_for_streams_not_open_are_dropped_up_to_an_allowance(peer):
    peer.handshake()
    for i in range(STRAY_FRAMES):
        peer.send(T.PONG, 1000 + i, b"late")
    # Still serving: a request gets its answer.
    execution = Execution(peer.channel, ("x",), records([("a", "x")]))
    peer.send(T.STARTED, 1, records([("p", 7)]))
    deadline = time.monotonic() + 5
    while execution.pid is None:
        assert time.monotonic() < deadline and not peer.lost
        time.sleep(0.01)
    peer.send(T.STDOUT, 99999, b"one too many")
    reason, protocol = peer.wait_lost()
    assert protocol and f"more than {STRAY_FRAMES} frames for streams that are not open" in reason
    with pytest.raises(GuestProtocolError):
        execution.wait(5)


def test_stdin_credit_beyond_the_window_ends_the_connection(peer):
    peer.handshake()
    execution = Execution(peer.channel, ("cat",), records([("a", "cat")]))
    peer.send(T.CREDIT, 1, records([("n", 1)]))  # nothing was sent: any credit is more than the window
    reason, protocol = peer.wait_lost()
    assert protocol and reason == "the guest granted more stdin credit than the window"
    with pytest.raises(GuestProtocolError):
        execution.wait(5)


def test_tiny_output_frames_are_held_as_their_bytes(peer):
    """Many 2-byte frames cost what their bytes do, not an object each: the host's memory per stream is
    bounded by its window and high-water mark in bytes."""
    import tracemalloc

    peer.handshake()
    execution = Execution(peer.channel, ("yes",), records([("a", "yes")]))
    frames = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        peer.sock.sendall(frame(T.STDOUT, 1, b"y\n") * frames + frame(T.EXIT, 1, records([("x", 0)])))
        assert execution.wait(60) == 0  # its output is all held now, unread
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The bytes, and the decoder's buffer of one read; an object per frame would be ~40 bytes a frame more.
    assert held < 2 * frames * 2 + (512 << 10), f"{2 * frames} bytes of output held in {held} bytes of memory"
    assert execution.stdout.read() == b"y\n" * frames


def test_late_frames_for_closed_streams_do_not_add_up_over_a_long_life(peer):
    """A long-lived box gets a few late frames for each request it gave up on: that never ends it."""
    from vmm.channel import LATE_FRAMES

    peer.handshake()
    for stream in range(1, 2 * STRAY_FRAMES + 2):
        assert peer.channel.open_stream(object()) == stream  # type: ignore[arg-type]
        peer.channel.close_stream(stream)
        peer.send(T.PONG, stream, b"late")
    execution = Execution(peer.channel, ("x",), records([("a", "x")]))
    stream = 2 * STRAY_FRAMES + 2
    peer.send(T.STARTED, stream, records([("p", 7)]))
    deadline = time.monotonic() + 5
    while execution.pid is None:
        assert time.monotonic() < deadline and not peer.lost
        time.sleep(0.01)
    # A stream's late frames are bounded too: a guest cannot flood one it knows was closed.
    closed = peer.channel.open_stream(object())  # type: ignore[arg-type]
    peer.channel.close_stream(closed)
    for _ in range(LATE_FRAMES + 1):
        peer.send(T.STDOUT, closed, b"x")
    reason, protocol = peer.wait_lost()
    assert protocol and f"more than {LATE_FRAMES} frames for stream {closed} after it was closed" in reason


def test_control_timeout_is_a_box_error(peer):
    from vmm.errors import AgentTimeout

    with pytest.raises(AgentTimeout, match="sent nothing on the control stream"):
        peer.channel.control(0.05)
