"""The host side of the relay checks what a worker sends before replaying it: the guest is not trusted.
No VM here: the worker's channel is a scripted list of messages (the real exchange is in test_plugin_run.py)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from pytest_boxlite.examples import MAX_KEY, MAX_OPERATIONS, MAX_VALUE, HostDatabase
from pytest_boxlite.protocol import MAX_NAME, MAX_TEXT
from pytest_boxlite.relay import HELD_MESSAGES, ExecutionIO, Worker
from pytest_boxlite.replay import Replay
from vmm.errors import WorkerLost


class ScriptedChannel:
    """Stands in for the execnet channel to a worker: gives back `messages`, one per receive()."""

    TimeoutError = TimeoutError
    RemoteError = RuntimeError

    def __init__(self, messages):
        self.messages = list(messages)
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def receive(self, timeout=None):
        return self.messages.pop(0)


def ended_execution():
    return SimpleNamespace(wait=lambda timeout=None: 0)


def run(*messages):
    worker = Worker(SimpleNamespace(id="0" * 32), ended_execution(), None, ScriptedChannel(messages), False)  # type: ignore[arg-type]
    return list(worker.run(0, timeout=60.0)), worker


SETUP = {"when": "setup", "outcome": "passed", "duration": 0.5, "start": 10.0, "stop": 10.5}
WARNING = {"message": "w", "category": "UserWarning", "filename": "t.py", "lineno": 3, "nodeid": "t.py::t",
           "location": ["t.py", 2, "t"]}


def test_plain_reports_and_the_report_sent_with_done():
    teardown = ("plain", {**SETUP, "when": "teardown"})
    messages, worker = run(("plain", SETUP), ("warning", WARNING), ("done", {"index": 0, "last": [teardown]}))
    assert messages == [("plain", SETUP), ("warning", WARNING), teardown]
    assert worker.items_run == 1 and worker.channel.sent == [("run", {"index": 0, "alone": None})]


def test_well_formed_examples_are_passed_on():
    writes = [["save", b"key", b"value"], ["move", b"key", b"key.secondary", b"value"], ["delete", b"k", b"v"]]
    messages, _ = run(("examples", {"operations": writes}), ("done", {"index": 0, "last": []}))
    assert messages == [("examples", {"operations": writes})]


def done(*last):
    return ("done", {"index": 0, "last": list(last)})


@pytest.mark.parametrize("message", [
    ("plain", {**SETUP, "outcome": "failed"}),  # only passing phases travel plain
    ("plain", {**SETUP, "when": "exec"}),
    ("plain", {**SETUP, "duration": "soon"}),
    ("plain", {**SETUP, "extra": 1}),
    ("plain", "call passed"),
    ("report", {"report": ["not", "a", "dict"]}),
    ("report", ["not", "a", "dict"]),
    ("shell", {"command": "rm -rf /"}),
    ("pong", {}),  # a name of the table, but not one a running test sends
    ("ready", {"python": "3", "pytest": "8"}),
    ("report",),
    "done",
    5,
    ("done", {"index": 0}),  # without the list of what comes with it
    ("done", {"index": 0, "last": "teardown"}),
    ("done", {"index": 1, "last": []}),  # another item than the one asked for
    done(("plain", {**SETUP, "outcome": "failed"})),
    done(("warning", WARNING)),  # done carries reports only
    done(("plain", SETUP), ("plain", SETUP)),
    ("warning", {**WARNING, "message": "w" * (MAX_TEXT + 1)}),
    ("warning", {**WARNING, "nodeid": "t" * (MAX_NAME + 1)}),
    ("warning", {**WARNING, "location": ["t.py", "2", "t"]}),
    ("suite_property", {"name": 1, "value": "x"}),  # record_testsuite_property's, for the host's xml
    ("suite_property", {"name": "a", "value": "x", "more": "y"}),
    # hypothesis's database writes (examples.py): bytes only, known operations, bounded sizes and counts
    ("examples", {"operations": []}),
    ("examples", {"operations": [["save", "key", b"value"]]}),
    ("examples", {"operations": [["save", b"key"]]}),
    ("examples", {"operations": [["save"]]}),
    ("examples", {"operations": [["move", b"key", b"value"]]}),
    ("examples", {"operations": [["rmtree", b"key", b"value"]]}),
    ("examples", {"operations": [["save", b"k" * (MAX_KEY + 1), b"value"]]}),
    ("examples", {"operations": [["save", b"key", b"v" * (MAX_VALUE + 1)]]}),
    ("examples", {"operations": [["delete", b"key", b"value"]] * (MAX_OPERATIONS + 1)}),
    ("examples", {"operations": {"save": [b"key", b"value"]}}),
])
def test_malformed_messages_end_the_worker(message):
    with pytest.raises(WorkerLost, match="malformed|unexpected"):
        run(message)


def test_a_worker_that_says_it_missed_tests_it_was_not_given_is_lost():
    channel = ScriptedChannel([("collected", {"missing": ["other.py::t"], "errors": [], "read": []})])
    worker = Worker(SimpleNamespace(id="0" * 32), ended_execution(), None, channel, False)  # type: ignore[arg-type]
    unit = {"option": {}, "args": [], "nodeids": ["t.py::t"], "cwd": "/", "workerinput": None}
    with pytest.raises(WorkerLost, match="malformed 'collected'"):
        worker.begin(unit)
    assert channel.sent == [("unit", unit)]


@pytest.mark.parametrize("report", [{}, {"$report_type": "Unknown"}, {"$report_type": "TestReport"}])
def test_a_report_pytest_cannot_read_ends_the_worker(pytestconfig, report):
    """A "report" message passes the table (a dict) but is read by pytest's own hook: what it cannot read is the
    worker's failure, not the host's."""
    replay = Replay(pytestconfig, HostDatabase(pytestconfig.rootpath, print))
    worker = Worker(SimpleNamespace(id="0" * 32), ended_execution(), None, ScriptedChannel([]), False)  # type: ignore[arg-type]
    with pytest.raises(WorkerLost, match="a report pytest cannot read"):
        replay.message(None, "report", {"report": report}, worker, set())  # type: ignore[arg-type]
    assert worker.failed


def test_the_worker_stream_holds_a_bounded_amount_of_unreceived_messages():
    """execnet's reader takes whatever the worker sends; the host's side of the stream holds at most
    HELD_MESSAGES bytes the host has not taken, then waits (and the box's flow control stops the guest)."""
    chunk = b"x" * (1 << 20)
    io = ExecutionIO(SimpleNamespace(stdout=iter([chunk] * 200)), None)
    with pytest.raises(EOFError, match=f"a message of {HELD_MESSAGES + 1} bytes"):
        io.read(HELD_MESSAGES + 1)
    assert io.refused is not None and "the limit is" in io.refused
    done = threading.Event()

    def reader():
        for _ in range(HELD_MESSAGES // len(chunk) + 1):
            io.read(len(chunk))
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    assert not done.wait(1), "read past the bound while nothing was taken"
    io.taken()
    assert done.wait(10)


def test_a_reader_waiting_for_room_is_let_go_when_the_gateway_ends():
    execution = SimpleNamespace(stdout=iter([b"x" * HELD_MESSAGES]), stdin=SimpleNamespace(close=lambda: None))
    io = ExecutionIO(execution, None)
    io.read(HELD_MESSAGES)
    ended = threading.Event()

    def reader():
        with pytest.raises(EOFError):  # the worker's output has ended
            io.read(1)
        ended.set()

    threading.Thread(target=reader, daemon=True).start()
    assert not ended.wait(0.5)
    io.close_write()
    assert ended.wait(10)


def finished(workeroutput, rinfo):
    return ("finished", {"status": 0, "workeroutput": workeroutput, "rinfo": rinfo})


@pytest.mark.parametrize("message,ended", [
    (finished({"cov_worker_data": b"..."}, {"pid": 7}), ({"cov_worker_data": b"..."}, {"pid": 7})),
    (finished(None, {"pid": 7}), ({}, {"pid": 7})),  # a workeroutput that could not be sent
    (finished({1: "x"}, {}), None),
    (finished([], {}), None),
    (finished({}, {"pid": 7, "secret": "x"}), None),  # rinfo holds what execnet's does, no more
    (("finished", {"status": 0}), None),
    ("finished", None),
])
def test_a_finished_worker_hands_over_its_workeroutput_if_well_formed(message, ended):
    """What box workers send at their end (config.workeroutput, for plugins such as pytest-cov: nodes.py)."""
    channel = ScriptedChannel([message])
    worker = Worker(SimpleNamespace(id="0" * 32), ended_execution(), None, channel, False)  # type: ignore[arg-type]
    assert worker.finish() == ended
    assert worker.channel.sent == [("stop", {})]
