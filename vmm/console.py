"""A VM's console log on the host, bounded: a guest that floods its console cannot fill the host's disk.

The engine hands the VM one end of a socket pair as its serial console; a thread copies what arrives into
`console.log`, rotating it to `console.log.old` past `cap` bytes, so at most 2 x cap bytes are kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CAP = 4 << 20


class ConsoleLog:
    def __init__(self, path: Path, cap: int = CAP) -> None:
        self.path = path
        self.cap = cap
        self._host_end, self.guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        path.write_bytes(b"")
        self._thread = threading.Thread(target=self._copy, name=f"boxlite-console-{path.parent.name[:8]}",
                                        daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        out = None
        size = 0
        try:  # the open too: a box removed at once (Ctrl-C during its start) takes the directory with it
            out = open(self.path, "ab", buffering=0)
            while True:
                data = self._host_end.recv(65536)
                if not data:
                    return
                while data:
                    if size >= self.cap:
                        out.close()
                        os.replace(self.path, f"{self.path}.old")
                        out = open(self.path, "ab", buffering=0)
                        size = 0
                    room = self.cap - size
                    out.write(data[:room])
                    size += len(data[:room])
                    data = data[room:]
        except OSError as exc:
            log.debug("console %s: %s", self.path, exc)
        finally:
            if out is not None:
                out.close()
            self._host_end.close()

    def close_guest_end(self) -> None:
        """Once the VM process holds its own copy, the host's copy of its end must go (or EOF never comes)."""
        self.guest_end.close()

    def join(self, timeout: float = 2.0) -> None:
        """Wait until everything the VM wrote before it ended is in the file."""
        self._thread.join(timeout)

    def tail(self, lines: int = 30) -> str:
        return tail(lines, self.path, Path(f"{self.path}.old"))


def tail(lines: int, *paths: Path, limit: int = 65536) -> str:
    """The last `lines` lines of the files (newest first in `paths`), reading at most `limit` bytes:
    the guest wrote them, so their size is not trusted."""
    data = b""
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - (limit - len(data))))
                data = f.read(limit - len(data)) + data
        except OSError:
            pass
        if len(data) >= limit or data.count(b"\n") > lines:
            break
    text = data.decode("utf-8", errors="replace").replace("\r", "")
    return "\n".join(text.strip().splitlines()[-lines:])
