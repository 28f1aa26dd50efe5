"""Commands running in a box: the streaming `Execution` and the collected `ExecResult`."""

from __future__ import annotations

import collections
import signal as signals
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BoxError, ExecError, ExecTimeout, GuestProtocolError, OutputLimitExceeded
from .protocol import MAX_PAYLOAD, OUTPUT_WINDOW, STDIN_WINDOW, T, parse_records, record_int, records

if TYPE_CHECKING:
    from .channel import Channel

GRANT_STEP = 64 << 10  # re-credit the guest in steps this big ...
HIGH_WATER = 8 << 20  # ... while less than this much output waits for a consumer
KILL_GRACE = 5.0  # how long a killed command may take to report its end before the host gives up on it
STDOUT, STDERR = 1, 2


@dataclass(frozen=True)
class ExecResult:
    """What a finished command left: like `subprocess.CompletedProcess`."""

    args: tuple[str, ...]
    exit_code: int  # the exit status 0..255, or -N for death by signal N (as subprocess does)
    stdout: bytes
    stderr: bytes

    @property
    def signal(self) -> int | None:
        return -self.exit_code if self.exit_code < 0 else None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Output:
    """`execution.stdout` / `.stderr`: iterate for chunks as they come, or `read()` all of it."""

    def __init__(self, execution: Execution, fd: int) -> None:
        self._execution = execution
        self._fd = fd

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self._execution._next_chunk(self._fd)
            if chunk is None:
                return
            yield chunk

    def read(self) -> bytes:
        return b"".join(self)


class Stdin:
    """`execution.stdin`: `write()` blocks while the guest has no room (flow control), `close()` sends EOF."""

    def __init__(self, execution: Execution) -> None:
        self._execution = execution

    def write(self, data: bytes | str) -> int:
        if isinstance(data, str):
            data = data.encode()
        self._execution._write_stdin(data)
        return len(data)

    def close(self) -> None:
        self._execution._close_stdin()


@dataclass(frozen=True)
class ExecutionState:
    """The host's side of a command's stream while nothing is in flight: saved with a snapshot, so that the
    host side of a VM restored from it takes up the command where the snapshot left it."""

    stream: int
    args: tuple[str, ...]
    pid: int | None
    window: int
    unacked: int
    stdin_credit: int


