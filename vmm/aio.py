"""The asyncio API: the same names as the sync API, awaitable. Blocking work runs in threads."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from .box import Box, BoxInfo, BoxMetrics
from .execution import ExecResult, Execution, _Output
from .options import BoxOptions
from .runtime import Runtime, RuntimeMetrics
from .snapshot import Template


class AsyncRuntime:
    """`async with AsyncRuntime() as rt: box = await rt.create(...)`."""

    def __init__(self, home: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self.sync = Runtime(home, **kwargs)

    async def create(self, options: BoxOptions | None = None, **overrides: Any) -> AsyncBox:
        return AsyncBox(await asyncio.to_thread(self.sync.create, options, **overrides))

    async def template(self, options: BoxOptions | None = None, **kwargs: Any) -> Template:
        """`Runtime.template()`; the warm-up runs (in a thread) with the sync `Box`."""
        return await asyncio.to_thread(self.sync.template, options, **kwargs)

    async def restore(self, template: Template, name: str | None = None) -> AsyncBox:
        return AsyncBox(await asyncio.to_thread(self.sync.restore, template, name))

    async def get(self, box_id: str) -> AsyncBox:
        return AsyncBox(await asyncio.to_thread(self.sync.get, box_id))

    async def list(self) -> list[BoxInfo]:
        return await asyncio.to_thread(self.sync.list)

    async def remove(self, box_id: str) -> None:
        await asyncio.to_thread(self.sync.remove, box_id)

    def metrics(self) -> RuntimeMetrics:
        return self.sync.metrics()

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncBox:
    def __init__(self, box: Box) -> None:
        self.sync = box
        self.id = box.id

    @property
    def warm_execution(self) -> AsyncExecution | None:
        """A box restored from a snapshot: the template's warm-up command, still running."""
        execution = self.sync.warm_execution
        return AsyncExecution(execution) if execution is not None else None

    async def start(self) -> AsyncBox:
        await asyncio.to_thread(self.sync.start)
        return self

    async def stop(self) -> None:
        await asyncio.to_thread(self.sync.stop)

    async def remove(self) -> None:
        await asyncio.to_thread(self.sync.remove)

    def info(self) -> BoxInfo:
        return self.sync.info()

    async def metrics(self) -> BoxMetrics:
        return await asyncio.to_thread(self.sync.metrics)

    async def exec(self, cmd: str | Iterable[str], *args: str, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, stdin: bytes | str | None = None,
                   timeout: float | None = None, **kwargs: Any) -> ExecResult:
        return await asyncio.to_thread(self.sync.exec, cmd, *args, env=env, cwd=cwd, user=user, stdin=stdin,
                                       timeout=timeout, **kwargs)

    async def spawn(self, cmd: str | Iterable[str], *args: str, **kwargs: Any) -> AsyncExecution:
        return AsyncExecution(await asyncio.to_thread(self.sync.spawn, cmd, *args, **kwargs))

    async def copy_in(self, src: str | os.PathLike[str], dest: str) -> None:
        await asyncio.to_thread(self.sync.copy_in, src, dest)

    async def copy_out(self, src: str, dest: str | os.PathLike[str]) -> None:
        await asyncio.to_thread(self.sync.copy_out, src, dest)

    async def __aenter__(self) -> AsyncBox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _AsyncOutput:
    def __init__(self, output: _Output) -> None:
        self._iter = iter(output)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await asyncio.to_thread(next, self._iter, None)
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])


class _AsyncStdin:
    def __init__(self, execution: Execution) -> None:
        self._execution = execution

    async def write(self, data: bytes | str) -> int:
        return await asyncio.to_thread(self._execution.stdin.write, data)

    async def close(self) -> None:
        await asyncio.to_thread(self._execution.stdin.close)


class AsyncExecution:
    def __init__(self, execution: Execution) -> None:
        self.sync = execution
        self.stdout = _AsyncOutput(execution.stdout)
        self.stderr = _AsyncOutput(execution.stderr)
        self.stdin = _AsyncStdin(execution)

    @property
    def returncode(self) -> int | None:
        return self.sync.returncode

    async def wait(self, timeout: float | None = None) -> int:
        return await asyncio.to_thread(self.sync.wait, timeout)

    async def kill(self, sig: int = 9) -> None:
        await asyncio.to_thread(self.sync.kill, sig)

    async def communicate(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        return await asyncio.to_thread(self.sync.communicate, timeout)


__all__ = ["AsyncBox", "AsyncExecution", "AsyncRuntime"]
