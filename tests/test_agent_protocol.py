"""Drives the guest agent (`boxlite-agent --stdio`) over pipes, without a VM.

The frame codec is deliberately re-implemented here from guest/PROTOCOL.md (not imported from vmm/),
so these tests check the agent against the written protocol.
"""

import os
import queue
import signal
import struct
import subprocess
import threading
import time

import pytest

from vmm import agent as vmm_agent

HELLO, SETUP, READY, RESUME = 0x01, 0x02, 0x03, 0x04
EXEC, STARTED, STDIN, STDOUT, STDERR, EXIT, KILL, CREDIT, ERROR = range(0x10, 0x19)
STAT, PING, PONG, SHUTDOWN = 0x20, 0x21, 0x22, 0x2F
MAX_PAYLOAD = 65536
OUT_WINDOW = 1 << 20
IN_WINDOW = 256 << 10
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"]
TIMEOUT = 20


def frame(stream, ftype, payload=b""):
    return struct.pack(">IIB", len(payload), stream, ftype) + payload


def records(*pairs):
    out = b""
    for key, value in pairs:
        if isinstance(value, int):
            value = str(value)
        if isinstance(value, str):
            value = value.encode()
        out += key.encode() + struct.pack(">I", len(value)) + value
    return out


def parse_records(payload):
    out, i = [], 0
    while i < len(payload):
        assert len(payload) - i >= 5, "truncated record header"
        key, length = chr(payload[i]), struct.unpack(">I", payload[i + 1 : i + 5])[0]
        assert i + 5 + length <= len(payload), "record runs past the payload"
        out.append((key, payload[i + 5 : i + 5 + length]))
        i += 5 + length
    return out


def rec(payload):
    """Records as a dict (last value wins)."""
    return {k: v for k, v in parse_records(payload)}


