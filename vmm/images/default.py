"""The embedded default image: a small Debian root filesystem (minbase + python3) built with
mmdebstrap from the host's own apt sources, so it builds on a machine that reaches only the
Debian mirror. Built once per runtime home (and recipe), atomically, under a file lock.

Layout: `home/images/default/<key>/rootfs/` (the tree) and `<key>/image.json` (its digest).
A `<key>` directory exists only once complete: builds happen in `.tmp-<key>-*` beside it and are
renamed into place; leftovers of a crash or Ctrl-C are removed by the next build.

`boxlite setup` (or `python -m vmm.images`) prebuilds it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from vmm.errors import ImageError
from vmm.images.rootfs import fingerprint

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Bump when the recipe below changes in a way that changes the tree: old builds are then ignored.
RECIPE_VERSION = 1
PACKAGES: tuple[str, ...] = ("python3",)
VARIANT = "minbase"
#: Environment variable naming an apt sources file (.sources or .list) to use instead of the host's.
SOURCES_ENV = "BOXLITE_APT_SOURCES"

_DPKG_OPTS = (
    # documentation, manuals and translations are never needed in a test box
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
_APT_OPTS = (
    'Acquire::Languages "none"',
    'APT::Install-Recommends "false"',
    'APT::Install-Suggests "false"',
    'APT::Sandbox::User "root"',  # _apt often cannot reach the runtime home: no sandbox warning
)
# Files removed after the build, relative to the root (the directories stay).
_EMPTY_DIRS = ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf", "var/log", "tmp", "var/tmp")
_KEEP_IN_EMPTIED = {"var/cache/debconf": ("config.dat", "passwords.dat", "templates.dat")}


@dataclass(frozen=True)
class DefaultImage:
    key: str
    rootfs: Path
    digest: str


# ---------------------------------------------------------------- host facts


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's release codename (bookworm on Debian 12, trixie on Debian 13)."""
    fields: dict[str, str] = {}
    try:
        text = os_release.read_text()
    except OSError as e:
        raise ImageError(
            f"cannot read {os_release} to find the Debian release for the default image ({e}); "
            "use image='dir:PATH' with a root filesystem you built yourself."
        ) from e
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"').strip("'")
    suite = fields.get("VERSION_CODENAME", "")
    if not suite:
        raise ImageError(
            f"{os_release} has no VERSION_CODENAME: the default image is built from the host's Debian "
            "release and cannot tell which. Use image='dir:PATH' with a root filesystem you built."
        )
    return suite


def _suite_matches(suite: str, codename: str) -> bool:
    return suite == codename or suite.startswith((codename + "-", codename + "/"))


def _parse_deb822(text: str) -> list[list[tuple[str, str]]]:
    """Stanzas as lists of (field, value); continuation lines are kept in the value."""
    stanzas: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
                current = []
            continue
        if line[0] in " \t" and current:
            key, value = current[-1]
            current[-1] = (key, value + "\n" + line)
            continue
        key, _, value = line.partition(":")
        current.append((key.strip(), value.strip()))
    if current:
        stanzas.append(current)
    return stanzas


def _filter_deb822(text: str, codename: str) -> str:
    out = []
    for stanza in _parse_deb822(text):
        fields = {k.lower(): v for k, v in stanza}
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        suites = [s for s in fields.get("suites", "").split() if _suite_matches(s, codename)]
        if not suites or "main" not in fields.get("components", "").split():
            continue
        lines = []
        for key, value in stanza:
            if key.lower() == "types":
                value = "deb"
            elif key.lower() == "suites":
                value = " ".join(suites)
            lines.append(f"{key}: {value}")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n" if out else ""


def _filter_one_line(text: str, codename: str) -> str:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        # deb [options] uri suite components...
        rest = line[4:].strip()
        if rest.startswith("["):
            opts, _, rest = rest[1:].partition("]")
            opts = f"[{opts.strip()}] "
        else:
            opts = ""
        words = rest.split()
        if len(words) >= 3 and _suite_matches(words[1], codename) and "main" in words[2:]:
            out.append(f"deb {opts}{' '.join(words)}")
    return "\n".join(out) + "\n" if out else ""


