"""The guest side: a pytest worker that runs inside a box, driven by the host over an execnet channel.

Started by `relay.WORKER_SOURCE` (execnet's `remote_exec`), it imports pytest at once so that a warm worker
has paid for that before a test needs it, then waits for its unit of work. The messages both ways are
protocol.py's table.

With `workerinput` (the host's box workers are pytest-xdist nodes to plugins: nodes.py), the guest's config has
`config.workerinput` and `config.workeroutput` as an xdist worker's has, and runs without pytest-xdist itself
(it has no workers to start; its fixtures `worker_id` and `testrun_uid` are given: guest_fixtures.py).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import execnet
import pytest

from . import examples, guest_fixtures, protocol
from .stash import CHANNEL_KEY, WORKER_KEY

# Options that only the host acts on: the host selected the items (-k, -m, --lf, ...), counts failures (-x),
# writes reports (--junitxml) and owns the cache; a guest that applied them again would disagree or clobber.
GUEST_OVERRIDES: dict[str, Any] = {
    "keyword": "", "markexpr": "", "deselect": [], "lf": False, "failedfirst": False, "newfirst": False,
    "last_failed_no_failures": "all", "cacheclear": False, "stepwise": False, "stepwise_skip": False,
    "maxfail": 0, "xmlpath": None, "continue_on_collection_errors": True, "collectonly": False,
    "basetemp": None, "help": False, "version": False, "showfixtures": False, "show_fixtures_per_test": False,
    "markers": False, "numprocesses": None, "dist": "no", "tx": [], "looponfail": False, "pastebin": None,
    "boxlite": False,
}


# A passing phase with no output, no failure text and nothing a plugin added travels as a "plain" message; the
# host rebuilds the rest from its own item. Under TCG, serializing a whole report cost ~0.5 ms of guest time.
_PLAIN_ATTRIBUTES = set(vars(pytest.TestReport("x", ("x", 0, "x"), {}, "passed", None, "call")))


RUNNING = frozenset({"run", "ping", "stop"})  # what the host sends once the unit is collected


def _plain(report: pytest.TestReport) -> bool:
    return (type(report) is pytest.TestReport and report.outcome == "passed" and report.longrepr is None
            and not report.sections and not report.user_properties and set(vars(report)) == _PLAIN_ATTRIBUTES)


class WorkerPlugin:
    """Runs the host's items one by one on command and sends their reports back."""

    def __init__(self, channel: Any, config: pytest.Config, nodeids: list[str],
                 workerinput: WorkerInput | None) -> None:
        self.channel = channel
        self.config = config
        self.nodeids = nodeids
        self.workerinput = workerinput
        self.collect_failures: list[dict[str, Any]] = []
        self.held: protocol.Message | None = None  # a teardown report's message, sent with "done"
        self.examples: list[list[Any]] | None = None  # hypothesis's database writes, once hypothesis is in use

    def _serializable(self, report: pytest.CollectReport | pytest.TestReport) -> dict[str, Any]:
        data: dict[str, Any] = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        # record_property accepts any object; only builtins survive the channel.
        data["user_properties"] = [(str(k), v if isinstance(v, (str, int, float, bool)) else repr(v))
                                   for k, v in data.get("user_properties", [])]
        return data

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        """The host reports: the guest's terminal reporter writes nowhere (plugins write to it: pytest-timeout's
        dump of the stacks)."""
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)
            config.pluginmanager.register(pytest.TerminalReporter(config, open(os.devnull, "w")), "terminalreporter")

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_failures.append(self._serializable(report))

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        message: protocol.Message = (
            ("plain", {f: getattr(report, f) for f in protocol.PLAIN}) if _plain(report)
            else ("report", {"report": self._serializable(report)}))
        self._flush()
        if report.when == "teardown":  # the last, usually: one message fewer per test (a rerun flushes it)
            self.held = message
        else:
            self.channel.send(message)

    def _flush(self) -> None:
        if self.held is not None:
            self.channel.send(self.held)
            self.held = None

    @pytest.hookimpl
    def pytest_warning_recorded(self, warning_message: Any, when: str, nodeid: str,
                                location: tuple[str, int, str] | None) -> None:
        if when == "runtest":  # collection and config warnings were the host's own
            self._flush()
            self.channel.send(("warning", {
                "message": str(warning_message.message), "category": warning_message.category.__name__,
                "filename": warning_message.filename, "lineno": warning_message.lineno, "nodeid": nodeid,
                "location": list(location) if location else None,
            }))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        by_id = {item.nodeid: item for item in session.items}
        items = [by_id.get(nodeid) for nodeid in self.nodeids]
        missing = [nodeid for nodeid, item in zip(self.nodeids, items, strict=True) if item is None]
        read = sorted(self.workerinput.read) if self.workerinput is not None else []
        self.channel.send(("collected", {"missing": missing, "errors": self.collect_failures, "read": read}))
        while True:
            name, fields = protocol.checked(self.channel.receive(), protocol.HOST, RUNNING)
            if name == "stop":
                return True
            if name == "ping":
                self.channel.send(("pong", {}))
                continue
            index, alone = fields["index"], fields["alone"]
            item = items[index]
            if alone is not None:  # a VM restored from a snapshot, for this item only
                random.seed()  # not the snapshot's random state, shared by every VM restored from it
                if alone["workerinput"] is not None and self.workerinput is not None:
                    self.workerinput.update(alone["workerinput"])
            if self.examples is None and "hypothesis" in sys.modules:
                self.examples = examples.record()
            if item is not None:
                # The next item this worker will run decides which fixtures are torn down after this one.
                nextitem = None if alone is not None else next((i for i in items[index + 1:] if i is not None), None)
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if self.examples:
                self.channel.send(("examples", {"operations": self.examples[:]}))
                self.examples.clear()
            held, self.held = self.held, None
            self.channel.send(("done", {"index": index, "last": [held] if held else []}))


