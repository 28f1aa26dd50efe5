"""Settings for boxed tests: command line, ini keys, `boxlite.yaml` profiles and the `boxlite` marker.

Precedence, highest first: marker arguments > command line > ini > yaml profile > defaults.
Every source is checked when it is read; a bad key or value names where it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmm import ENGINES, ConfigError, network_mode

SCOPES = ("test", "module", "session")
PYTHONS = ("host", "image")
DEFAULT_TIMEOUT = 300.0
YAML_NAME = "boxlite.yaml"


@dataclass(frozen=True)
class Settings:
    """What a boxed test runs in. One value per key of the layers above; `None` means "not set here"."""

    image: str | None = None  # None: the embedded default image
    engine: str = "auto"
    cpus: int = 1
    memory_mib: int = 512
    env: Mapping[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()  # extra HOST:GUEST[:mode] volumes, besides the project and the packages
    network: str = "internet"  # "internet" (public addresses only), "none" or "full"; see vmm.BoxOptions
    host_ports: tuple[int, ...] = ()  # host loopback ports an "internet" box may reach
    timeout: float = DEFAULT_TIMEOUT  # seconds per test, setup and teardown included
    scope: str = "test"  # "test": a fresh VM per test; "module"/"session": one VM reused within that scope
    pool_size: int | None = None  # warm boxes kept per box kind; None: sized to the host
    snapshots: bool = True  # scope=test boxes from a warmed-up template, box fixtures from a boot snapshot
    python: str = "host"  # "host": the interpreter running pytest, carried into the box; "image": its python3

    def box_key(self) -> tuple[Any, ...]:
        """What makes two boxes interchangeable (the pool's key)."""
        return (self.image, self.engine, self.cpus, self.memory_mib, tuple(sorted(self.env.items())),
                self.volumes, self.network, self.host_ports, self.python)


# key -> (type check, description). Shared by yaml profiles, ini keys, command line and marker arguments.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_map(v: Any) -> bool:
    return isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "image": (lambda v: v is None or isinstance(v, str), "an image reference (string)"),
    "engine": (lambda v: v in ENGINES, f"one of {', '.join(ENGINES)}"),
    "cpus": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "memory_mib": (lambda v: _is_int(v) and 128 <= v <= 65536, "an integer in 128..65536"),
    "env": (_is_str_map, "a mapping of variable names to strings"),
    "volumes": (_is_str_list, "a list of HOST:GUEST[:ro|rw|cow] strings"),
    "network": (lambda v: True, ""),  # checked (and normalized) by vmm.network_mode in check_values
    "host_ports": (lambda v: isinstance(v, (list, tuple)) and all(_is_int(p) and 1 <= p <= 65535 for p in v),
                   "a list of port numbers (1..65535)"),
    "timeout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                "a positive number of seconds"),
    "scope": (lambda v: v in SCOPES, f"one of {', '.join(SCOPES)}"),
    "pool_size": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "snapshots": (lambda v: isinstance(v, bool), "true or false"),
    "python": (lambda v: v in PYTHONS, f"one of {', '.join(PYTHONS)}"),
}
PROFILE_KEYS = tuple(k for k in CHECKS if k != "scope")
MARKER_KEYS = ("image", "profile", "cpus", "memory_mib", "network", "host_ports", "timeout", "scope", "env",
               "python")


