"""The host's side of a boxed test's reports: what its worker sent, replayed through the host's hooks as if
the test had run here, and the reports the host makes itself when nothing (more) came back from the box."""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import pytest
from _pytest import junitxml  # its stash key: where record_testsuite_property records

from vmm import WorkerLost, WorkerTimeout

from .examples import HostDatabase
from .relay import Worker

When = Literal["setup", "call", "teardown"]


def _keywords(item: pytest.Item) -> dict[str, Literal[1]]:
    """A report's keywords, as pytest makes them for the item."""
    return dict.fromkeys(item.keywords, 1)


class Replay:
    """Replays the messages of boxed tests (protocol.py's "report", "plain", "warning", "suite_property",
    "examples") on the host."""

    def __init__(self, config: pytest.Config, examples: HostDatabase) -> None:
        self.config = config
        self.examples = examples

    def message(self, item: pytest.Item, name: str, fields: Mapping[str, Any], worker: Worker,
                phases: set[str]) -> bool:
        """Replay one message of `item`'s worker; whether it was a failed report. `phases`: those reported."""
        if name == "warning":
            self._warning(fields)
        elif name == "examples":
            self.examples.apply(fields["operations"])
        elif name == "suite_property":
            xml = self.config.stash.get(junitxml.xml_key, None)  # None: no --junitxml
            if xml is not None:
                xml.add_global_property(fields["name"], fields["value"])
        else:
            try:
                report = self._report(item, name, fields)
            except Exception as exc:  # noqa: BLE001 - pytest's own reader of what the guest sent
                raise worker.lost(f"the worker sent a report pytest cannot read ({type(exc).__name__}: "
                                  f"{str(exc)[:200]})") from None
            if not isinstance(report, pytest.TestReport):
                raise worker.lost(f"the worker sent a report pytest cannot read (it made a {type(report).__name__})")
            report.boxlite_box = worker.label  # type: ignore[attr-defined]  # shown by -v (reporting.py)
            if report.when == "teardown":
                report.user_properties.append(("boxlite_box", worker.box.id))
            phases.add(report.when)
            item.ihook.pytest_runtest_logreport(report=report)
            return bool(report.failed)
        return False

    def _report(self, item: pytest.Item, name: str, fields: Mapping[str, Any]) -> pytest.TestReport:
        if name == "plain":  # what the guest left out is the item's, as pytest would have made it
            return pytest.TestReport(item.nodeid, item.location, _keywords(item), "passed", None, fields["when"],
                                     [], fields["duration"], fields["start"], fields["stop"])
        report: pytest.TestReport = self.config.hook.pytest_report_from_serializable(config=self.config,
                                                                                     data=fields["report"])
        return report

    def _warning(self, fields: Mapping[str, Any]) -> None:
        """A warning raised in the box, shown in the host's warnings summary (categories by name only)."""
        category: Any = getattr(builtins, fields["category"], None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = getattr(pytest, fields["category"], UserWarning)
        recorded = warnings.WarningMessage(category(fields["message"]), category, fields["filename"],
                                           fields["lineno"])
        location = tuple(fields["location"]) if fields["location"] else None
        self.config.hook.pytest_warning_recorded.call_historic(kwargs={
            "warning_message": recorded, "when": "runtest", "nodeid": fields["nodeid"], "location": location})

    def worker_failed(self, item: pytest.Item, error: WorkerLost | WorkerTimeout, phases: set[str],
                      worker: Worker | None) -> None:
        """The test's failure when its worker timed out or was lost, in the phase it was in."""
        if isinstance(error, WorkerTimeout):
            message = (f"Timeout: {error}; the test was killed (raise it with timeout= on the boxlite marker, "
                       f"--boxlite-timeout or boxlite_timeout)")
            tail = worker.stderr_tail() if worker else ""
            if tail:
                message += f"\n--- last lines of the worker's stderr ---\n{tail}"
            when: When = "call" if "setup" in phases else "setup"
        else:
            message = f"boxlite: the box crashed while running this test: {error}"
            when = "setup" if "setup" not in phases else "call" if "call" not in phases else "teardown"
        self.synthesize(item, when, message, phases, worker)

    def synthesize(self, item: pytest.Item, when: When, message: str, phases: set[str],
                   worker: Worker | None = None) -> None:
        """A failed report for `item` made on the host (nothing came back from the box), plus the teardown
        report that output plugins such as junitxml wait for."""
        keywords = _keywords(item)
        reports = [pytest.TestReport(item.nodeid, item.location, keywords, "failed", message, when, [], 0.0)]
        if when != "teardown":
            reports.append(pytest.TestReport(item.nodeid, item.location, keywords, "passed", None, "teardown",
                                             [], 0.0))
        for report in reports:
            if worker is not None:
                report.boxlite_box = worker.label  # type: ignore[attr-defined]  # shown by -v (reporting.py)
            phases.add(report.when)
            item.ihook.pytest_runtest_logreport(report=report)
