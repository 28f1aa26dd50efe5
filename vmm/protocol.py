"""The host side of the wire protocol in guest/PROTOCOL.md: frames and records, bounded."""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator

from .errors import GuestProtocolError

HEADER = struct.Struct(">IIB")
MAX_PAYLOAD = 65536
RECORD = struct.Struct(">BI")

OUTPUT_WINDOW = 1 << 20  # guest -> host STDOUT+STDERR bytes before a CREDIT
STDIN_WINDOW = 256 << 10  # host -> guest STDIN bytes before a CREDIT


class T(enum.IntEnum):
    HELLO = 0x01
    SETUP = 0x02
    READY = 0x03
    RESUME = 0x04
    EXEC = 0x10
    STARTED = 0x11
    STDIN = 0x12
    STDOUT = 0x13
    STDERR = 0x14
    EXIT = 0x15
    KILL = 0x16
    CREDIT = 0x17
    ERROR = 0x18
    STAT = 0x20
    PING = 0x21
    PONG = 0x22
    SHUTDOWN = 0x2F


GUEST_TYPES = frozenset({T.HELLO, T.READY, T.STARTED, T.STDOUT, T.STDERR, T.EXIT, T.CREDIT, T.ERROR, T.STAT, T.PONG})


def frame(kind: T, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), stream, kind) + payload


def records(items: Iterable[tuple[str, bytes | str | int]]) -> bytes:
    out = bytearray()
    for key, value in items:
        if isinstance(value, int):
            value = str(value)
        if isinstance(value, str):
            value = value.encode()
        out += RECORD.pack(ord(key), len(value)) + value
    return bytes(out)


def parse_records(payload: bytes) -> dict[str, list[bytes]]:
    """Decode records; a length running past the payload is a protocol error, not an IndexError."""
    out: dict[str, list[bytes]] = {}
    pos = 0
    while pos < len(payload):
        if pos + RECORD.size > len(payload):
            raise GuestProtocolError("truncated record header from the guest")
        key, length = RECORD.unpack_from(payload, pos)
        pos += RECORD.size
        if pos + length > len(payload):
            raise GuestProtocolError("record length runs past the frame from the guest")
        out.setdefault(chr(key), []).append(payload[pos : pos + length])
        pos += length
    return out


def record_int(recs: dict[str, list[bytes]], key: str) -> int | None:
    values = recs.get(key)
    if not values:
        return None
    try:
        return int(values[0].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise GuestProtocolError(f"record {key!r} from the guest is not a number") from None


class FrameDecoder:
    """Incremental decoder for bytes from the guest. Refuses oversized frames and unknown types.

    What it holds is bounded by one frame plus one `feed()`; consumed bytes are dropped once a feed, not once
    a frame (a flood of tiny frames must not make each one cost a move of the whole buffer)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[T, int, bytes]]:
        self._buf += data
        pos = 0
        try:
            while len(self._buf) - pos >= HEADER.size:
                length, stream, kind = HEADER.unpack_from(self._buf, pos)
                if length > MAX_PAYLOAD:
                    raise GuestProtocolError(f"guest sent a frame of {length} bytes (limit {MAX_PAYLOAD})")
                try:
                    kind = T(kind)
                except ValueError:
                    raise GuestProtocolError(f"guest sent unknown frame type 0x{kind:02x}") from None
                if kind not in GUEST_TYPES:
                    raise GuestProtocolError(f"guest sent a host-only frame type {kind.name}")
                end = pos + HEADER.size + length
                if len(self._buf) < end:
                    return
                payload = bytes(self._buf[pos + HEADER.size : end])
                pos = end
                yield kind, stream, payload
        finally:
            del self._buf[:pos]
