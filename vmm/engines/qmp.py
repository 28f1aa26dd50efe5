"""A minimal QMP (QEMU Machine Protocol) client: JSON commands over the monitor socket, events skipped."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

from ..errors import BoxError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # qemu's answers are small; a longer line means the stream is not QMP


class Qmp:
    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self._sock = sock
        self._sock.settimeout(timeout)
        self._file = sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise BoxError(f"qemu's monitor did not greet with QMP: {greeting!r:.200}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_LINE)
        except OSError as exc:
            raise BoxError(f"qemu's monitor did not answer: {exc}") from None
        if not line:
            raise BoxError("qemu's monitor closed (qemu exited)")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise BoxError(f"qemu's monitor sent a malformed line: {line[:200]!r}")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command`; its "return" value, or BoxError with qemu's description of the error."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
        except OSError as exc:
            raise BoxError(f"cannot talk to qemu's monitor: {exc}") from None
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise BoxError(f"qemu refused {command}: {reply['error'].get('desc', reply['error'])}")
            log.debug("qmp event: %s", reply.get("event"))

    def send_fd(self, name: str, fd: int) -> None:
        """Hand `fd` to qemu (SCM_RIGHTS with a `getfd` command), to be used as `fd:<name>`."""
        message = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        try:
            self._file.flush()
            socket.send_fds(self._sock, [message], [fd])
        except OSError as exc:
            raise BoxError(f"cannot talk to qemu's monitor: {exc}") from None
        while True:
            reply = self._read()
            if "return" in reply:
                return
            if "error" in reply:
                raise BoxError(f"qemu refused getfd: {reply['error'].get('desc', reply['error'])}")

    def wait_migration(self, timeout: float) -> None:
        """Poll until the outgoing or incoming migration has completed."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BoxError(f"qemu's migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise BoxError(f"qemu's migration did not complete within {timeout:.0f} s (status {status})")
            time.sleep(0.002)

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()
