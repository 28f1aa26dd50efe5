"""One connection to a guest agent: a reader thread that demultiplexes frames to streams, a writer thread.

The reader never writes (it would deadlock against a guest blocked on its own write), so every frame,
credit grants included, goes out through the writer's queue. Frames that can be large (STDIN) are
bounded by the guest's credit, so the queue stays small even when a hostile guest stops reading.

Nothing the guest sends is held without bound (guest/PROTOCOL.md, "Host bounds"): the control stream takes
a few frames before READY and none after it; frames for streams the host never opened are dropped, a few of
them over the connection; late frames for a stream the host closed recently (answers to a request it gave up
on, the end of a killed command's output) are dropped, a few per stream. More of any is a protocol violation,
which ends the connection.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from .errors import AgentTimeout, BoxError, GuestProtocolError
from .protocol import FrameDecoder, T, frame

log = logging.getLogger(__name__)

HANDSHAKE_FRAMES = 4  # control frames held before READY (HELLO, then READY or ERROR; more is no handshake)
STRAY_FRAMES = 64  # frames for streams never opened (or closed long ago) before the guest is cut off
LATE_FRAMES = 64  # frames dropped for each recently closed stream before the guest is cut off
RECENTLY_CLOSED = 256  # closed streams whose late frames are expected (the most recent ones)


class StreamHandler(Protocol):
    def on_frame(self, kind: T, payload: bytes) -> None: ...

    def on_lost(self, error: BaseException) -> None: ...


class _Reply:
    """A one-shot stream for request/response messages (STAT, PING)."""

    def __init__(self, expect: T) -> None:
        self.expect = expect
        self.future: Future[bytes] = Future()

    def on_frame(self, kind: T, payload: bytes) -> None:
        if self.future.done():
            return
        if kind == self.expect:
            self.future.set_result(payload)
        else:
            self.future.set_exception(GuestProtocolError(f"guest answered {self.expect.name} with {kind.name}"))

    def on_lost(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Channel:
    def __init__(self, sock: socket.socket, lost_error: Callable[[str, bool], BaseException],
                 first_stream: int = 1) -> None:
        """`lost_error(reason, protocol_violation)` builds the error pending work gets when the connection ends.
        `first_stream`: the next free stream id (a VM restored from a snapshot has streams open already)."""
        self._sock = sock
        self._lost_error = lost_error
        self._lock = threading.Lock()
        self._streams: dict[int, StreamHandler] = {}
        self._ids = itertools.count(first_stream)
        self._control: queue.Queue[tuple[T, bytes] | BaseException] = queue.Queue()
        self._ready = False  # READY came: from now on the control stream carries nothing from the guest
        self._strays = 0  # frames for streams never opened, over the connection
        self._closed: OrderedDict[int, int] = OrderedDict()  # recently closed streams: their late frames so far
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self.error: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="boxlite-channel-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="boxlite-channel-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    # -- sending -------------------------------------------------------------------------------------
    def send(self, kind: T, stream: int, payload: bytes = b"") -> None:
        if self.error is not None:
            raise self.error
        self._out.put(frame(kind, stream, payload))

    def _write_loop(self) -> None:
        while True:
            data = self._out.get()
            if data is None:
                return
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._lose(f"the channel to the guest failed: {exc}")
                return

    # -- streams -------------------------------------------------------------------------------------
    def open_stream(self, handler: StreamHandler) -> int:
        with self._lock:
            if self.error is not None:
                raise self.error
            stream = next(self._ids)
            self._streams[stream] = handler
            return stream

    def adopt_stream(self, handler: StreamHandler, stream: int) -> None:
        """Serve a stream that is open in the guest already (one a snapshot carried)."""
        with self._lock:
            if self.error is not None:
                raise self.error
            self._streams[stream] = handler

    def next_stream(self) -> int:
        """The id the next stream will get; the ones below it are taken."""
        with self._lock:
            stream = next(self._ids)
            self._ids = itertools.count(stream)
            return stream

    def close_stream(self, stream: int) -> None:
        with self._lock:
            if self._streams.pop(stream, None) is not None:
                self._closed[stream] = 0
                if len(self._closed) > RECENTLY_CLOSED:
                    self._closed.popitem(last=False)

    def request(self, kind: T, expect: T, payload: bytes = b"", timeout: float = 30.0) -> bytes:
        """Send `kind` on a fresh stream and wait for the `expect` answer."""
        reply = _Reply(expect)
        stream = self.open_stream(reply)
        try:
            self.send(kind, stream, payload)
            return reply.future.result(timeout)
        except TimeoutError:
            raise AgentTimeout(f"the guest agent did not answer {kind.name} within {timeout:.0f} s") from None
        finally:
            self.close_stream(stream)

    def control(self, timeout: float) -> tuple[T, bytes]:
        """The next frame of the handshake on stream 0 (HELLO, READY, ERROR); AgentTimeout if none comes within
        `timeout` s, the connection's error if it ended."""
        try:
            item = self._control.get(timeout=timeout)
        except queue.Empty:
            raise AgentTimeout(f"the guest agent sent nothing on the control stream within {timeout:.1f} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    # -- receiving -----------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data = self._sock.recv(262144)
                if not data:
                    self._lose("the guest closed the channel (the VM stopped or crashed)")
                    return
                for kind, stream, payload in decoder.feed(data):
                    self._dispatch(kind, stream, payload)
        except GuestProtocolError as exc:
            self._lose(str(exc), protocol=True)
        except OSError as exc:
            self._lose(f"the channel to the guest failed: {exc}")

    def _dispatch(self, kind: T, stream: int, payload: bytes) -> None:
        if stream == 0:
            self._on_control(kind, payload)
            return
        with self._lock:
            handler = self._streams.get(stream)
            if handler is None:
                self._drop(kind, stream)
                return
        handler.on_frame(kind, payload)

    def _drop(self, kind: T, stream: int) -> None:
        """Count a frame for a stream not open against its allowance (the caller holds the lock)."""
        late = self._closed.get(stream)
        if late is not None:
            if late >= LATE_FRAMES:
                raise GuestProtocolError(f"the guest sent more than {LATE_FRAMES} frames for stream {stream} after "
                                         f"it was closed (the last: {kind.name})")
            self._closed[stream] = late + 1
        else:
            self._strays += 1
            if self._strays > STRAY_FRAMES:
                raise GuestProtocolError(f"the guest sent more than {STRAY_FRAMES} frames for streams that are "
                                         f"not open (the last: {kind.name} on stream {stream})")
        log.debug("dropping %s for stream %d, not open", kind.name, stream)

    def _on_control(self, kind: T, payload: bytes) -> None:
        """The handshake's frames go to `control()`; after READY the guest has nothing to say on stream 0."""
        if self._ready:
            if kind == T.ERROR:  # the agent refused a request: host and guest no longer agree
                text = payload[:500].decode("utf-8", errors="replace")
                raise GuestProtocolError(f"the agent refused a request: {text!r}")
            raise GuestProtocolError(f"the guest sent {kind.name} on the control stream after READY")
        if self._control.qsize() >= HANDSHAKE_FRAMES:
            raise GuestProtocolError(f"the guest sent more than {HANDSHAKE_FRAMES} control frames before READY")
        self._ready = kind == T.READY
        self._control.put((kind, payload))

    def _lose(self, reason: str, protocol: bool = False) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = BoxError(reason)  # refuse new work while the real error is built
        error = self._lost_error(reason, protocol)
        with self._lock:
            self.error = error
            handlers = list(self._streams.values())
            self._streams.clear()
        log.debug("channel lost: %s", reason)
        self._control.put(error)
        for handler in handlers:
            handler.on_lost(error)
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Stop both threads; pending streams get an error."""
        self._lose("the box was stopped")
        self._out.put(None)
        for thread in (self._reader, self._writer):
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._sock.close()
