"""The host side of a boxed test run: a pytest worker in a box, spoken to with execnet over the agent's exec
streams, and the replay of its reports on the host.

execnet bootstraps itself over any byte stream; here the stream is `python3` started with `Box.spawn`, its
stdin/stdout carried by the agent's channel. No extra host process, no network: `ExecutionIO` gives execnet
the read/write/kill/wait interface it expects from a pipe.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import execnet
from execnet import gateway_bootstrap

from vmm import Box
from vmm.errors import BoxError, BoxliteError, WorkerLost, WorkerTimeout

from . import examples
from .worker import PLAIN_FIELDS

log = logging.getLogger(__name__)

START_TIMEOUT = 600.0  # a worker's python start and `import pytest` (seconds under TCG; the first time more)
STOP_TIMEOUT = 60.0  # the last teardown and pytest_sessionfinish in the guest
PING_TIMEOUT = 60.0  # a restored worker's first answer (~0.1 s under TCG)
STDERR_TAIL = 16 << 10
# The worker's messages the host holds before taking them (execnet's reader would hold any number): a bigger
# message is refused, and past this much unreceived the reader waits (guest/PROTOCOL.md, "Host bounds").
HELD_MESSAGES = 64 << 20
PHASES = ("setup", "call", "teardown")
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
        kind, _ = worker.receive(START_TIMEOUT, "starting pytest")
        if kind != "ready":
            raise worker.lost(f"the worker began with {kind!r}")
        return worker

    @classmethod
    def adopt(cls, box: Box, group: execnet.Group, echo: bool, saved: Mapping[str, Any]) -> Worker:
        """The worker of a box restored from a snapshot: its python, gateway and channel are running in the
        guest already (`saved` is what `snapshot_data()` said in the template); only the host side is new."""
        assert box.warm_execution is not None

        def reconnect(io: ExecutionIO, spec: execnet.XSpec) -> execnet.Gateway:
            return execnet.Gateway(io, spec)  # the guest's side was bootstrapped before the snapshot

        worker = cls._attach(box, box.warm_execution, group, echo, reconnect)
        factory = worker.gateway._channelfactory  # no public way to name the channel the guest listens on
        factory.count = saved["next_channel"]
        worker.channel = factory.new(saved["channel"])
        worker.positions = {nodeid: i for i, nodeid in enumerate(saved["nodeids"])}
        worker.collected = (saved["missing"], saved["errors"])
        # A clone's first round trip is slow (~0.1 s under TCG, where the restored VM starts with nothing
        # translated): paid here, in the pool's thread, not by the test; and a clone that cannot answer
        # fails here, not on a test.
        worker.send(("ping",))
        kind, *_ = worker.receive(PING_TIMEOUT, "answering after its restore")
        if kind != "pong":
            raise worker.lost(f"the restored worker answered {kind!r} to a ping")
        return worker

    def snapshot_data(self, nodeids: list[str], missing: list[str], errors: list[Any]) -> dict[str, Any]:
        """What `adopt()` needs, kept with the template: the channel, and what the worker collected."""
        return {"channel": self.channel.id, "next_channel": self.gateway._channelfactory.count,
                "nodeids": nodeids, "missing": missing, "errors": errors}

    @classmethod
    def _attach(cls, box: Box, execution: Any, group: execnet.Group, echo: bool,
                connect: Any) -> Worker:
        worker = cls(box, execution, None, None, echo)  # type: ignore[arg-type]
        threading.Thread(target=worker._drain_stderr, name=f"boxlite-stderr-{box.id[:8]}", daemon=True).start()
        spec = execnet.XSpec(f"popen//id=box-{box.id[:8]}//execmodel=thread")
        group.allocate_id(spec)
        worker.io = ExecutionIO(execution, group.execmodel)
        try:
            gateway = connect(worker.io, spec)
        except (EOFError, OSError, AssertionError) as exc:
            raise worker.lost(f"python did not start in box {box.id[:12]} ({exc})") from None
        gateway.spec = spec
        group._register(gateway)  # execnet has no public way to adopt a gateway built on our own IO
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

    def receive(self, timeout: float, doing: str) -> tuple[Any, ...]:
        try:
            message = self.channel.receive(timeout)
            if self.io is not None:
                self.io.taken()
            return message
        except self.channel.TimeoutError:
            raise WorkerTimeout(f"{doing} took more than {timeout:g} s in box {self.label}") from None
        except self.channel.RemoteError as exc:  # the worker's own code failed: its traceback says why
            raise self.lost(f"the pytest worker failed while {doing}:\n{exc.formatted}") from None
        except (EOFError, OSError) as exc:
            why = (self.io.refused if self.io is not None else None) or exc or "end of stream"
            raise self.lost(f"the worker ended while {doing} ({why})") from None

    def send(self, message: Any) -> None:
        try:
            self.channel.send(message)
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
        """Give the worker its items; it collects their files. Returns (missing node ids, collect errors)."""
        self.send(dict(unit))
        kind, *rest = self.receive(START_TIMEOUT, "collecting")
        if kind != "collected" or len(rest) != 3:
            raise self.lost(f"the worker answered {kind!r} to its items")
        self.workerinput_read = [str(key) for key in rest[2]]
        return rest[0], rest[1]

    def run(self, index: int, timeout: float,
            alone: Mapping[str, Any] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Run item `index` of this worker's list; yields ("report" | "plain" | "warning" | "suite_property" |
        "examples", data) as they come.
        `alone` (a worker restored from a snapshot): run no other item after it; it holds this run's values
        of what the snapshot's may differ in (`workerinput` under pytest-xdist)."""
        self.send(("run", index, dict(alone) if alone is not None else None))
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()), "running the test")
            if not (isinstance(message, (tuple, list)) and len(message) == 3 and message[0] == "done"):
                yield self._checked(message)
                continue
            if not isinstance(message[2], list):
                raise self.lost("the worker sent a malformed 'done'")
            for last in message[2]:  # the test's last report, sent with "done"
                yield self._checked(last)
            self.items_run += 1
            return

    def _checked(self, message: Any) -> tuple[str, Any]:
        """A report or warning from the worker, its shape checked (the guest is not trusted); "plain" reports
        as a dict of PLAIN_FIELDS."""
        if not (isinstance(message, (tuple, list)) and len(message) == 2):
            raise self.lost(f"the worker sent a malformed message ({type(message).__name__})")
        kind, data = message
        if kind == "plain":
            if not (isinstance(data, list) and len(data) == len(PLAIN_FIELDS) and data[0] in PHASES
                    and data[1] == "passed" and all(isinstance(v, (int, float)) for v in data[2:])):
                raise self.lost("the worker sent a malformed report")
            return kind, dict(zip(PLAIN_FIELDS, data))
        if kind == "examples":
            try:
                return kind, examples.checked(data)
            except ValueError as exc:
                raise self.lost(f"the worker sent malformed examples ({exc})") from None
        if kind not in ("report", "warning", "suite_property") or not isinstance(data, dict):
            raise self.lost(f"unexpected message {str(kind)[:40]!r} from the worker")
        if kind == "suite_property" and not (set(data) == {"name", "value"}
                                             and all(isinstance(v, str) for v in data.values())):
            raise self.lost("the worker sent a malformed suite property")
        return kind, data

    def finish(self, gather: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Let the worker run its last teardown and end its session (best effort: the box goes anyway).
        Returns its (workeroutput, rinfo) when it finished (nodes.py), else None.

        Not in a VM restored from a snapshot unless `gather`: its one item ran with nothing after it (its
        fixtures are torn down), its VM is thrown away, and ending its session would take CPU from the next
        clones; but what plugins gather at a worker's end (coverage) is only there after it."""
        if self.failed or (self.positions is not None and not gather):
            return None
        try:
            self.send(("stop",))
            message = self.receive(STOP_TIMEOUT, "finishing")
        except (WorkerLost, WorkerTimeout) as exc:
            log.debug("worker in box %s did not finish cleanly: %s", self.label, exc)
            return None
        if not (isinstance(message, (tuple, list)) and len(message) == 4 and message[0] == "finished"
                and isinstance(message[2], (dict, type(None))) and isinstance(message[3], dict)
                and all(isinstance(k, str) for k in message[2] or {})):
            log.debug("worker in box %s sent a malformed 'finished'", self.label)
            return None
        return message[2] or {}, message[3]

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


@functools.cache
def site_directories() -> tuple[str, ...]:
    """The directories the host's pytest and this plugin import from, each once (the guest mounts them).
    Fixed for the process: planning asks for every boxed item."""
    import _pytest
    import execnet as _execnet
    import iniconfig
    import packaging
    import pluggy

    import pytest_boxlite
    import vmm

    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__ or "")))
             for m in (_pytest, pluggy, _execnet, iniconfig, packaging, pytest_boxlite, vmm)]
    import site
    roots += [p for p in site.getsitepackages() if os.path.isdir(p)]
    return tuple(dict.fromkeys(os.path.realpath(r) for r in roots))
