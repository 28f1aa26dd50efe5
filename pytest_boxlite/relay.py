"""The host side of a boxed test run: a pytest worker in a box, spoken to with execnet over the agent's exec
streams, and the replay of its reports on the host.

execnet bootstraps itself over any byte stream; here the stream is `python3` started with `Box.spawn`, its
stdin/stdout carried by the agent's channel. No extra host process, no network: `ExecutionIO` gives execnet
the read/write/kill/wait interface it expects from a pipe.

execnet makes its gateways over IO of its own (`Group.makegateway`); one over ours uses two of its names beyond
its documented API, so pyproject.toml pins execnet to the range tested: `gateway_bootstrap.bootstrap` (what
makegateway calls to start the remote side over an IO) and `Group._register` (what makegateway calls to put the
gateway in the group, so that `gateway.exit()` and `group.terminate()` end it).
"""

from __future__ import annotations

import collections
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import execnet
from execnet import gateway_bootstrap

from vmm import Box, BoxError, BoxliteError, WorkerLost, WorkerTimeout

from . import protocol

log = logging.getLogger(__name__)

# What a running test's worker may send (protocol.py).
RUNNING = ("report", "plain", "warning", "suite_property", "examples", "done")
START_TIMEOUT = 600.0  # a worker's python start and `import pytest` (seconds under TCG; the first time more)
STOP_TIMEOUT = 60.0  # the last teardown and pytest_sessionfinish in the guest
PING_TIMEOUT = 60.0  # a restored worker's first answer (~0.1 s under TCG)
STDERR_TAIL = 16 << 10
# The worker's messages the host holds before taking them (execnet's reader would hold any number): a bigger
# message is refused, and past this much unreceived the reader waits (guest/PROTOCOL.md, "Host bounds").
HELD_MESSAGES = 64 << 20
# Runs in the guest's python, given `channel` by execnet. (The host's site directories are processed as such
# in every python of the box, this one too: guestsite/sitecustomize.py.)
WORKER_SOURCE = """
from pytest_boxlite.worker import serve
serve(channel)
"""


class ExecutionIO:
    """execnet's IO interface (what `Popen2IO` offers for a pipe) over a command running in a box."""

    def __init__(self, execution: Any, execmodel: Any) -> None:
        self.execution = execution
        self.execmodel = execmodel
        self._chunks: Iterator[bytes] = iter(execution.stdout)
        self._buffer = bytearray()
        self._room = threading.Condition()
        self._held = 0  # bytes read since the host last took a message
        self._closed = False
        self.refused: str | None = None  # why the worker's stream was cut off

    def read(self, numbytes: int) -> bytes:
        if numbytes > HELD_MESSAGES:
            self.refused = f"the worker sent a message of {numbytes} bytes (the limit is {HELD_MESSAGES >> 20} MiB)"
            raise EOFError(self.refused)
        with self._room:  # the stream stops here, and flow control stops the guest
            self._room.wait_for(lambda: self._held + numbytes <= HELD_MESSAGES or self._closed)
            self._held += numbytes
        while len(self._buffer) < numbytes:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise EOFError(f"expected {numbytes} bytes, got {len(self._buffer)}: the worker has ended")
            self._buffer += chunk
        data = bytes(self._buffer[:numbytes])
        del self._buffer[:numbytes]
        return data

    def taken(self) -> None:
        """The host took a message: what was read before it is no longer held here."""
        with self._room:
            self._held = 0
            self._room.notify_all()

    def write(self, data: bytes) -> None:
        try:
            self.execution.stdin.write(data)
        except (BoxliteError, ValueError) as exc:
            raise OSError(f"cannot write to the worker: {exc}") from exc

    def close_read(self) -> None:
        pass  # the output stream ends with the command

    def close_write(self) -> None:
        with self._room:  # the gateway is ending: a reader waiting for room must not wait forever
            self._closed = True
            self._room.notify_all()
        try:
            self.execution.stdin.close()
        except (BoxliteError, OSError):
            pass

    def kill(self) -> None:
        try:
            self.execution.kill()
        except (BoxliteError, OSError):
            pass

    def wait(self) -> int | None:
        try:
            return int(self.execution.wait(timeout=10))
        except BoxliteError:
            return None