class Execution:
    """A command running in a box (returned by `Box.spawn`). Thread-safe; like `subprocess.Popen`."""

    def __init__(self, channel: Channel, args: tuple[str, ...], exec_payload: bytes | None,
                 on_done: Callable[[], None] | None = None, state: ExecutionState | None = None) -> None:
        """Sends EXEC with `exec_payload`; or, given `state` (and no payload), adopts that running command."""
        self.args = args
        self.pid: int | None = None
        self.returncode: int | None = None
        self.stdout = Output(self, STDOUT)
        self.stderr = Output(self, STDERR)
        self.stdin = Stdin(self)
        self._channel = channel
        self._cond = threading.Condition()
        # Small frames are joined into the last chunk: what a guest sending 1-byte frames costs in memory is
        # the bytes, not an object per byte.
        self._chunks: dict[int, collections.deque[bytearray]] = {STDOUT: collections.deque(),
                                                                 STDERR: collections.deque()}
        self._buffered = 0
        self._unacked = 0
        self._window = OUTPUT_WINDOW  # what the guest may still send; overrunning it is a protocol violation
        self._stdin_credit = STDIN_WINDOW
        self._stdin_closed = False
        self._error: BaseException | None = None
        self._done = False
        self._on_done = on_done
        if state is not None:
            self.pid, self._window, self._unacked, self._stdin_credit = (
                state.pid, state.window, state.unacked, state.stdin_credit)
            self._stream = state.stream
            channel.adopt_stream(self, state.stream)
            return
        self._stream = channel.open_stream(self)
        assert exec_payload is not None
        channel.send(T.EXEC, self._stream, exec_payload)

    def state(self) -> ExecutionState:
        """This command's stream state, to save with a snapshot. Its output must all have been read."""
        with self._cond:
            if self._done or self._buffered or self._stdin_closed:
                raise BoxError(f"{self.args[0]!r} cannot be carried in a snapshot: it has ended, closed its "
                               "stdin, or has unread output")
            return ExecutionState(self._stream, self.args, self.pid, self._window, self._unacked,
                                  self._stdin_credit)

    # -- frames from the reader thread -------------------------------------------------------------
    def on_frame(self, kind: T, payload: bytes) -> None:
        with self._cond:
            if kind in (T.STDOUT, T.STDERR):
                self._window -= len(payload)
                if self._window < 0:
                    raise GuestProtocolError("the guest sent output beyond its flow-control window")
                chunks = self._chunks[STDOUT if kind == T.STDOUT else STDERR]
                if chunks and len(chunks[-1]) + len(payload) <= MAX_PAYLOAD:
                    chunks[-1] += payload
                else:
                    chunks.append(bytearray(payload))
                self._buffered += len(payload)
                self._unacked += len(payload)
                self._grant()
            elif kind == T.STARTED:
                self.pid = record_int(parse_records(payload), "p")
            elif kind == T.CREDIT:
                # The guest returns what it took in: more than the window is credit it never had to give.
                self._stdin_credit += record_int(parse_records(payload), "n") or 0
                if self._stdin_credit > STDIN_WINDOW:
                    raise GuestProtocolError("the guest granted more stdin credit than the window")
            elif kind == T.EXIT:
                recs = parse_records(payload)
                sig = record_int(recs, "s")
                code = -sig if sig is not None else record_int(recs, "x")
                if code is None or not -128 <= code <= 255:
                    self._error = ExecError(f"the guest reported a nonsensical exit status for {self.args[0]!r}")
                    code = -1
                self._finish(code)
            elif kind == T.ERROR:
                message = payload[:1000].decode("utf-8", errors="replace")
                hint = ""
                if " " in self.args[0] and len(self.args) == 1:
                    hint = f" (to run a shell command line, use exec('sh', '-c', {self.args[0]!r}))"
                self._error = ExecError(f"cannot run {self.args[0]!r} in the box: {message}{hint}")
                self._finish(None)
            self._cond.notify_all()

    def on_lost(self, error: BaseException) -> None:
        with self._cond:
            if not self._done:
                self._error = error
                self._finish(None)
            self._cond.notify_all()

    def _finish(self, code: int | None) -> None:
        self.returncode = code
        self._done = True
        self._channel.close_stream(self._stream)
        if self._on_done:
            self._on_done()

    def _grant(self) -> None:
        """Give the guest back the window it used, unless too much output waits for a reader."""
        if not self._done and self._unacked >= GRANT_STEP and self._buffered < HIGH_WATER:
            try:
                self._channel.send(T.CREDIT, self._stream, records([("n", self._unacked)]))
            except BoxError:
                return
            self._window += self._unacked
            self._unacked = 0

    # -- the caller's side ---------------------------------------------------------------------------
    def _next_chunk(self, fd: int, timeout: float | None = None) -> bytes | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks[fd] or self._done, timeout):
                raise ExecTimeout(f"no output from {self.args[0]!r} within {timeout} s")
            if not self._chunks[fd]:
                return None
            chunk = self._chunks[fd].popleft()
            self._buffered -= len(chunk)
            self._grant()
            return bytes(chunk)

    def _write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._cond:
                self._cond.wait_for(lambda: self._stdin_credit > 0 or self._done)
                if self._done:
                    raise BrokenPipeError(f"{self.args[0]!r} has ended; its stdin is closed")
                if self._stdin_closed:
                    raise ValueError("write to a closed stdin")
                n = min(len(view), self._stdin_credit, MAX_PAYLOAD)
                self._stdin_credit -= n
            if n:
                self._channel.send(T.STDIN, self._stream, bytes(view[:n]))
                view = view[n:]

    def _close_stdin(self) -> None:
        with self._cond:
            if self._stdin_closed or self._done:
                return
            self._stdin_closed = True
        self._channel.send(T.STDIN, self._stream)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (-N for signal N). ExecTimeout if still running after `timeout` (not killed)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise ExecTimeout(f"{self.args[0]!r} still running after {timeout} s")
            if self._error is not None:
                raise self._error
            assert self.returncode is not None
            return self.returncode

    def kill(self, sig: int = signals.SIGKILL) -> None:
        """Send `sig` to the command's process group in the guest."""
        with self._cond:
            if self._done:
                return
        self._channel.send(T.KILL, self._stream, records([("g", int(sig))]))

    def terminate(self) -> None:
        self.kill(signals.SIGTERM)

    def communicate(self, timeout: float | None = None, max_output: int | None = None,
                    close_stdin: bool = True) -> tuple[bytes, bytes]:
        """Collect stdout and stderr until the command ends (stdin is closed first unless told not to).

        Past `timeout` seconds the command is killed and ExecTimeout raised with what it printed so far;
        past `max_output` bytes in all it is killed and OutputLimitExceeded raised.
        """
        if close_stdin:
            self._close_stdin()
        out = {STDOUT: bytearray(), STDERR: bytearray()}
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for fd, chunks in self._chunks.items():
                    while chunks:
                        chunk = chunks.popleft()
                        self._buffered -= len(chunk)
                        out[fd] += chunk
                self._grant()
                if self._done:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                error: ExecError | None = None
                if max_output is not None and len(out[STDOUT]) + len(out[STDERR]) > max_output:
                    error = OutputLimitExceeded(
                        f"{self.args[0]!r} printed more than {max_output} bytes and was killed; "
                        "raise max_output, or use spawn() and stream its output"
                    )
                elif remaining is not None and remaining <= 0:
                    error = ExecTimeout(
                        f"{' '.join(self.args)[:200]!r} timed out after {timeout} s and was killed",
                        bytes(out[STDOUT]), bytes(out[STDERR]),
                    )
                if error is not None:
                    self._kill_and_reap()  # the condition's lock is reentrant, and waiting releases it
                    raise error
                self._cond.wait(remaining)
            if self._error is not None:
                raise self._error
        return bytes(out[STDOUT]), bytes(out[STDERR])

    def _kill_and_reap(self) -> None:
        """Kill, then wait briefly for the guest to confirm; a guest that never does is not waited for."""
        try:
            self.kill()
        except BoxError:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._done, KILL_GRACE)

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.returncode is None:
            self._kill_and_reap()