def host_sources(codename: str, etc_apt: Path = Path("/etc/apt")) -> dict[str, str]:
    """The host's apt sources for its own release, as {"host.sources": text, "host.list": text}.

    Only `deb` entries for the codename (and its -updates/-security/... suites) with a `main`
    component are kept: third-party repositories (docker, nodesource, cloud SDKs) are often not
    reachable from where the image is built, and are not needed for minbase + python3.
    """
    deb822 = []
    one_line = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        one_line.append(_filter_one_line(main_list.read_text(errors="replace"), codename))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.name.endswith(".sources") and f.is_file():
                deb822.append(_filter_deb822(f.read_text(errors="replace"), codename))
            elif f.name.endswith(".list") and f.is_file():
                one_line.append(_filter_one_line(f.read_text(errors="replace"), codename))
    result = {}
    if "".join(deb822):
        result["host.sources"] = "\n".join(s for s in deb822 if s)
    if "".join(one_line):
        result["host.list"] = "".join(one_line)
    return result


def _mmdebstrap() -> str:
    found = shutil.which("mmdebstrap")
    if not found:
        raise ImageError(
            "mmdebstrap was not found (it builds the default Debian image): install it with "
            "`apt-get install mmdebstrap`, or use image='dir:PATH' with a root filesystem of your own."
        )
    return found


def _arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return platform.machine()


def recipe_key(suite: str) -> str:
    """Directory name for the default image: suite + a hash of everything that shapes the tree."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": suite,
        "arch": _arch(),
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "dpkg": _DPKG_OPTS,
        "apt": _APT_OPTS,
    }
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"{suite}-{h[:16]}"


# ---------------------------------------------------------------- mount-safe cleanup


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (mmdebstrap mounts /proc, /sys, /dev in the tree while it
    runs; a killed build may leave them: never delete through them)."""
    prefix = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4]
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
                if point == prefix or point.startswith(prefix + "/"):
                    found.append(point)
    except OSError:
        pass
    return found


def remove_tree(path: Path) -> bool:
    """Delete a (half-)built tree, unmounting what a killed mmdebstrap left mounted in it first.
    Returns False (and leaves the tree) if something is still mounted there."""
    if not os.path.lexists(path):
        return True
    mounts = _mounts_under(path)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    still = _mounts_under(path)
    if still:
        log.warning("not removing %s: %s still mounted there; unmount it and delete the directory",
                    path, ", ".join(still))
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


# ---------------------------------------------------------------- building


def default_dir(home: Path) -> Path:
    return Path(home) / "images" / "default"


