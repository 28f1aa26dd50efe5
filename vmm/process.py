"""Helper processes (qemu, virtiofsd) that never outlive the process that started them.

Each child gets PR_SET_PDEATHSIG=SIGKILL (and, if asked, PR_SET_NO_NEW_PRIVS: nothing it execs gains
privileges from setuid bits or file capabilities). The kernel sends it when the *thread* that forked the child
exits, so every child is forked by one long-lived spawner thread, not by whichever thread asked.
`kill_all()` runs at interpreter exit for the graceful paths (Ctrl-C, sys.exit).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import queue
import shutil
import signal
import subprocess
import threading
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)
# A child's stdout may be text or bytes (the caller's `text=`): Popen[Any].
_requests: queue.Queue[tuple[Future[subprocess.Popen[Any]], tuple[Any, ...], dict[str, Any]]] = queue.Queue()
_children: set[subprocess.Popen[Any]] = set()
_lock = threading.Lock()
_thread: threading.Thread | None = None


#: Also searched: ordinary users' PATH often lacks the sbin directories on Debian.
SBIN_PATH = "/usr/sbin:/sbin"


def which(tool: str) -> str | None:
    """`tool` on PATH, else in the sbin directories."""
    return shutil.which(tool) or shutil.which(tool, path=SBIN_PATH)


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _die_with_parent_no_new_privs() -> None:
    _die_with_parent()
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _serve() -> None:
    while True:
        future, args, kwargs = _requests.get()
        kwargs["preexec_fn"] = _die_with_parent_no_new_privs if kwargs.pop("no_new_privs", False) else _die_with_parent
        try:
            future.set_result(subprocess.Popen(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)


def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(*args, **kwargs)`, forked by the spawner thread, tracked for cleanup.
    `no_new_privs=True` sets PR_SET_NO_NEW_PRIVS in the child before it execs."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="boxlite-spawner", daemon=True)
            _thread.start()
    future: Future[subprocess.Popen[Any]] = Future()
    _requests.put((future, args, kwargs))
    proc = future.result()
    with _lock:
        _children.add(proc)
    return proc


def reap(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """Wait for `proc` to end (SIGKILL after `timeout`), then forget it."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    with _lock:
        _children.discard(proc)
    return code


def kill_all() -> None:
    with _lock:
        children = list(_children)
    for proc in children:
        if proc.poll() is None:
            log.debug("killing leftover helper process %s", proc.pid)
            proc.kill()
    for proc in children:
        reap(proc)


atexit.register(kill_all)