def serve(channel: Any) -> None:
    """Run one unit of work for the host: collect the files it names, run the items it asks for."""
    # execnet pointed fd 1 at /dev/null; with `-s` the tests' output should reach the host, which echoes stderr.
    os.dup2(2, 1)
    channel.send(("ready", {"python": sys.version.split()[0], "pytest": pytest.__version__}))
    _, unit = protocol.checked(channel.receive(), protocol.HOST, frozenset({"unit"}))
    os.chdir(unit["cwd"])
    option = {**unit["option"], **GUEST_OVERRIDES}
    workerinput = WorkerInput(unit["workerinput"]) if unit["workerinput"] is not None else None
    # As an xdist worker, pytest-xdist would start talking to a controller (pytest-rerunfailures, for one,
    # connects to its loopback port): the box worker is the xdist worker, pytest-xdist is not needed here.
    no_xdist = ["no:xdist", "no:xdist.looponfail"] if workerinput is not None else []
    option["plugins"] = [*option.get("plugins", []), *no_xdist]
    config = pytest.Config.fromdictargs(option, unit["args"])
    config.stash[WORKER_KEY] = True
    if workerinput is not None:
        config.workerinput = workerinput  # type: ignore[attr-defined]  # as under pytest-xdist
        config.workeroutput = {}  # type: ignore[attr-defined]  # as under pytest-xdist
    config.stash[CHANNEL_KEY] = channel
    config.pluginmanager.register(guest_fixtures, "boxlite-guest-fixtures")
    config.pluginmanager.register(WorkerPlugin(channel, config, unit["nodeids"], workerinput), "boxlite-worker")
    status = config.hook.pytest_cmdline_main(config=config)
    output = getattr(config, "workeroutput", None)
    rinfo = dict(zip(protocol.RINFO_FIELDS, (sys.executable, tuple(sys.version_info), sys.platform, os.getcwd(),
                                             os.getpid()), strict=True))
    try:
        channel.send(("finished", {"status": int(status), "workeroutput": output, "rinfo": rinfo}))
    except execnet.DumpError as exc:  # a plugin put something there that only pickle could carry
        sys.stderr.write(f"boxlite: config.workeroutput cannot be sent to the host ({exc})\n")
        channel.send(("finished", {"status": int(status), "workeroutput": None, "rinfo": rinfo}))


class WorkerInput(dict[str, Any]):
    """`config.workerinput` that remembers which keys were read: what a snapshot template's clones share."""

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)
