"""The runtime's errors. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class BoxliteError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(BoxliteError, ValueError):
    """Invalid options, caught before any VM starts."""


class EngineUnavailable(BoxliteError):
    """No engine can run here (no qemu, no /dev/kvm access, ...); the message names the fix."""


class ImageError(BoxliteError):
    """An image cannot be found, fetched or prepared."""


class BoxError(BoxliteError):
    """A box failed to start, crashed, or was used in a state that does not allow it."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- last lines of the box console ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class GuestProtocolError(BoxError):
    """The guest sent something the host refuses (oversized or malformed frames)."""


class BoxNotFound(BoxError, KeyError):
    """No box with that id in this runtime home."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ExecError(BoxliteError):
    """A command could not be started in the box (not found, bad user, ...)."""


class ExecTimeout(ExecError, TimeoutError):
    """A command ran past its timeout and was killed."""

    def __init__(self, message: str, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class OutputLimitExceeded(ExecError):
    """A command produced more output than the host agreed to hold in memory."""
