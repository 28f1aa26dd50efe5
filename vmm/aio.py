"""The asyncio API: the sync API's names, signatures and defaults, awaitable. Each method runs its sync
counterpart in a thread, so there is one implementation of every decision (tests/test_async_api.py checks that
the two APIs stay the same)."""

from __future__ import annotations

import asyncio
import os
import signal as signals
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .box import DEFAULT_MAX_OUTPUT, Box, BoxInfo, BoxMetrics
from .cache import Holds
from .execution import ExecResult, Execution, Output, Stdin
from .home import Home
from .images import ResolvedImage
from .kernel import Kernel
from .options import BoxOptions
from .runtime import Runtime, RuntimeMetrics, Warmup
from .snapshot import Template


class AsyncRuntime:
    """`async with AsyncRuntime() as rt: box = await rt.create(...)`. `.sync` is the `Runtime` it wraps."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, kernel_image: str | None = None,
                 kernel_modules: str | None = None, progress: Callable[[str], None] | None = None,
                 insecure_registries: Iterable[str] = ()) -> None:
        self.sync = Runtime(home, kernel_image=kernel_image, kernel_modules=kernel_modules, progress=progress,
                            insecure_registries=insecure_registries)

    @property
    def home(self) -> Home:
        return self.sync.home

    @property
    def insecure_registries(self) -> tuple[str, ...]:
        return self.sync.insecure_registries

    @property
    def progress(self) -> Callable[[str], None] | None:
        return self.sync.progress

    @property
    def kernel(self) -> Kernel:
        return self.sync.kernel

    @property
    def holds(self) -> Holds:
        return self.sync.holds

    async def create(self, options: BoxOptions | None = None, **overrides: Any) -> AsyncBox:
        return AsyncBox(await asyncio.to_thread(self.sync.create, options, **overrides))

    async def template(self, options: BoxOptions | None = None, *, warmup: Warmup | None = None,
                       key: str = "") -> Template:
        """`Runtime.template()`; the warm-up runs (in a thread) with the sync `Box`."""
        return await asyncio.to_thread(self.sync.template, options, warmup=warmup, key=key)

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
    """A `Box`, awaitable. `.sync` is the `Box` it wraps (a box the sync API made can be wrapped too)."""

    def __init__(self, box: Box) -> None:
        self.sync = box
        self._warm: AsyncExecution | None = None

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def options(self) -> BoxOptions:
        return self.sync.options

    @property
    def image(self) -> ResolvedImage:
        return self.sync.image

    @property
    def created(self) -> float:
        return self.sync.created

    @property
    def status(self) -> str:
        return self.sync.status

    @property
    def engine_name(self) -> str | None:
        return self.sync.engine_name

    @property
    def exec_count(self) -> int:
        return self.sync.exec_count

    @property
    def directory(self) -> Path:
        return self.sync.directory

    @property
    def persistent(self) -> bool:
        return self.sync.persistent

    @property
    def ephemeral(self) -> bool:
        return self.sync.ephemeral

    @property
    def warm_execution(self) -> AsyncExecution | None:
        """A box restored from a snapshot: the template's warm-up command, still running."""
        execution = self.sync.warm_execution
        if execution is None:
            return None
        if self._warm is None or self._warm.sync is not execution:
            self._warm = AsyncExecution(execution)
        return self._warm

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

    async def ping(self, data: bytes = b"") -> bytes:
        return await asyncio.to_thread(self.sync.ping, data)

    async def spawn(self, cmd: str | Iterable[str], *args: str, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | None = None) -> AsyncExecution:
        return AsyncExecution(await asyncio.to_thread(self.sync.spawn, cmd, *args, env=env, cwd=cwd, user=user))

    async def exec(self, cmd: str | Iterable[str], *args: str, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, stdin: bytes | str | None = None,
                   timeout: float | None = None, max_output: int = DEFAULT_MAX_OUTPUT) -> ExecResult:
        return await asyncio.to_thread(self.sync.exec, cmd, *args, env=env, cwd=cwd, user=user, stdin=stdin,
                                       timeout=timeout, max_output=max_output)

    async def copy_in(self, src: str | os.PathLike[str], dest: str) -> None:
        await asyncio.to_thread(self.sync.copy_in, src, dest)

    async def copy_out(self, src: str, dest: str | os.PathLike[str], max_bytes: int = 4 << 30) -> None:
        await asyncio.to_thread(self.sync.copy_out, src, dest, max_bytes)

    async def __aenter__(self) -> AsyncBox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class AsyncOutput:
    """`execution.stdout` / `.stderr`: `async for` chunks as they come, or `await read()` all of it."""

    def __init__(self, output: Output) -> None:
        self.sync = output

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = iter(self.sync)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk

    async def read(self) -> bytes:
        return await asyncio.to_thread(self.sync.read)


class AsyncStdin:
    """`execution.stdin`: `await write()` waits while the guest has no room, `await close()` sends EOF."""

    def __init__(self, stdin: Stdin) -> None:
        self.sync = stdin

    async def write(self, data: bytes | str) -> int:
        return await asyncio.to_thread(self.sync.write, data)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)


class AsyncExecution:
    """An `Execution`, awaitable. `.sync` is the `Execution` it wraps."""

    def __init__(self, execution: Execution) -> None:
        self.sync = execution
        self.stdout = AsyncOutput(execution.stdout)
        self.stderr = AsyncOutput(execution.stderr)
        self.stdin = AsyncStdin(execution.stdin)

    @property
    def args(self) -> tuple[str, ...]:
        return self.sync.args

    @property
    def pid(self) -> int | None:
        return self.sync.pid

    @property
    def returncode(self) -> int | None:
        return self.sync.returncode

    def poll(self) -> int | None:
        return self.sync.poll()

    async def wait(self, timeout: float | None = None) -> int:
        return await asyncio.to_thread(self.sync.wait, timeout)

    async def kill(self, sig: int = signals.SIGKILL) -> None:
        await asyncio.to_thread(self.sync.kill, sig)

    async def terminate(self) -> None:
        await asyncio.to_thread(self.sync.terminate)

    async def communicate(self, timeout: float | None = None, max_output: int | None = None,
                          close_stdin: bool = True) -> tuple[bytes, bytes]:
        return await asyncio.to_thread(self.sync.communicate, timeout, max_output, close_stdin)

    async def __aenter__(self) -> AsyncExecution:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.sync.__exit__, *exc)


__all__ = ["AsyncBox", "AsyncExecution", "AsyncOutput", "AsyncRuntime", "AsyncStdin"]