def _load(final: Path) -> DefaultImage | None:
    try:
        meta = json.loads((final / "image.json").read_text())
        rootfs = final / "rootfs"
        if rootfs.is_dir() and str(meta["digest"]).startswith("sha256:"):
            return DefaultImage(key=final.name, rootfs=rootfs, digest=meta["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def ensure_default_image(home: Path, progress: Progress | None = None) -> DefaultImage:
    """The default image of this host's release, building it first if needed."""
    suite = host_suite()
    key = recipe_key(suite)
    parent = default_dir(home)
    final = parent / key
    image = _load(final)
    if image:
        return image
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f"{key}.lock")):
        image = _load(final)
        if image:  # another process built it while we waited for the lock
            return image
        for stale in parent.glob(f".tmp-{key}-*"):
            log.info("removing %s left by an interrupted build", stale)
            remove_tree(stale)
        if os.path.lexists(final):  # incomplete (no image.json): should not happen, but never use it
            log.warning("removing incomplete default image %s", final)
            if not remove_tree(final):
                raise ImageError(f"cannot remove the incomplete default image {final}: see the log")
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=parent))
        try:
            started = time.monotonic()
            rootfs = work / "rootfs"
            _run_mmdebstrap(suite, rootfs, work, progress)
            _slim(rootfs)
            digest = fingerprint(rootfs)
            meta = {"digest": digest, "suite": suite, "packages": list(PACKAGES), "variant": VARIANT,
                    "recipe": RECIPE_VERSION, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for name in ("host.sources", "host.list"):
                (work / name).unlink(missing_ok=True)
            (work / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
            os.chmod(work, 0o755)  # mkdtemp made it private; the image is readable by all
            os.rename(work, final)
            elapsed = time.monotonic() - started
            log.info("default image %s built in %.0f s: %s", key, elapsed, final)
            if progress:
                progress(f"default image built in {elapsed:.0f} s: {final / 'rootfs'}")
        finally:
            if os.path.lexists(work):
                remove_tree(work)
    image = _load(final)
    if image is None:
        raise ImageError(f"the default image at {final} is unreadable after building it; delete {final}")
    return image


def build_default_rootfs(home: Path, progress: Progress | None = None) -> Path:
    """Build (once) and return the root filesystem directory of the default image."""
    return ensure_default_image(home, progress).rootfs


def _run_mmdebstrap(suite: str, rootfs: Path, work: Path, progress: Progress | None) -> None:
    exe = _mmdebstrap()
    if os.geteuid() != 0:
        raise ImageError(
            "building the default image needs root for now (mmdebstrap must create root-owned files): "
            "run the setup step as root (`sudo boxlite setup`), "
            "or use image='dir:PATH' with a root filesystem you built."
        )
    override = os.environ.get(SOURCES_ENV)
    mirrors: list[str] = []
    if override:
        if not override.endswith((".sources", ".list")) or not os.path.isfile(override):
            raise ImageError(f"{SOURCES_ENV}={override} must name an existing apt .sources or .list file")
        mirrors.append(override)
    else:
        for name, text in host_sources(suite).items():
            (work / name).write_text(text)
            mirrors.append(str(work / name))
        if not mirrors:
            raise ImageError(
                f"no apt source for {suite} (with a main component) in /etc/apt/sources.list or "
                f"/etc/apt/sources.list.d/: the default image is built from the host's Debian mirror. "
                f"Add one, or set {SOURCES_ENV} to a .sources/.list file to use."
            )
    args = [exe, f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", "--mode=root",
            "--format=directory"]
    hooks = Path("/usr/share/mmdebstrap/hooks/maybe-merged-usr")
    if hooks.is_dir():  # merged /usr without pulling in usrmerge and perl (~50 MB)
        args.append(f"--hook-dir={hooks}")
    args += [f"--aptopt={o}" for o in _APT_OPTS]
    args += [f"--dpkgopt={o}" for o in _DPKG_OPTS]
    args += [suite, str(rootfs), *mirrors]
    log.info("running %s", " ".join(args))
    if progress:
        progress(f"building the default image ({suite}, {VARIANT} + {', '.join(PACKAGES)}) with mmdebstrap; "
                 "this takes a minute or two")
    tail: collections.deque[str] = collections.deque(maxlen=25)
    # its own process group: on our Ctrl-C (or any exception) we interrupt all of mmdebstrap's
    # processes at once, which is what it expects, instead of only the main one
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            log.debug("mmdebstrap: %s", line)
            if progress and line[:2] in ("I:", "W:", "E:"):
                progress("mmdebstrap: " + line[2:].strip())
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: let mmdebstrap unmount and clean up (as on Ctrl-C)
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        if any("received signal" in line for line in tail):
            raise ImageError("mmdebstrap was interrupted building the default image; run again to build it")
        raise ImageError(
            f"mmdebstrap failed (exit {rc}) building the default image:\n" + "\n".join(tail) +
            "\nCheck that the Debian mirror in the host's apt sources is reachable (`apt-get update`)."
        )


def _signal_group(proc: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _slim(rootfs: Path) -> None:
    """Drop apt lists and caches, logs and temporary files: the image is read-only and small."""
    for rel in _EMPTY_DIRS:  # files only: apt and dpkg expect the directories (lists/partial, ...)
        d = rootfs / rel
        if not d.is_dir() or d.is_symlink():
            continue
        keep = _KEEP_IN_EMPTIED.get(rel, ())
        for top, _dirs, files in os.walk(d):
            for name in files:
                if not (top == str(d) and name in keep) and name != "lock":
                    os.unlink(os.path.join(top, name))
    for rel in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        for entry in (rootfs / rel).glob("*"):
            _remove(entry)
    for entry in (rootfs / "usr/share/doc").glob("*/*"):  # keep only the copyright files
        if entry.name != "copyright":
            _remove(entry)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