@dataclass
class Worker:
    """A python running pytest in a box, warm (pytest imported) until `begin()` gives it its items."""

    box: Box
    execution: Any
    gateway: execnet.Gateway
    channel: Any
    echo: bool
    _stderr: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=256))
    items_run: int = 0
    failed: bool = False
    io: ExecutionIO | None = None
    # A worker restored from a snapshot taken after it collected: node id -> index in its list of items.
    positions: Mapping[str, int] | None = None
    collected: tuple[list[str], list[Any]] = ([], [])  # and what it did not collect, with the errors
    node: Any = None  # its nodes.BoxNode, when box workers are pytest-xdist nodes to the plugins
    workerinput_read: list[str] = field(default_factory=list)  # the workerinput keys its collection read

    @classmethod
    def start(cls, box: Box, group: execnet.Group, env: Mapping[str, str], cwd: str, echo: bool,
              python: str = "python3") -> Worker:
        """Start the worker (`python`: the command in the box) and wait until pytest is imported there."""
        execution = box.spawn(python, "-u", "-c", "import sys;exec(eval(sys.stdin.readline()))", env=env,
                              cwd=cwd)

        def bootstrap(io: ExecutionIO, spec: execnet.XSpec) -> execnet.Gateway:
            # Without `python=` execnet imports itself in the guest (from the host's site-packages, shared
            # read-only at the same path) instead of sending its source: the host's .pyc files serve.
            return gateway_bootstrap.bootstrap(io, spec)

        worker = cls._attach(box, execution, group, echo, bootstrap)
        worker.channel = worker.gateway.remote_exec(WORKER_SOURCE)
        worker.receive(START_TIMEOUT, "starting pytest", "ready")
        return worker

    @classmethod
    def adopt(cls, box: Box, group: execnet.Group, echo: bool, saved: Mapping[str, Any]) -> Worker:
        """The worker of a box restored from a snapshot: its python, gateway and channel are running in the
        guest already (`saved` is what `snapshot_data()` said in the template); only the host side is new."""
        assert box.warm_execution is not None

        def reconnect(io: ExecutionIO, spec: execnet.XSpec) -> execnet.Gateway:
            return execnet.Gateway(io, spec)  # the guest's side was bootstrapped before the snapshot

        worker = cls._attach(box, box.warm_execution, group, echo, reconnect)
        # A new gateway numbers its channels as the template's did, whose first was the worker's.
        worker.channel = worker.gateway.newchannel()
        if worker.channel.id != saved["channel"]:
            raise worker.lost(f"the restored worker listens on channel {saved['channel']}, not on "
                              f"{worker.channel.id}")
        worker.positions = {nodeid: i for i, nodeid in enumerate(saved["nodeids"])}
        worker.collected = (saved["missing"], saved["errors"])
        # A clone's first round trip is slow (~0.1 s under TCG, where the restored VM starts with nothing
        # translated): paid here, in the pool's thread, not by the test; and a clone that cannot answer
        # fails here, not on a test.
        worker.send("ping")
        worker.receive(PING_TIMEOUT, "answering after its restore", "pong")
        return worker

    def snapshot_data(self, nodeids: list[str], missing: list[str], errors: list[Any]) -> dict[str, Any]:
        """What `adopt()` needs, kept with the template: the channel, and what the worker collected."""
        return {"channel": self.channel.id, "nodeids": nodeids, "missing": missing, "errors": errors}

    @classmethod
    def _attach(cls, box: Box, execution: Any, group: execnet.Group, echo: bool,
                connect: Any) -> Worker:
        worker = cls(box, execution, None, None, echo)  # type: ignore[arg-type]  # gateway, channel: set below
        threading.Thread(target=worker._drain_stderr, name=f"boxlite-stderr-{box.id[:8]}", daemon=True).start()
        spec = execnet.XSpec(f"popen//id=box-{box.id[:8]}//execmodel=thread")
        group.allocate_id(spec)
        worker.io = ExecutionIO(execution, group.execmodel)
        try:
            gateway = connect(worker.io, spec)
        except (EOFError, OSError, AssertionError) as exc:
            raise worker.lost(f"python did not start in box {box.id[:12]} ({exc})") from None
        gateway.spec = spec
        group._register(gateway)  # execnet 2.1's own step in makegateway (see the module's docstring)
        worker.gateway = gateway
        return worker

    @property
    def label(self) -> str:
        return self.box.id[:12]

    def _drain_stderr(self) -> None:
        """Keep the tail for crash reports; with `-s`, pass it through as it comes."""
        try:
            for chunk in self.execution.stderr:
                self._stderr.append(chunk)
                if self.echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
        except (BoxliteError, OSError, ValueError):
            pass

    def stderr_tail(self) -> str:
        """The last lines of the worker's stderr; from python's fatal error line on if there is one (faulthandler's
        dump of a crash is long, and its first lines say the most)."""
        lines = b"".join(self._stderr)[-STDERR_TAIL:].decode(errors="replace").splitlines()
        fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
        return "\n".join(lines[fatal[-1]:][:80] if fatal else lines[-40:])

    def receive(self, timeout: float, doing: str, *expected: str) -> protocol.Message:
        """The worker's next message, one of `expected` (protocol.py's names), checked. Where the host meets
        a worker that is gone, silent or misbehaving: WorkerTimeout, or WorkerLost saying why."""
        try:
            message = self.channel.receive(timeout)
        except self.channel.TimeoutError:
            raise WorkerTimeout(f"{doing} took more than {timeout:g} s in box {self.label}") from None
        except self.channel.RemoteError as exc:  # the worker's own code failed: its traceback says why
            raise self.lost(f"the pytest worker failed while {doing}:\n{exc.formatted}") from None
        except (EOFError, OSError) as exc:
            why = (self.io.refused if self.io is not None else None) or exc or "end of stream"
            raise self.lost(f"the worker ended while {doing} ({why})") from None
        if self.io is not None:
            self.io.taken()
        try:
            return protocol.checked(message, protocol.GUEST, frozenset(expected))
        except ValueError as exc:
            raise self.lost(f"the worker sent {exc} while {doing}") from None

    def send(self, name: str, **fields: Any) -> None:
        try:
            self.channel.send((name, fields))
        except (OSError, ValueError) as exc:
            raise self.lost(f"cannot send to the worker ({exc})") from None

    def lost(self, what: str) -> WorkerLost:
        """The error for a worker that is gone: how its python ended, and what its box said last."""
        self.failed = True
        try:
            code: int | str | None = self.execution.wait(timeout=5)
            box_tail = ""
        except BoxError as exc:  # the VM died: the runtime's message has the console tail
            code, box_tail = None, str(exc)
        except BoxliteError:
            code, box_tail = "still running", ""
        if isinstance(code, int) and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"python was killed by {name}"
        elif code is not None:
            how = f"python exited with status {code}" if code != "still running" else "python is still running"
        else:
            how = "the box is gone"
        message = f"{what}: {how}"
        if box_tail:
            message += f"\n{box_tail}"
        tail = self.stderr_tail()
        if tail:
            message += f"\n--- last lines of the worker's stderr ---\n{tail}"
        return WorkerLost(message)

    def begin(self, unit: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
        """Give the worker its items (protocol.py's "unit" fields); it collects their files. Returns (missing
        node ids, collect errors)."""
        self.send("unit", **unit)
        _, fields = self.receive(START_TIMEOUT, "collecting", "collected")
        if not set(fields["missing"]) <= set(unit["nodeids"]):
            raise self.lost("the worker sent a malformed 'collected' message (node ids it was not given)")
        self.workerinput_read = fields["read"]
        return fields["missing"], fields["errors"]

    def run(self, index: int, timeout: float,
            alone: Mapping[str, Any] | None = None) -> Iterator[protocol.Message]:
        """Run item `index` of this worker's list; yields its messages ("report", "plain", "warning",
        "suite_property", "examples": protocol.py) as they come.
        `alone` (a worker restored from a snapshot): run no other item after it; it holds this run's values
        of what the snapshot's may differ in (`workerinput` under pytest-xdist)."""
        self.send("run", index=index, alone=dict(alone) if alone is not None else None)
        deadline = time.monotonic() + timeout
        while True:
            name, fields = self.receive(max(0.0, deadline - time.monotonic()), "running the test", *RUNNING)
            if name != "done":
                yield name, fields
                continue
            if fields["index"] != index:
                raise self.lost(f"the worker sent a malformed 'done' message (item {fields['index']}, not {index})")
            yield from fields["last"]  # the test's last report, sent with "done"
            self.items_run += 1
            return

    def finish(self, gather: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Let the worker run its last teardown and end its session (best effort: the box goes anyway).
        Returns its (workeroutput, rinfo) when it finished (nodes.py), else None.

        Not in a VM restored from a snapshot unless `gather`: its one item ran with nothing after it (its
        fixtures are torn down), its VM is thrown away, and ending its session would take CPU from the next
        clones; but what plugins gather at a worker's end (coverage) is only there after it."""
        if self.failed or (self.positions is not None and not gather):
            return None
        try:
            self.send("stop")
            _, fields = self.receive(STOP_TIMEOUT, "finishing", "finished")
        except (WorkerLost, WorkerTimeout) as exc:
            log.debug("worker in box %s did not finish cleanly: %s", self.label, exc)
            return None
        return fields["workeroutput"] or {}, fields["rinfo"]

    def close(self) -> None:
        """Kill the worker's python (if still there) and close the gateway; the box is the pool's."""
        try:
            self.execution.kill()
        except (BoxliteError, OSError):
            pass
        try:
            self.gateway.exit()
        except (OSError, ValueError):
            pass