class Agent:
    """One `boxlite-agent --stdio` with a reader thread that queues incoming frames."""

    def __init__(self, binary):
        self.proc = subprocess.Popen(
            [str(binary), "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.frames = queue.Queue()
        self.stderr = b""
        self.wlock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self):
        out = self.proc.stdout
        while True:
            hdr = out.read(9)
            if len(hdr) < 9:
                self.frames.put(None)  # EOF
                return
            length, stream, ftype = struct.unpack(">IIB", hdr)
            assert length <= MAX_PAYLOAD
            payload = out.read(length)
            self.frames.put((stream, ftype, payload))

    def _read_stderr(self):
        self.stderr = self.proc.stderr.read()

    def send(self, stream, ftype, payload=b""):
        with self.wlock:
            self.proc.stdin.write(frame(stream, ftype, payload))
            self.proc.stdin.flush()

    def send_raw(self, data):
        with self.wlock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def recv(self, timeout=TIMEOUT):
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame from the agent within {timeout}s") from None

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Exec:
    """Collects one stream's frames, granting output credit as it consumes (like a host client)."""

    def __init__(self, stream):
        self.stream = stream
        self.pid = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit = None
        self.error = None
        self.stdin_credit = IN_WINDOW
        self.done = False


class Session:
    def __init__(self, agent):
        self.agent = agent
        self.execs = {}
        self.next_stream = 1
        self.control = []  # frames on stream 0 after READY, and unrouted frames
        self.auto_credit = True

    def start(self, argv, env=ENV, cwd=None, user=None, extra=()):
        stream = self.next_stream
        self.next_stream += 1
        pairs = [("a", a) for a in argv] + [("e", e) for e in env]
        if cwd is not None:
            pairs.append(("c", cwd))
        if user is not None:
            pairs.append(("u", user))
        pairs.extend(extra)
        self.execs[stream] = Exec(stream)
        self.agent.send(stream, EXEC, records(*pairs))
        return self.execs[stream]

    def pump(self, timeout=TIMEOUT):
        """Handles one incoming frame; returns it."""
        item = self.agent.recv(timeout)
        if item is None:
            raise EOFError("agent closed its output")
        stream, ftype, payload = item
        ex = self.execs.get(stream)
        if ex is None:
            self.control.append(item)
            return item
        assert not ex.done, f"frame {ftype:#x} after the last frame of stream {stream}"
        if ftype == STARTED:
            ex.pid = int(rec(payload)["p"])
        elif ftype in (STDOUT, STDERR):
            assert payload, "empty output frame"
            (ex.stdout if ftype == STDOUT else ex.stderr).extend(payload)
            if self.auto_credit:
                self.agent.send(stream, CREDIT, records(("n", len(payload))))
        elif ftype == EXIT:
            ex.exit = rec(payload)
            ex.done = True
        elif ftype == ERROR:
            ex.error = payload.decode()
            ex.done = True
        elif ftype == CREDIT:
            ex.stdin_credit += int(rec(payload)["n"])
        else:
            self.control.append(item)
        return item

    def wait(self, *execs, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while not all(e.done for e in execs):
            self.pump(max(0.01, deadline - time.monotonic()))

    def write_stdin(self, ex, data, chunk=60000):
        """Sends stdin honouring the agent's window (waits for CREDIT)."""
        view = memoryview(data)
        while view:
            while ex.stdin_credit <= 0:
                self.pump()
            n = min(chunk, ex.stdin_credit, len(view))
            self.agent.send(ex.stream, STDIN, bytes(view[:n]))
            ex.stdin_credit -= n
            view = view[n:]

    def run(self, argv, stdin=None, **kw):
        ex = self.start(argv, **kw)
        if stdin is not None:
            self.write_stdin(ex, stdin)
            self.agent.send(ex.stream, STDIN, b"")
        self.wait(ex)
        return ex


@pytest.fixture(scope="session")
def agent_binary():
    """The checkout's guest/agent.c, compiled as the runtime compiles it (into the runtime home)."""
    return vmm_agent.binary()


@pytest.fixture
def agent(agent_binary):
    a = Agent(agent_binary)
    yield a
    a.close()


@pytest.fixture
def session(agent):
    stream, ftype, payload = agent.recv()
    assert (stream, ftype) == (0, HELLO)
    agent.send(0, SETUP, records(("r", "root"), ("w", "tmpfs")))
    assert agent.recv() == (0, READY, b"")
    return Session(agent)


def test_hello_then_setup_ready(agent):
    stream, ftype, payload = agent.recv()
    assert (stream, ftype) == (0, HELLO)
    r = rec(payload)
    assert r["v"] and r["k"] == os.uname().release.encode()
    agent.send(0, SETUP, records(("r", "root"), ("w", "tmpfs"), ("n", "1")))
    assert agent.recv() == (0, READY, b"")
    # A second SETUP is refused, and the agent keeps serving.
    agent.send(0, SETUP, b"")
    stream, ftype, payload = agent.recv()
    assert (stream, ftype) == (0, ERROR) and b"already" in payload
    agent.send(0, PING, b"x")
    assert agent.recv() == (0, PONG, b"x")


def test_resume_only_after_setup(agent):
    assert agent.recv()[:2] == (0, HELLO)
    agent.send(0, RESUME, records(("h", "clone")))
    stream, ftype, payload = agent.recv()
    assert (stream, ftype) == (0, ERROR) and payload == b"resume: not set up"
    agent.send(0, SETUP, records(("r", "root"), ("w", "tmpfs")))
    assert agent.recv() == (0, READY, b"")
    agent.send(0, RESUME, records(("h", "clone")))  # a VM restored from a snapshot: any number of times
    assert agent.recv() == (0, READY, b"")


@pytest.mark.parametrize("kind, name", [(SETUP, "setup"), (RESUME, "resume")])
@pytest.mark.parametrize("payload, error", [
    (b"r\x00\x00\x10\x00root", "malformed records"),
    (records(("r", "root"), ("h", "a\0b")), "value with NUL byte ('h')"),
    (records(("r", "root\0x")), "value with NUL byte ('r')"),
    (records(("r", "root"), ("n", "yes")), "bad network record (want 0 or 1)"),
    (records(("r", "root"), ("h", "x" * 65)), "hostname must be 1 to 64 bytes"),
])
def test_setup_and_resume_records_are_checked(agent, kind, name, payload, error):
    assert agent.recv()[:2] == (0, HELLO)
    if kind == RESUME:
        agent.send(0, SETUP, records(("r", "root"), ("w", "tmpfs")))
        assert agent.recv() == (0, READY, b"")
    agent.send(0, kind, payload)
    assert agent.recv() == (0, ERROR, f"{name}: {error}".encode())
    # Refused before anything was done: a good request still works.
    agent.send(0, kind, records(("r", "root"), ("w", "tmpfs"), ("h", "box")))
    assert agent.recv() == (0, READY, b"")


def test_echo_exact_bytes(session):
    ex = session.run(["sh", "-c", "printf 'hello\\n'; printf 'oops' >&2"])
    assert ex.pid > 0
    assert bytes(ex.stdout) == b"hello\n"
    assert bytes(ex.stderr) == b"oops"
    assert ex.exit == {"x": b"0"}


def test_binary_safe_output_and_stdin(session):
    data = bytes(range(256)) * 64
    ex = session.run(["cat"], stdin=data)
    assert bytes(ex.stdout) == data and ex.exit == {"x": b"0"}
    ex = session.run(["printf", "\\000\\001\\377\\n"])
    assert bytes(ex.stdout) == b"\x00\x01\xff\n"


@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_codes(session, code):
    ex = session.run(["sh", "-c", f"exit {code}"])
    assert ex.exit == {"x": str(code).encode()}


def test_death_by_signal(session):
    ex = session.run(["sh", "-c", "kill -9 $$"])
    assert ex.exit == {"s": b"9"}


def test_env_cwd_and_path_from_given_env(session, tmp_path):
    ex = session.run(["env"], env=ENV + ["FOO=bar baz"], cwd=str(tmp_path))
    assert sorted(bytes(ex.stdout).decode().splitlines()) == sorted(ENV + ["FOO=bar baz"])
    ex = session.run(["pwd"], cwd=str(tmp_path))
    assert bytes(ex.stdout).decode().strip() == str(tmp_path)
    # Without PATH in the env, a bare name is still resolved by execvp's default path.
    ex = session.run(["sh", "-c", "echo ok"], env=[])
    assert bytes(ex.stdout) == b"ok\n"


def test_stdin_streaming_and_close(session):
    ex = session.start(["sh", "-c", "while read l; do echo got:$l; done; echo eof"])
    session.agent.send(ex.stream, STDIN, b"one\n")
    while b"got:one\n" not in ex.stdout:
        session.pump()
    session.agent.send(ex.stream, STDIN, b"two\n")
    session.agent.send(ex.stream, STDIN, b"")  # close
    session.wait(ex)
    assert bytes(ex.stdout) == b"got:one\ngot:two\neof\n"
    assert ex.exit == {"x": b"0"}


def test_stdin_larger_than_window_gets_credit(session):
    size = 3 * (1 << 20)
    ex = session.run(["wc", "-c"], stdin=b"z" * size)
    assert bytes(ex.stdout).strip() == str(size).encode()
    # Every stdin byte was credited back.
    assert ex.stdin_credit == IN_WINDOW


def test_stdin_after_process_closed_it_is_credited(session):
    ex = session.start(["sh", "-c", "exec 0<&-; sleep 0.2; echo done"])
    session.write_stdin(ex, b"q" * (IN_WINDOW * 2))
    session.agent.send(ex.stream, STDIN, b"")
    session.wait(ex)
    assert bytes(ex.stdout) == b"done\n" and ex.exit == {"x": b"0"}


def test_large_output_with_flow_control(session):
    size = 10 * (1 << 20)
    session.auto_credit = False
    ex = session.start(["head", "-c", str(size), "/dev/zero"])
    # Without credit the agent stops at the initial window.
    while len(ex.stdout) < OUT_WINDOW:
        session.pump()
    time.sleep(0.5)
    while not session.agent.frames.empty():
        session.pump()
    assert len(ex.stdout) == OUT_WINDOW and not ex.done
    # A stalled stream does not block others.
    other = session.start(["echo", "other"])
    session.wait(other)
    assert bytes(other.stdout) == b"other\n"
    # Grant as we consume.
    granted = len(ex.stdout)
    session.agent.send(ex.stream, CREDIT, records(("n", granted)))
    while not ex.done:
        session.pump()
        if len(ex.stdout) - granted > 0:
            n = len(ex.stdout) - granted
            session.agent.send(ex.stream, CREDIT, records(("n", n)))
            granted += n
    assert len(ex.stdout) == size and ex.stdout.count(0) == size
    assert ex.exit == {"x": b"0"}


def test_output_buffered_at_exit_waits_for_credit(session):
    # The process exits with more output in its pipe than the window: EXIT comes only after the drain.
    session.auto_credit = False
    ex = session.start(["sh", "-c", "head -c 1100000 /dev/zero"])
    deadline = time.monotonic() + TIMEOUT
    while len(ex.stdout) < OUT_WINDOW and time.monotonic() < deadline:
        session.pump()
    time.sleep(0.5)
    while not session.agent.frames.empty():
        session.pump()
    assert not ex.done
    session.agent.send(ex.stream, CREDIT, records(("n", 1 << 20)))
    session.wait(ex)
    assert len(ex.stdout) == 1100000 and ex.exit == {"x": b"0"}


def test_missing_command_is_error(session):
    ex = session.run(["/nonexistent/definitely-not-here"])
    assert ex.error == "exec: No such file or directory"
    ex = session.run(["definitely-not-a-command-xyz"])
    assert ex.error == "exec: No such file or directory"
    ex = session.run(["true"], cwd="/nonexistent-dir")
    assert ex.error.startswith("chdir /nonexistent-dir:")
    ex = session.run(["true"], user="no-such-user-xyz")
    assert "no-such-user-xyz" in ex.error
    # The agent goes on serving.
    assert session.run(["true"]).exit == {"x": b"0"}


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_switch(session):
    ex = session.run(["sh", "-c", "id -u; id -g"], user="1234:5678")
    assert bytes(ex.stdout) == b"1234\n5678\n"
    ex = session.run(["id", "-u"], user="root")
    assert bytes(ex.stdout) == b"0\n"


def test_concurrent_execs(session):
    execs = [session.start(["sh", "-c", f"sleep 0.3; echo out{i}; echo err{i} >&2; exit {i}"])
             for i in range(8)]
    session.wait(*execs)
    for i, ex in enumerate(execs):
        assert bytes(ex.stdout) == b"out%d\n" % i
        assert bytes(ex.stderr) == b"err%d\n" % i
        assert ex.exit == {"x": str(i).encode()}


def test_many_concurrent_execs(session):
    execs = [session.start(["sh", "-c", "read x; echo $x"]) for _ in range(70)]
    for i, ex in enumerate(execs):
        session.agent.send(ex.stream, STDIN, b"%d\n" % i)
        session.agent.send(ex.stream, STDIN, b"")
    session.wait(*execs)
    assert [bytes(ex.stdout) for ex in execs] == [b"%d\n" % i for i in range(70)]


def test_kill(session):
    ex = session.start(["sleep", "30"])
    while ex.pid is None:
        session.pump()
    session.agent.send(ex.stream, KILL, records(("g", signal.SIGTERM)))
    session.wait(ex, timeout=5)
    assert ex.exit == {"s": str(int(signal.SIGTERM)).encode()}


def test_kill_reaches_process_group(session):
    ex = session.start(["sh", "-c", "sleep 30 & sleep 30; echo not-killed"])
    while ex.pid is None:
        session.pump()
    time.sleep(0.2)
    session.agent.send(ex.stream, KILL, records(("g", 9)))
    session.wait(ex, timeout=5)
    assert ex.exit == {"s": b"9"} and bytes(ex.stdout) == b""


def test_exit_does_not_wait_for_grandchildren(session):
    start = time.monotonic()
    ex = session.run(["sh", "-c", "sleep 5 & echo hi"])
    assert time.monotonic() - start < 4
    assert bytes(ex.stdout) == b"hi\n" and ex.exit == {"x": b"0"}


def test_ping_pong(session):
    session.agent.send(7, PING, b"\x00abc\xff")
    assert session.agent.recv() == (7, PONG, b"\x00abc\xff")
    session.agent.send(0, PING, b"")
    assert session.agent.recv() == (0, PONG, b"")


def test_stat(session):
    session.agent.send(3, STAT)
    stream, ftype, payload = session.agent.recv()
    assert (stream, ftype) == (3, STAT)
    r = rec(payload)
    assert set(r) == {"m", "f", "u", "t", "n"}
    values = {k: int(v) for k, v in r.items()}
    assert values["m"] > 0 and 0 < values["f"] <= values["m"]
    assert values["t"] > 0 and values["n"] > 0 and values["u"] >= 0


def test_garbage_is_refused_and_agent_continues(session):
    session.agent.send(0, 0x7E, b"junk")
    stream, ftype, payload = session.agent.recv()
    assert (stream, ftype) == (0, ERROR) and b"unexpected frame type" in payload
    # Records whose length runs past the payload.
    ex = Exec(50)
    session.execs[50] = ex
    session.agent.send(50, EXEC, b"a\x00\x00\x10\x00ls")
    session.wait(ex)
    assert "malformed" in ex.error
    session.agent.send(0, PING, b"still here")
    assert session.agent.recv() == (0, PONG, b"still here")
    # Frames for unknown streams are ignored silently.
    session.agent.send(999, STDIN, b"x")
    session.agent.send(999, CREDIT, records(("n", 5)))
    session.agent.send(999, KILL, records(("g", 9)))
    session.agent.send(0, PING, b"ok")
    assert session.agent.recv() == (0, PONG, b"ok")


def test_oversized_frame_reports_error_and_exits(session):
    session.agent.send_raw(struct.pack(">IIB", MAX_PAYLOAD + 1, 1, EXEC))
    stream, ftype, payload = session.agent.recv()
    assert (stream, ftype) == (0, ERROR) and b"exceeds" in payload
    assert session.agent.recv() is None
    assert session.agent.proc.wait(timeout=TIMEOUT) == 2


def test_max_size_frame_is_accepted(session):
    data = bytes(range(256)) * (MAX_PAYLOAD // 256)
    session.agent.send(4, PING, data)
    assert session.agent.recv() == (4, PONG, data)


def test_eof_exits_cleanly_and_kills_children(session):
    ex = session.start(["sleep", "30"])
    while ex.pid is None:
        session.pump()
    session.agent.proc.stdin.close()
    assert session.agent.proc.wait(timeout=TIMEOUT) == 0
    time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(ex.pid, 0)


def test_shutdown_exits_in_stdio_mode(session):
    session.agent.send(0, SHUTDOWN)
    assert session.agent.proc.wait(timeout=TIMEOUT) == 0
