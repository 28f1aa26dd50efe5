"""The messages between the host (relay.py) and the pytest worker in a box (worker.py), as one table.

Every message is `(name, fields)`: a name of the table below and a dict of exactly its fields, as
pytest-xdist's workers and controller talk. Only builtin types cross the execnet channel: reports travel as
`pytest_report_to_serializable` dicts, as pytest-xdist's do. `checked()` is the one place a message is
checked against the table; the guest is not trusted, so what it sends is bounded too (counts and lengths
here; the size of one message by relay.HELD_MESSAGES).

    host -> guest
      unit       option, args, nodeids, cwd, workerinput   once: the items to collect (workerinput: nodes.py)
      run        index, alone                               run item `index` of the unit; `alone` (a VM restored
                                                            from a snapshot taken after collection): run no other
                                                            item after it, {"workerinput": this run's}
      ping                                                  to a restored worker before it is handed out
      stop                                                  end the session
    guest -> host
      ready      python, pytest                             pytest is imported: the worker is warm
      collected  missing, errors, read                      node ids not collected, failed collect reports, the
                                                            workerinput keys read (a template depends on them)
      report     report                                     a TestReport, serialized
      plain      when, outcome, duration, start, stop       a passing phase with nothing else in it: the host
                                                            rebuilds the rest from its own item
      warning    message, category, filename, lineno, nodeid, location
      suite_property  name, value                           record_testsuite_property's (guest_fixtures.py)
      examples   operations                                 the test's writes to hypothesis's database
      done       index, last                                the item ran; `last`: its held last report (0 or 1
                                                            report/plain message: one message fewer per test)
      pong
      finished   status, workeroutput, rinfo                its session ended (workeroutput: nodes.py)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import examples

Check = Callable[[Any], bool]
Message = tuple[str, dict[str, Any]]

PHASES = ("setup", "call", "teardown")
# What execnet's `_rinfo()` holds, which plugins read of an xdist node's gateway (nodes.py); the guest sends it.
RINFO_FIELDS = ("executable", "version_info", "platform", "cwd", "pid")
MAX_NAME = 4 << 10  # a node id, file name, warning category, workerinput key, version
MAX_TEXT = 1 << 20  # a warning's message, a suite property's value
MAX_COUNT = 100_000  # node ids, collect errors, workerinput keys read


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(limit: int) -> Check:
    return lambda value: isinstance(value, str) and len(value) <= limit


def _list(check: Check, limit: int = MAX_COUNT) -> Check:
    return lambda value: isinstance(value, list) and len(value) <= limit and all(check(v) for v in value)


def _optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _str_keys(value: Any) -> bool:
    """A dict with string keys (a serialized report, workeroutput, workerinput)."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _examples(value: Any) -> bool:
    try:
        examples.checked(value)
    except ValueError:
        return False
    return True


def _rinfo(value: Any) -> bool:
    return isinstance(value, dict) and set(value) <= set(RINFO_FIELDS)


_NAME = _text(MAX_NAME)


def _location(value: Any) -> bool:
    """A test's location as pytest has it: [file, line or None, name]."""
    return (isinstance(value, list) and len(value) == 3 and _NAME(value[0]) and _optional(_is_int)(value[1])
            and _text(MAX_TEXT)(value[2]))
_NONE: dict[str, Check] = {}

HOST: Mapping[str, Mapping[str, Check]] = {
    "unit": {"option": _str_keys, "args": _list(_text(MAX_TEXT)), "nodeids": _list(_NAME), "cwd": _NAME,
             "workerinput": _optional(_str_keys)},
    "run": {"index": _is_int, "alone": _optional(_str_keys)},
    "ping": _NONE,
    "stop": _NONE,
}

PLAIN: Mapping[str, Check] = {"when": lambda v: v in PHASES, "outcome": lambda v: v == "passed",
                              "duration": _is_number, "start": _is_number, "stop": _is_number}
REPORTS = frozenset({"report", "plain"})  # what `done` may carry
GUEST: Mapping[str, Mapping[str, Check]] = {
    "ready": {"python": _NAME, "pytest": _NAME},
    "collected": {"missing": _list(_NAME), "errors": _list(_str_keys), "read": _list(_NAME)},
    "report": {"report": _str_keys},
    "plain": PLAIN,
    "warning": {"message": _text(MAX_TEXT), "category": _NAME, "filename": _NAME, "lineno": _is_int,
                "nodeid": _NAME, "location": _optional(_location)},
    "suite_property": {"name": _NAME, "value": _text(MAX_TEXT)},
    "examples": {"operations": _examples},
    "done": {"index": _is_int, "last": lambda v: isinstance(v, list) and len(v) <= 1},
    "pong": _NONE,
    "finished": {"status": _is_int, "workeroutput": _optional(_str_keys), "rinfo": _rinfo},
}


def checked(message: Any, table: Mapping[str, Mapping[str, Check]], expected: frozenset[str]) -> Message:
    """`message` as (name, fields) if it is one of the `expected` names of `table` with exactly its fields,
    each valid; else ValueError saying what is wrong (without echoing much of what came)."""
    if not (isinstance(message, (tuple, list)) and len(message) == 2 and isinstance(message[0], str)
            and isinstance(message[1], dict)):
        raise ValueError(f"a malformed message ({type(message).__name__})")
    name, fields = message
    if name not in expected or name not in table:
        raise ValueError(f"an unexpected message {name[:40]!r}")
    checks = table[name]
    if set(fields) != set(checks):
        raise ValueError(f"a malformed {name!r} message (fields {', '.join(sorted(map(str, fields)))[:200]})")
    for field, check in checks.items():
        if not check(fields[field]):
            raise ValueError(f"a malformed {name!r} message (its {field!r})")
    if name == "done":
        fields = {**fields, "last": [checked(m, GUEST, REPORTS) for m in fields["last"]]}
    return name, fields

