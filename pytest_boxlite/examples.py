"""hypothesis's example database through the box: what a boxed test saves to the project's database reaches
the host's, so that the next run (boxed or local) replays it, as after a local run.

In the box the project is copy-on-write: the guest's database reads what the host's held when the box was
made, and its writes vanish with the box. So the guest (`record`) also records the save/delete/move calls made
on the configured database (`settings.default.database`, when it is a DirectoryBasedExampleDatabase) and the
worker sends them with the test's reports, as ("examples", [[operation, key, value(s)...], ...]). The host
(`checked`, then `HostDatabase`) bounds them and replays them through hypothesis's own API on the database
it has configured itself, if that is a directory database inside the project: the guest names no path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPERATIONS = {"save": 2, "delete": 2, "move": 3}  # ExampleDatabase's writes: name -> number of bytes arguments
MAX_OPERATIONS = 10_000  # per test
MAX_KEY = 1 << 10  # hypothesis's keys are a digest of the test, with a suffix
MAX_VALUE = 1 << 20  # a serialized example (choice sequence)


def _fits(name: str, args: tuple[Any, ...]) -> bool:
    """Whether `args` are the operation's bytes arguments, within the bounds (the guest sends no others)."""
    if len(args) != OPERATIONS[name] or not all(isinstance(a, bytes) for a in args):
        return False
    *keys, value = args
    return all(len(k) <= MAX_KEY for k in keys) and len(value) <= MAX_VALUE


def record() -> list[list[Any]]:
    """In the guest, once hypothesis is imported: the list that the configured directory database's writes are
    appended to from now on (the worker sends and clears it after each test).

    The methods of DirectoryBasedExampleDatabase are wrapped, not the database object: hypothesis makes a new
    one on each access to the default settings' database. Writes hypothesis makes inside another (a save's
    entry in its list of keys, a move done as delete and save) are the host database's own to make."""
    from hypothesis import settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    operations: list[list[Any]] = []
    inside = threading.local()

    def wrap(name: str) -> None:
        original = getattr(DirectoryBasedExampleDatabase, name)

        def recording(self: Any, *args: bytes) -> None:
            if getattr(inside, "write", False):
                original(self, *args)
                return
            inside.write = True
            try:
                default = settings.default
                if (len(operations) < MAX_OPERATIONS and _fits(name, args) and default is not None
                        and self == default.database):
                    operations.append([name, *args])
                original(self, *args)
            finally:
                inside.write = False

        setattr(DirectoryBasedExampleDatabase, name, recording)

    for name in OPERATIONS:
        wrap(name)
    return operations


def checked(data: Any) -> list[list[Any]]:
    """The guest's operations, or ValueError: the guest is not trusted (bounded counts and sizes, bytes)."""
    if not isinstance(data, list) or not 0 < len(data) <= MAX_OPERATIONS:
        raise ValueError(f"not a list of 1 to {MAX_OPERATIONS} operations")
    for operation in data:
        if not (isinstance(operation, list) and operation and operation[0] in OPERATIONS
                and _fits(operation[0], tuple(operation[1:]))):
            raise ValueError("a malformed example database operation")
    return data


class HostDatabase:
    """On the host: the project's example database, as hypothesis is configured here (`settings.database`),
    written through its own DirectoryBasedExampleDatabase methods."""

    def __init__(self, rootpath: Path, say: Callable[[str], None]) -> None:
        self.rootpath = rootpath.resolve()
        self.say = say  # told once if the database is not one this can write
        self._said = False

    def apply(self, operations: list[list[Any]]) -> None:
        database = self._database()
        if database is None:
            return
        for name, *args in operations:
            getattr(database, name)(*args)

    def _database(self) -> Any:
        try:
            from hypothesis import settings
            from hypothesis.database import DirectoryBasedExampleDatabase
        except ImportError:  # the box had hypothesis, the host has not: nowhere to save
            return None
        default = settings.default
        database = default.database if default is not None else None
        if database is None:  # no database (hypothesis's "ci" profile): a local run saves nothing either
            return None
        if isinstance(database, DirectoryBasedExampleDatabase) and database.path.resolve().is_relative_to(
                self.rootpath):
            return database
        if not self._said:
            self._said = True
            self.say(f"hypothesis's database is {database!r}, not a DirectoryBasedExampleDatabase inside the "
                     f"project ({self.rootpath}): examples found in boxes are not saved")
        return None
