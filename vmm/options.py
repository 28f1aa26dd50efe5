"""Box options: what a box is made of. Validated before any VM starts."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

ENGINES = ("auto", "qemu", "qemu-kvm", "qemu-tcg", "libkrun")
MEMORY_RANGE = (128, 65536)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# "internet": public addresses and DNS only (the default); "none": no interface but lo; "full": everything the
# host reaches, its loopback included (QEMU user networking unfiltered). docs/security-network.md.
NETWORK_MODES = ("internet", "none", "full")
NETWORK_FIX = "'internet' (public addresses only), 'none' or 'full' (true means 'internet', false 'none')"


def network_mode(value: Any) -> str:
    """`value` as one of NETWORK_MODES (True: "internet", False: "none"), or ConfigError."""
    if value is True:
        return "internet"
    if value is False:
        return "none"
    if isinstance(value, str) and value in NETWORK_MODES:
        return value
    raise ConfigError(f"network={value!r} is invalid: use {NETWORK_FIX}")


@dataclass(frozen=True)
class Volume:
    """A host directory shared into the box through virtiofs, or an ext4 image file attached as a disk.

    mode: "ro" read-only; "rw" the box writes to the host directory; "cow" the box may write, but its
    writes stay in the box (an overlay on the read-only share) and never reach the host. An image file is
    never written: "ro" or "cow". Boxes restored from snapshots take image files only (virtiofs cannot be
    snapshotted), which `vmm.volumes.directory_image()` makes from a directory.
    """

    host: str
    guest: str
    mode: Literal["ro", "rw", "cow"] = "ro"

    @classmethod
    def parse(cls, spec: Volume | str | Sequence[str]) -> Volume:
        """Accept a Volume, `HOST:GUEST[:ro|rw|cow]`, or a (host, guest[, mode]) sequence."""
        if isinstance(spec, Volume):
            return spec
        parts: list[Any] = spec.split(":") if isinstance(spec, str) else list(spec)  # the mode: validated()
        if len(parts) not in (2, 3):
            raise ConfigError(f"volume {spec!r}: write it as HOST:GUEST or HOST:GUEST:ro|rw|cow")
        return cls(*parts)


@dataclass(frozen=True)
class Port:
    """A host port on 127.0.0.1 forwarded to a guest port (QEMU user networking)."""

    host: int
    guest: int
    protocol: Literal["tcp", "udp"] = "tcp"

    @classmethod
    def parse(cls, spec: Port | str | Sequence[int | str]) -> Port:
        """Accept a Port, `HOST:GUEST[/tcp|udp]`, or a (host, guest[, protocol]) sequence."""
        if isinstance(spec, Port):
            return spec
        if isinstance(spec, str):
            ports, _, proto = spec.partition("/")
            parts: list[Any] = ports.split(":") + ([proto] if proto else [])
        else:
            parts = list(spec)
        try:
            return cls(int(parts[0]), int(parts[1]), *parts[2:3])
        except (ValueError, IndexError):
            raise ConfigError(f"port {spec!r}: write it as HOST:GUEST or HOST:GUEST/udp") from None


@dataclass(frozen=True)
class BoxOptions:
    """Everything a box is made of. `validate()` runs before any VM starts."""

    image: str | None = None  # None: the embedded default image; "dir:PATH" for a root filesystem
    cpus: int = 1
    memory_mib: int = 512
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None  # None: the image's
    user: str | None = None  # None: the image's
    volumes: tuple[Volume, ...] = ()
    network: str | bool = "internet"  # one of NETWORK_MODES; True/False are "internet"/"none"
    ports: tuple[Port, ...] = ()
    # Host loopback TCP ports a box may reach in "internet" mode, at 10.0.2.2 and host.boxlite.internal.
    host_ports: tuple[int, ...] = ()
    disk_size_gb: int | None = None  # a persistent upper layer of this size; None: ephemeral (RAM)
    auto_remove: bool = True  # remove the box's state when it stops (ignored with a persistent disk)
    engine: str = "auto"
    name: str | None = None  # also its hostname: at most 64 bytes
    # start() restores a saved boot of a box with the same make-up (saved by the first start) instead of
    # booting; False always boots. Boxes that cannot be snapshotted (virtiofs volumes, a persistent disk,
    # the host image, libkrun) boot either way.
    snapshots: bool = True

    def validated(self) -> BoxOptions:
        """A normalised copy (parsed volumes and ports), or ConfigError naming the bad field."""
        volumes = tuple(Volume.parse(v) for v in self.volumes)
        ports = tuple(Port.parse(p) for p in self.ports)
        host_cpus = os.cpu_count() or 1
        _check_int("cpus", self.cpus, 1, host_cpus, "this host has {hi} CPUs")
        _check_int("memory_mib", self.memory_mib, *MEMORY_RANGE)
        if self.disk_size_gb is not None:
            _check_int("disk_size_gb", self.disk_size_gb, 1, 2048)
        if not isinstance(self.snapshots, bool):
            raise ConfigError(f"snapshots must be true or false, not {self.snapshots!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r}: choose one of {', '.join(ENGINES)}")
        _check_env(self.env)
        if self.name is not None and (not isinstance(self.name, str) or len(self.name.encode()) > 64
                                      or "\0" in self.name):
            raise ConfigError(f"name={self.name!r}: a box's name is its hostname: a string of at most 64 bytes")
        if self.working_dir is not None and not self.working_dir.startswith("/"):
            raise ConfigError(f"working_dir={self.working_dir!r} must be an absolute path in the box")
        volumes = _checked_volumes(volumes)
        for port in ports:
            _check_int("ports: host port", port.host, 1, 65535)
            _check_int("ports: guest port", port.guest, 1, 65535)
            if port.protocol not in ("tcp", "udp"):
                raise ConfigError(f"port {port.host}:{port.guest}: protocol must be tcp or udp")
        network = network_mode(self.network)
        if ports and network == "none":
            raise ConfigError("ports need a network: network='internet' or 'full'")
        given: object = self.host_ports  # what the caller passed, not yet what the field's type says
        if isinstance(given, (str, bytes)):
            raise ConfigError(f"host_ports={given!r}: give a list of port numbers")
        for host_port in self.host_ports:
            _check_int("host_ports: port", host_port, 1, 65535)
        if self.host_ports and network == "none":
            raise ConfigError("host_ports need network='internet' (with network='none' a box has no network)")
        return dataclasses.replace(self, volumes=volumes, ports=ports, env=dict(self.env), network=network,
                                   host_ports=tuple(sorted(set(self.host_ports))))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BoxOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown box option(s): {', '.join(sorted(unknown))}")
        data = dict(data)
        data["volumes"] = tuple(Volume(**v) if isinstance(v, dict) else v for v in data.get("volumes", ()))
        data["ports"] = tuple(Port(**p) if isinstance(p, dict) else p for p in data.get("ports", ()))
        data["host_ports"] = tuple(data.get("host_ports", ()))
        return cls(**data)


def _check_env(env: object) -> None:
    if not isinstance(env, Mapping):
        raise ConfigError("env must be a mapping of variable names to strings")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise ConfigError(f"env: {key!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"env: the value of {key} must be a string without NUL bytes")


def _checked_volumes(volumes: tuple[Volume, ...]) -> tuple[Volume, ...]:
    """The volumes with their host paths resolved, or ConfigError naming the bad one."""
    guests = set()
    for vol in volumes:
        if vol.mode not in ("ro", "rw", "cow"):
            raise ConfigError(f"volume {vol.host}:{vol.guest}: mode must be 'ro', 'rw' or 'cow', not {vol.mode!r}")
        if Path(vol.host).is_file():
            if vol.mode == "rw":
                raise ConfigError(f"volume {vol.host}:{vol.guest}: an image file is attached read-only: "
                                  "use mode 'ro' or 'cow'")
        elif not Path(vol.host).is_dir():
            raise ConfigError(f"volume {vol.host}:{vol.guest}: {vol.host} is neither a directory nor an ext4 "
                              "image file on the host")
        if not vol.guest.startswith("/") or vol.guest == "/" or ".." in vol.guest.split("/"):
            raise ConfigError(f"volume {vol.host}:{vol.guest}: the guest path must be absolute, not /, without '..'")
        if vol.guest in guests:
            raise ConfigError(f"volume guest path {vol.guest} is used twice")
        guests.add(vol.guest)
    return tuple(dataclasses.replace(v, host=str(Path(v.host).resolve())) for v in volumes)


def _check_int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        extra = f" ({hint.format(hi=hi)})" if hint else ""
        raise ConfigError(f"{name}={value} is out of range: use {lo}..{hi}{extra}")