def check_values(values: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    """`values` with tuples for lists, or ConfigError naming the first unknown key or bad value."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
        if key == "network":
            try:
                out[key] = network_mode(value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            continue
        check, what = CHECKS[key]
        if not check(value):
            raise ConfigError(f"{where}: {key}={value!r} is invalid: use {what}")
        out[key] = tuple(value) if isinstance(value, list) else dict(value) if key == "env" else value
    return out


@dataclass(frozen=True)
class Profiles:
    """The named profiles of a `boxlite.yaml`, already checked."""

    path: Path | None
    profiles: Mapping[str, Mapping[str, Any]]
    default: str | None  # the profile used when none is named

    @classmethod
    def load(cls, path: Path | None) -> Profiles:
        """Read `path` (None or missing: no profiles). Schema:

            default_profile: NAME          # optional; else a profile named "default" if there is one
            profiles:
              NAME: {image, engine, cpus, memory_mib, env, volumes, network, host_ports, timeout, pool_size,
                     snapshots, python}
        """
        if path is None or not path.exists():
            return cls(path, {}, None)
        import yaml  # only when there is a file: keeps plain runs from importing it

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read it: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping with a `profiles:` key")
        unknown = set(data) - {"profiles", "default_profile"}
        if unknown:
            raise ConfigError(f"{path}: unknown key {min(unknown)!r} (known: profiles, default_profile)")
        raw = data.get("profiles") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: `profiles` must map profile names to settings")
        profiles = {}
        for name, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: profile {name!r} must be a mapping of settings")
            profiles[str(name)] = check_values(values, PROFILE_KEYS, f"{path}: profile {name!r}")
        default = data.get("default_profile")
        if default is not None and default not in profiles:
            raise ConfigError(f"{path}: default_profile {default!r} is not among the profiles")
        if default is None and "default" in profiles:
            default = "default"
        return cls(path, profiles, default)

    def get(self, name: str | None, where: str) -> Mapping[str, Any]:
        if name is None:
            return self.profiles.get(self.default, {}) if self.default else {}
        if name not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            source = self.path or YAML_NAME
            raise ConfigError(f"{where}: profile {name!r} is not defined in {source} (profiles: {known})")
        return self.profiles[name]


# -- command line and ini --------------------------------------------------------------------------
# (ini key, cli dest, type, help). The ini key is also what `boxlite_*` keys are checked against.
INI: tuple[tuple[str, str, str, str], ...] = (
    ("boxlite", "boxlite", "bool", "run every test in a microVM (like --boxlite)"),
    ("boxlite_image", "boxlite_image", "string", "image for boxed tests (default: the embedded Debian image)"),
    ("boxlite_profile", "boxlite_profile", "string", "profile of boxlite.yaml to use"),
    ("boxlite_engine", "boxlite_engine", "string", f"engine: {', '.join(ENGINES)}"),
    ("boxlite_timeout", "boxlite_timeout", "string", f"seconds per boxed test (default {DEFAULT_TIMEOUT:.0f})"),
    ("boxlite_keep", "boxlite_keep", "bool", "keep the boxes of failed tests for inspection"),
    ("boxlite_config", "boxlite_config", "string", f"path of the profiles file (default: ROOTDIR/{YAML_NAME})"),
    ("boxlite_cpus", "", "string", "vCPUs per box"),
    ("boxlite_memory_mib", "", "string", "memory per box in MiB"),
    ("boxlite_network", "", "string", "boxes' network: internet (public addresses only, the default), none, or "
     "full (everything the host reaches, its loopback too)"),
    ("boxlite_host_ports", "", "string", "host loopback ports (comma-separated) an internet box may reach at "
     "host.boxlite.internal"),
    ("boxlite_scope", "", "string", f"box reuse for --boxlite: {', '.join(SCOPES)} (default test)"),
    ("boxlite_pool_size", "", "string", "warm boxes kept ahead per box kind (default: sized to the host)"),
    ("boxlite_snapshots", "boxlite_snapshots", "bool",
     "scope test: restore each test's VM from a snapshot of a warmed-up one, and box fixtures from a boot "
     "snapshot (default true)"),
    ("boxlite_python", "boxlite_python", "string",
     "python of boxed tests: host (the interpreter running pytest, with its venv; the default) or image (the "
     "image's python3, which must have the host's minor version)"),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("boxlite", "run tests in hardware-isolated microVMs (pytest-boxlite)")
    group.addoption("--boxlite", action="store_true", default=None,
                    help="run every test of the session in a microVM (scope test: a fresh VM per test).")
    group.addoption("--boxlite-image", metavar="IMAGE", default=None,
                    help="image for boxed tests: an OCI reference, oci:PATH, docker-archive:PATH, dir:PATH "
                         "(default: the embedded Debian image with python3).")
    group.addoption("--boxlite-profile", metavar="NAME", default=None,
                    help=f"profile of {YAML_NAME} to use for boxed tests.")
    group.addoption("--boxlite-engine", metavar="ENGINE", default=None, choices=ENGINES,
                    help=f"engine for boxes: {', '.join(ENGINES)} (default auto).")
    group.addoption("--boxlite-timeout", metavar="SECONDS", type=float, default=None,
                    help=f"kill a boxed test after this many seconds and fail it (default {DEFAULT_TIMEOUT:.0f}).")
    group.addoption("--boxlite-keep", action="store_true", default=None,
                    help="keep the boxes of failed tests (their id is in the report) instead of removing them.")
    group.addoption("--boxlite-config", metavar="PATH", default=None,
                    help=f"path of the profiles file (default: ROOTDIR/{YAML_NAME} if it exists).")
    group.addoption("--boxlite-no-snapshots", dest="boxlite_snapshots", action="store_false", default=None,
                    help="boot every scope=test box and box fixture instead of restoring it from a snapshot "
                         "(slower; for comparison or when snapshots misbehave).")
    group.addoption("--boxlite-python", metavar="PYTHON", default=None, choices=PYTHONS,
                    help="python of boxed tests: host (the interpreter running pytest, its venv and packages, "
                         "whatever python the image has; default) or image (the image's python3 with the "
                         "host's pure-Python packages; it must have the host's minor version).")
    for key, _, kind, help_ in INI:
        parser.addini(key, help_, type=kind, default=None)  # type: ignore[arg-type]  # INI's kinds are addini's


def _ini_keys(config: pytest.Config) -> set[str]:
    # pytest 9 deprecates `config.inicfg` with no public list of the keys set; pytest < 9 has only that.
    raw = getattr(config, "_inicfg", None)
    return set(raw if raw is not None else config.inicfg)


def _ini_value(config: pytest.Config, key: str, kind: str) -> Any:
    """The ini value converted to the setting's type, or None when not set (every key defaults to None)."""
    value = config.getini(key)
    if value is None or value == "":
        return None
    if key == "boxlite_network":  # a mode, or a boolean as the key was before modes
        lowered = value.strip().lower()
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(lowered, lowered)
    if key == "boxlite_host_ports":
        try:
            return [int(p) for p in value.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"ini {key} = {value!r}: expected port numbers, e.g. 5432, 6379") from None
    if kind == "bool" or key in ("boxlite_image", "boxlite_profile", "boxlite_config",
                                                  "boxlite_engine", "boxlite_scope", "boxlite_python"):
        return value
    try:
        return float(value) if key == "boxlite_timeout" else int(value)
    except ValueError:
        raise ConfigError(f"ini {key} = {value!r}: expected a number") from None


@dataclass(frozen=True)
class SessionConfig:
    """The session-wide layers (command line > ini > yaml profile > defaults), without any marker."""

    enabled: bool  # --boxlite: every test goes in a box
    keep: bool
    profiles: Profiles
    profile: str | None  # the session's profile name (command line or ini)
    layers: Mapping[str, Any]  # command line over ini, checked; profile values come underneath per test

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> SessionConfig:
        for key in _ini_keys(config):
            if key.startswith("boxlite") and key not in {k for k, *_ in INI}:
                raise ConfigError(f"ini key {key!r} is unknown to pytest-boxlite "
                                  f"(known: {', '.join(k for k, *_ in INI)})")
        ini = {key: _ini_value(config, key, kind) for key, _, kind, _ in INI}
        opt = config.option

        def pick(cli: Any, ini_key: str) -> Any:
            return cli if cli is not None else ini[ini_key]

        path_value = pick(opt.boxlite_config, "boxlite_config")
        path = Path(path_value) if path_value else config.rootpath / YAML_NAME
        if path_value and not path.is_absolute():
            base = config.invocation_params.dir if opt.boxlite_config else config.rootpath
            path = base / path
        if path_value and not path.exists():
            raise ConfigError(f"boxlite_config: {path} does not exist")
        layers = {
            "image": pick(opt.boxlite_image, "boxlite_image"),
            "engine": pick(opt.boxlite_engine, "boxlite_engine"),
            "timeout": pick(opt.boxlite_timeout, "boxlite_timeout"),
            "cpus": ini["boxlite_cpus"],
            "memory_mib": ini["boxlite_memory_mib"],
            "network": ini["boxlite_network"],
            "host_ports": ini["boxlite_host_ports"],
            "scope": ini["boxlite_scope"],
            "pool_size": ini["boxlite_pool_size"],
            "snapshots": pick(opt.boxlite_snapshots, "boxlite_snapshots"),
            "python": pick(opt.boxlite_python, "boxlite_python"),
        }
        layers = check_values({k: v for k, v in layers.items() if v is not None}, tuple(CHECKS),
                              "command line / ini")
        profiles = Profiles.load(path)
        profile = pick(opt.boxlite_profile, "boxlite_profile")
        profiles.get(profile, "--boxlite-profile")  # an unknown name is a usage error now, not per test
        return cls(enabled=bool(pick(opt.boxlite, "boxlite")), keep=bool(pick(opt.boxlite_keep, "boxlite_keep")),
                   profiles=profiles, profile=profile, layers=layers)

    def settings(self, marker: Mapping[str, Any] | None = None, where: str = "boxlite marker") -> Settings:
        """Settings for one test: its marker arguments (already checked) over the session's layers."""
        marker = dict(marker or {})
        profile = self.profiles.get(marker.pop("profile", None) or self.profile, where)
        merged = {**profile, **self.layers, **marker}
        return dataclasses.replace(Settings(), **merged)

    @property
    def default_pool_size(self) -> int:
        settings = self.settings()
        return settings.pool_size if settings.pool_size is not None else host_pool_size(settings.memory_mib)


def marker_arguments(item: pytest.Item) -> dict[str, Any] | None:
    """The merged arguments of the item's `boxlite` markers (closest wins), or None if it has none.

    Raises ConfigError naming a bad argument.
    """
    markers = list(item.iter_markers("boxlite"))
    if not markers:
        return None
    merged: dict[str, Any] = {}
    for mark in reversed(markers):  # farthest first, so that closer markers override
        if mark.args:
            raise ConfigError(f"boxlite marker takes keyword arguments only ({', '.join(MARKER_KEYS)}), "
                              f"got {mark.args!r}")
        merged.update(mark.kwargs)
    profile = merged.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise ConfigError(f"boxlite marker: profile={profile!r} must be a profile name")
    return {"profile": profile, **check_values({k: v for k, v in merged.items() if k != "profile"}, MARKER_KEYS,
                                               "boxlite marker")}


def host_pool_size(memory_mib: int) -> int:
    """Warm boxes to keep ahead: one per host CPU (a TCG VM keeps one busy), within free memory, 1..4."""
    cpus = os.cpu_count() or 1
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        by_memory = int(pages // (2 * memory_mib << 20))
    except (ValueError, OSError):
        by_memory = 1
    return max(1, min(4, cpus, by_memory))
