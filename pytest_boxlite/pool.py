"""Warm workers: boxes booted, with pytest imported in them, ahead of need, per box kind.

Under TCG a fresh box costs ~2.5 s to boot and importing pytest in it seconds more; a background thread pays
both while the current test runs, so that a test needing a fresh VM mostly finds one ready.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from vmm import BoxError, ConfigError, EngineUnavailable, ImageError

from .relay import Worker

# Errors that the next attempt would meet again: the box kind is marked failed instead of retried per test.
PERMANENT = (ConfigError, EngineUnavailable, ImageError)
CLOSE_TIMEOUT = 60.0  # a build in flight: boot (retries included) and python start
GIVE_UP_AFTER = 2  # consecutive failed starts of one box kind: it will not start this session either


@dataclass
class PoolStats:
    started: int = 0  # workers (and boxes) started
    boot_seconds: float = 0.0  # time spent booting them and importing pytest, in the background or not
    waited_seconds: float = 0.0  # time tests waited for a worker
    discarded: int = 0  # started ahead but not needed


class Pool:
    """Hands out warm workers per key; keeps up to `size` ready while `demand` says more will be needed."""

    def __init__(self, factory: Callable[[Hashable], Worker], size: int) -> None:
        self._factory = factory
        self.size = size
        self.stats = PoolStats()
        self._cond = threading.Condition()
        self._ready: dict[Hashable, deque[Worker | _Failed]] = defaultdict(deque)
        self._building: dict[Hashable, int] = defaultdict(int)
        self._demand: dict[Hashable, int] = defaultdict(int)  # workers still to be handed out, per key
        self._failed: dict[Hashable, BaseException] = {}
        self._failures: dict[Hashable, int] = defaultdict(int)  # consecutive failed starts
        self._closed = False
        self._threads: list[threading.Thread] = []

    def expect(self, key: Hashable, count: int = 1) -> None:
        """`count` more workers of this kind will be asked for: start booting them (up to the pool size)."""
        with self._cond:
            self._demand[key] += count
            self._fill(key)

    def _fill(self, key: Hashable) -> None:
        """Start builders while fewer than `size` are ready or booting and more are in demand."""
        while (not self._closed and key not in self._failed
               and len(self._ready[key]) + self._building[key] < min(self.size, self._demand[key])):
            self._building[key] += 1
            thread = threading.Thread(target=self._build, args=(key,), name="boxlite-pool", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _build(self, key: Hashable) -> None:
        started = time.monotonic()
        try:
            worker = self._factory(key)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever acquires this key
            with self._cond:
                self._building[key] -= 1
                self._failures[key] += 1
                if isinstance(exc, PERMANENT) or self._failures[key] >= GIVE_UP_AFTER:
                    self._failed[key] = exc
                else:
                    self._ready[key].append(_Failed(exc))
                self._cond.notify_all()
            return
        with self._cond:
            self._building[key] -= 1
            self._failures[key] = 0
            self.stats.started += 1
            self.stats.boot_seconds += time.monotonic() - started
            if self._closed:
                worker.close()
                worker.box.stop()
                return
            self._ready[key].append(worker)
            self._cond.notify_all()

    def acquire(self, key: Hashable) -> Worker:
        """A warm worker for `key` (waiting for one being built, or building one if none is)."""
        waited = time.monotonic()
        with self._cond:
            if self._demand[key] <= 0:
                self._demand[key] = 1  # not announced with expect(): still served
            while True:
                if key in self._failed:
                    raise self._failed[key]
                if self._ready[key]:
                    worker = self._ready[key].popleft()
                    self._demand[key] -= 1
                    self._fill(key)
                    self.stats.waited_seconds += time.monotonic() - waited
                    if isinstance(worker, _Failed):
                        raise worker.error
                    return worker
                if self._closed:
                    raise BoxError("the boxlite pool is closed: the session is ending, no more boxes are started")
                self._fill(key)
                self._cond.wait()

    def close(self) -> list[Worker]:
        """Stop building; return the warm workers nobody took (the caller stops their boxes).

        Builds in flight are waited for (they stop what they made): a daemon thread cut off at exit between
        creating a box and starting it would leave the box's directory behind."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(CLOSE_TIMEOUT)
        with self._cond:
            leftover = [w for q in self._ready.values() for w in q if not isinstance(w, _Failed)]
            self._ready.clear()
            self.stats.discarded += len(leftover)
            return leftover


class _Failed:
    """A build that failed for a reason the next one may not meet (a boot that hung, a worker that died)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
