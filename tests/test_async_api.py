"""The asyncio API mirrors the sync one: the same public names, parameters and defaults, awaitable.

The first test walks both APIs (no VM); the second uses what the async API adds on the session's shared box.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from vmm import (
    AsyncBox,
    AsyncExecution,
    AsyncRuntime,
    Box,
    Execution,
    GuestProtocolError,
    OutputLimitExceeded,
    Runtime,
)
from vmm.aio import AsyncOutput, AsyncStdin
from vmm.execution import Output, Stdin

PAIRS = [(Runtime, AsyncRuntime), (Box, AsyncBox), (Execution, AsyncExecution), (Output, AsyncOutput),
         (Stdin, AsyncStdin)]
ASYNC_NAME = {sync.__name__: wrapper.__name__ for sync, wrapper in PAIRS} | {"Iterator": "AsyncIterator"}
# Cheap and non-blocking: the same plain method in both APIs. Every other method is a coroutine in the async one.
NOT_AWAITED = {"Runtime.metrics", "Box.info", "Execution.poll"}
# Public for the runtime's own modules, not for users: the channel's stream callbacks, the state a snapshot saves,
# the save of a template box (Runtime.template() calls it).
RUNTIME_ONLY = {"Box.snapshot", "Execution.on_frame", "Execution.on_lost", "Execution.state"}
# Protocols: a sync `with`/`for` is an `async with`/`async for`.
DUNDERS = {"__enter__": "__aenter__", "__exit__": "__aexit__", "__iter__": "__aiter__"}
# Users construct runtimes; boxes and executions come from them.
CONSTRUCTED = {"Runtime"}


def _assigned_attributes(cls: type) -> set[str]:
    """Public instance attributes: `self.NAME = ...` anywhere in the class's methods."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == "self":
                    names.add(part.attr)
    return {name for name in names if not name.startswith("_")}


def _api(cls: type) -> tuple[set[str], dict[str, Callable[..., object]]]:
    """(data names, {method name: function}) of a class's public API, dunder protocols included."""
    data = _assigned_attributes(cls)
    methods = {}
    for name, member in inspect.getmembers(cls):
        public = not name.startswith("_") or name in DUNDERS or name in DUNDERS.values()
        if not public or f"{cls.__name__}.{name}" in RUNTIME_ONLY:
            continue
        if isinstance(inspect.getattr_static(cls, name), property):
            data.add(name)
        elif callable(member):
            methods[name] = member
    if cls.__name__ in CONSTRUCTED or cls.__name__[5:] in CONSTRUCTED:
        methods["__init__"] = vars(cls)["__init__"]
    data.discard("sync")  # the async side's handle on the object it wraps
    return data, methods


def _annotation(text: object, to_async: bool) -> str:
    text = re.sub(r"\b[a-z_]+\.(?=[A-Z])", "", str(text))  # snapshot.Template is Template
    if to_async:
        text = re.sub(r"\b\w+\b", lambda m: ASYNC_NAME.get(m.group(), m.group()), text)
    return text


def _parameters(function: Callable[..., object], to_async: bool) -> list[tuple[str, object, str, object]]:
    """(name, kind, annotation, default) of each parameter but self and the private ones (`_root`)."""
    signature = inspect.signature(function)
    return [(p.name, p.kind, _annotation(p.annotation, to_async), p.default) for p in signature.parameters.values()
            if p.name != "self" and not p.name.startswith("_")]


