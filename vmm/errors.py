"""The runtime's errors. Each message says what went wrong and what to do about it."""

from __future__ import annotations

import errno as _errno
import os


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


class LibkrunError(BoxError):
    """A libkrun call returned a negative errno: names the call and the error."""

    def __init__(self, call: str, errno_value: int, detail: str = "") -> None:
        name = _errno.errorcode.get(errno_value, f"errno {errno_value}")
        message = f"libkrun: {call} failed: {name} ({os.strerror(errno_value)})"
        super().__init__(message + (f"; {detail}" if detail else ""))
        self.call = call
        self.errno = errno_value


class GuestProtocolError(BoxError):
    """The guest broke the wire protocol (a malformed, oversized or unexpected frame, or more than a bound the
    protocol sets): the host stopped talking to it and killed its VM."""


class AgentTimeout(BoxError):
    """The guest agent did not answer within the time allowed (a hung or overloaded guest)."""


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


class InvalidReference(ImageError, ValueError):
    """An image reference that cannot be parsed; raised before any work is done."""


class ImageNotFound(ImageError):
    """The registry (or local layout/archive) has no such image, tag or blob (HTTP 404)."""


class RegistryAuthError(ImageError):
    """The registry refused our credentials, or asked for some we do not have (HTTP 401/403)."""


class RegistryUnreachable(ImageError):
    """The registry could not be reached (DNS, refused connection, TLS, repeated 5xx or resets)."""


class DigestMismatch(ImageError):
    """Downloaded or imported content does not hash to the digest that names it."""


class PlatformNotFound(ImageError):
    """A multi-platform image has no variant for this host (linux/amd64)."""


class UnsafeLayer(ImageError):
    """A layer tries to write outside the root filesystem (`..`, absolute paths, links pointing out)."""


class UnsupportedImage(ImageError):
    """An image format or layer compression this runtime cannot read (schema 1 manifests, zstd, ...)."""


class TruncatedBlob(ImageError):
    """A blob download kept ending before its declared size; the partial file is kept for a resume."""


class NoSpaceForTemplate(BoxError):
    """The runtime home's disk has too little free space to save a template (checked before building)."""


class HostPythonUnsupported(ConfigError):
    """The running interpreter cannot be carried into a box; the message names python="image"."""


class PythonMismatch(ConfigError):
    """python="image" with an image whose python3 is not the host's minor version (or that has none)."""


class WorkerLost(BoxError):
    """A test worker or its box is gone; the message says how, with the console or stderr tail."""


class WorkerTimeout(BoxliteError, TimeoutError):
    """A test ran past its timeout; its worker was killed."""