def _same_default(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b  # signal.SIGKILL is not 9: `kill(sig=9)` was a drift


def differences(sync: type, wrapper: type) -> list[str]:
    found = []
    sync_data, sync_methods = _api(sync)
    async_data, async_methods = _api(wrapper)
    wanted = {DUNDERS.get(name, name) for name in sync_methods}
    for names, other_names, cls, other in ((sync_data, async_data, sync, wrapper),
                                           (async_data, sync_data, wrapper, sync),
                                           (wanted, set(async_methods), sync, wrapper),
                                           (set(async_methods), wanted, wrapper, sync)):
        found += [f"{cls.__name__}.{name} has no counterpart in {other.__name__}"
                  for name in sorted(names - other_names)]
    for name, function in sync_methods.items():
        twin = async_methods.get(DUNDERS.get(name, name))
        if twin is None:
            continue
        qualified = f"{sync.__name__}.{name}"
        awaited = inspect.iscoroutinefunction(twin)
        if name == "__iter__":
            if not inspect.isasyncgenfunction(twin):
                found.append(f"{wrapper.__name__}.__aiter__ is not an async generator")
        elif name != "__init__" and awaited == (qualified in NOT_AWAITED):
            found.append(f"{wrapper.__name__}.{name} {'is' if awaited else 'is not'} a coroutine function")
        mine, theirs = _parameters(function, True), _parameters(twin, False)
        if len(mine) != len(theirs) or not all(
                m[:3] == t[:3] and _same_default(m[3], t[3]) for m, t in zip(mine, theirs, strict=False)):
            found.append(f"{qualified}{inspect.signature(function)} != {wrapper.__name__}.{twin.__name__}"
                         f"{inspect.signature(twin)}")
        returns = inspect.signature(function).return_annotation
        if name != "__init__" and _annotation(returns, True) != _annotation(
                inspect.signature(twin).return_annotation, False):
            found.append(f"{qualified} returns {returns}, {wrapper.__name__}.{twin.__name__} "
                         f"{inspect.signature(twin).return_annotation}")
    return found


@pytest.mark.parametrize(("sync", "wrapper"), PAIRS, ids=[sync.__name__ for sync, _ in PAIRS])
def test_async_api_mirrors_the_sync_one(sync: type, wrapper: type) -> None:
    found = differences(sync, wrapper)
    assert not found, "\n".join(found)


def test_a_drift_is_found() -> None:
    """The walk sees a missing method, a missing parameter and a changed default."""

    class Drifted:
        def __init__(self, execution: Execution) -> None:
            self.sync = execution
            self.stdout = self.stderr = self.stdin = self.args = self.pid = self.returncode = None

        def poll(self) -> int | None:
            return None

        async def wait(self, timeout: float | None = None) -> int:
            return 0

        async def kill(self, sig: int = 9) -> None:
            pass

        async def communicate(self, timeout: float | None = None) -> tuple[bytes, bytes]:
            return b"", b""

        async def __aenter__(self) -> AsyncExecution:
            raise NotImplementedError

        async def __aexit__(self, *exc: object) -> None:
            pass

    Drifted.__name__ = "AsyncExecution"
    found = differences(Execution, Drifted)
    assert found[0] == "Execution.terminate has no counterpart in AsyncExecution"
    assert any(line.startswith("Execution.kill(self, sig: 'int' = <Signals.SIGKILL: 9>)") for line in found)
    assert any(line.startswith("Execution.communicate(") for line in found)
    assert len(found) == 3, found


def test_what_the_async_api_adds_works_in_a_box(shared_box: Box, tmp_path: Path) -> None:
    async def main() -> None:
        box = AsyncBox(shared_box)
        assert box.id == shared_box.id and box.status == "running" and box.directory == shared_box.directory
        assert await box.ping(b"async") == b"async"
        with pytest.raises(OutputLimitExceeded):
            await box.exec("head", "-c", "1000", "/dev/zero", max_output=100)
        result = await box.exec("sh", "-c", "head -c 100000 /dev/zero > /tmp/async-big; echo made")
        assert result.stdout == b"made\n"
        with pytest.raises(GuestProtocolError, match="unsafe or broken archive"):
            await box.copy_out("/tmp/async-big", tmp_path / "big", max_bytes=10_000)
        assert not (tmp_path / "big").exists()
        await box.copy_out("/tmp/async-big", tmp_path / "big", max_bytes=200_000)
        assert (tmp_path / "big").read_bytes() == bytes(100_000)

        execution = await box.spawn("sh", "-c", "trap 'echo term; exit 3' TERM; echo ready; "
                                    "while :; do sleep 0.1; done", env={"X": "1"})
        async with execution:
            assert execution.poll() is None and execution.args[0] == "sh"
            async for chunk in execution.stdout:
                assert chunk == b"ready\n"
                break
            await execution.terminate()
            assert await execution.wait(timeout=30) == 3
            assert execution.poll() == 3 and await execution.stdout.read() == b"term\n"

        killed = await box.spawn("sleep", "600")
        await killed.kill()
        assert await killed.wait(timeout=30) == -signal.SIGKILL

        chatty = await box.spawn("sh", "-c", "cat; head -c 5000 /dev/zero")
        await chatty.stdin.write(b"in\n")
        out, _ = await chatty.communicate(timeout=30, max_output=1 << 20, close_stdin=True)
        assert out == b"in\n" + bytes(5000)
        await box.exec("rm", "/tmp/async-big")

    asyncio.run(main())
