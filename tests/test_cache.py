"""The runtime home stays bounded: a size cap, least recently used entries evicted unless a live process uses
them, and what interrupted work leaves removed once its owner is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmm import Runtime, cache, volumes
from vmm.errors import ConfigError
from vmm.home import Home
from vmm.images import resolve_image
from vmm.volumes import directory_image

ROOT = Path(__file__).resolve().parent.parent

# Holds the entries named on its command line (as a runtime using them would), says so, and exits when told.
HOLDER = """
import sys
from pathlib import Path
from filelock import FileLock
from vmm import cache
locks, holds = [], cache.Holds()
for arg in sys.argv[1:]:
    if arg.startswith("build:"):  # a build in progress: its lock held
        lock = FileLock(arg[len("build:"):])
        lock.acquire()
        locks.append(lock)
    else:
        holds.hold(Path(arg), "held")
print("holding", flush=True)
sys.stdin.read()
"""


class Holder:
    """Another live process that uses entries, or builds them, until close()."""

    def __init__(self, *paths: Path | str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, paths)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == "holding\n"
        self.pid = self.proc.pid

    def close(self) -> None:
        self.proc.communicate(timeout=30)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def volume(home: Path, tmp_path: Path, name: str, mib: int) -> Path:
    """A real volume image (an ext4 of a directory holding `mib` MiB) in `home`."""
    src = tmp_path / "src" / name
    src.mkdir(parents=True)
    (src / "data").write_bytes(os.urandom(mib << 20))
    return directory_image(src, home)


def test_sizes_and_where_the_cap_comes_from(tmp_path, monkeypatch):
    assert cache.parse_size("10G") == 10 << 30
    assert cache.parse_size("500M") == 500 << 20
    assert cache.parse_size("1.5GiB") == 3 << 29
    assert cache.parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="e.g. 10G"):
        cache.parse_size("ten gigs")
    home = Home(tmp_path / "home").root
    monkeypatch.delenv(cache.ENV, raising=False)
    default = cache.cache_max(home)
    assert default.bytes <= cache.DEFAULT_MAX and default.source.startswith("default")
    (home / cache.CONFIG_NAME).write_text("cache_max: 200M\n")
    assert cache.cache_max(home) == cache.Cap(200 << 20, str(home / cache.CONFIG_NAME))
    (home / cache.CONFIG_NAME).write_text("cache_max: 200M\ncachemax: 1G\n")
    with pytest.raises(ConfigError, match=r"unknown key 'cachemax' \(known: cache_max\)"):
        Runtime(home)
    (home / cache.CONFIG_NAME).write_text("cache_max: 200M\n")
    monkeypatch.setenv(cache.ENV, "1G")  # the environment wins over the file
    assert cache.cache_max(home).bytes == 1 << 30
    monkeypatch.setenv(cache.ENV, "lots")
    with pytest.raises(ConfigError, match=r"\$BOXLITE_CACHE_MAX 'lots' is not a size"):
        Runtime(home)  # at the start of a run, not at its end


def test_eviction_goes_by_last_use_and_skips_what_a_live_process_uses(tmp_path):
    home = Home(tmp_path / "home").root
    images = [volume(home, tmp_path, name, 2) for name in ("a", "b", "c", "d")]
    holder = Holder(images[0])  # another process uses a, the least recently used
    for age, image in zip((400, 300, 200, 100), images, strict=True):
        t = time.time() - age
        os.utime(cache.use_lock(image), (t, t))
    try:
        size = cache.home_size(home)
        assert cache.survey(home) == (size, cache.entries(home))  # one walk, the same figures
        result = cache.evict(home, size - (3 << 20))  # about two volumes too many
        assert [e.path for e in result.removed] == images[1:3]  # b and c, not a: in use
        assert [e.path for e in result.busy] == [images[0]]
        assert images[0].exists() and images[3].exists()
        assert not cache.use_lock(images[1]).exists() and not Path(f"{images[1]}.lock").exists()
        assert result.size_after <= size - (3 << 20)
    finally:
        holder.close()
    assert cache.evict(home, 0).removed[0].path == images[0]  # its user is gone
    assert not list((home / "images" / "volumes").iterdir())  # no lock files left either


def test_an_entry_evicted_before_it_is_held_is_got_again(tmp_path):
    home = Home(tmp_path / "home").root
    entry, calls = home / "kernels" / "k", []

    def get() -> Path:  # the first time, an eviction removes the entry before the caller holds it
        calls.append(entry)
        if len(calls) > 1:
            entry.mkdir(exist_ok=True)
        return entry

    holds = cache.Holds(home)
    try:
        assert holds.held(get, lambda path: path) == entry and entry.is_dir() and len(calls) == 2
        assert holds.holds(entry) and cache.use_lock(entry).exists()
        assert holds.held(get, lambda path: path) == entry and len(calls) == 3  # held already: got once
        outside = tmp_path / "elsewhere"
        assert holds.held(lambda: outside, lambda path: path) == outside and not holds.holds(outside)
    finally:
        holds.release()


def test_a_volume_image_is_held_before_it_is_looked_for(tmp_path, monkeypatch):
    """An eviction between a volume image's build and the boxes that use it leaves it to the runtime that
    asked for it (`holds`); without a holder it is only recorded as used, and free to evict."""
    home = tmp_path / "home"
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_text("project")
    evictions = []
    real_build = volumes.build_ext4_base

    def build_then_evict(*args, **kwargs):  # another process's `boxlite cache prune --all`, right after the build
        real_build(*args, **kwargs)
        evictions.append(cache.evict(home, None, everything=True))

    monkeypatch.setattr(volumes, "build_ext4_base", build_then_evict)
    holds = cache.Holds()
    image = directory_image(src, home, holds=holds)
    assert image.is_file()
    assert [e.path for e in evictions[0].busy] == [image] and not evictions[0].removed
    assert cache.evict(home, None, everything=True).busy  # held until released, found again or not
    assert directory_image(src, home, holds=holds) == image
    holds.release()
    assert [e.path for e in cache.evict(home, None, everything=True).removed] == [image]
    assert not image.exists()


def test_a_kept_boxs_base_is_not_evicted(tmp_path):
    home = Home(tmp_path / "home").root
    roots = []
    for name in ("kept", "other"):
        root = tmp_path / name
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "bin").symlink_to("usr/bin")
        (root / "name").write_text(name)
        roots.append(root)
    with Runtime(home) as rt:  # a box with a persistent disk, created and never started: it outlives the runtime
        box = rt.create(image=f"dir:{roots[0]}", disk_size_gb=1)
        other = resolve_image(f"dir:{roots[1]}", home).base
    result = cache.evict(home, None, everything=True)
    assert box.image.base.exists() and box.image.base in [e.path for e in result.busy]
    assert not other.exists() and other in [e.path for e in result.removed]
    Runtime(home).remove(box.id)
    assert cache.evict(home, None, everything=True).removed[0].path == box.image.base


def test_leftovers_of_dead_owners_are_removed_and_live_ones_kept(tmp_path):
    home = Home(tmp_path / "home").root
    dead = dead_pid()
    templates, volumes, bases = home / "templates", home / "images" / "volumes", home / "images" / "bases"
    volumes.mkdir(parents=True)
    bases.mkdir(parents=True)
    left = {  # interrupted builds: nobody holds their build locks
        "template": templates / "k1.tmp-0a1b2c3d",
        "base": bases / ".ab.ext4.tmp-x1y2",
        "kernel": home / "kernels" / ".6.1.0-cloud-amd64-0123.tmp-zz",
        "staging": volumes / f".staging-{dead}-0011",
    }
    live = {
        "template": templates / "k2.tmp-4e5f6a7b",
        "staging": None,  # named below, with the holder's pid
    }
    for path in [*left.values(), live["template"]]:
        path.mkdir(parents=True)
        (path / "ram").write_bytes(b"x" * 4096)
    orphan_box, dead_box, live_box = (home / "boxes" / name for name in ("0rph4n", "d34d", "l1v3"))
    orphan_box.mkdir()  # its process died before writing box.json
    old = time.time() - 2 * cache.ORPHAN_AGE_S
    os.utime(orphan_box, (old, old))
    holder = Holder(f"build:{templates / 'k2.lock'}")
    try:
        live["staging"] = volumes / f".staging-{holder.pid}-0022"
        live["staging"].mkdir()
        for box, owner in ((dead_box, dead), (live_box, holder.pid)):
            box.mkdir()
            (box / "box.json").write_text(json.dumps({"owner": owner, "options": {"auto_remove": True}}))
        Runtime(home)  # the next run
        assert [p for p in left.values() if p.exists()] == []
        assert all(p.exists() for p in live.values())
        assert not orphan_box.exists() and not dead_box.exists() and live_box.exists()
    finally:
        holder.close()
    Runtime(home)
    assert not live["template"].exists() and not live["staging"].exists() and not live_box.exists()


# -- whole runs: projects under `pytest --boxlite`, each with its own snapshot template ---------------------

PROJECT_TEST = """
import os

def test_in_a_box():
    assert os.path.exists("/proc/1/comm") and open("/proc/1/comm").read().strip() != "systemd"

def test_its_conftest(project_name):
    assert project_name == {name!r}
"""


def make_project(root: Path, name: str) -> Path:
    project = root / name
    project.mkdir(parents=True)
    # A conftest of its own: a different project volume, so a different template.
    (project / "conftest.py").write_text(textwrap.dedent(f"""
        import pytest

        @pytest.fixture
        def project_name():
            return {name!r}
    """))
    (project / "test_it.py").write_text(PROJECT_TEST.format(name=name))
    return project


def pytest_boxlite(project: Path, home: Path, cap: int | None) -> subprocess.Popen[str]:
    env = dict(os.environ, BOXLITE_HOME=str(home), PYTHONPATH=str(ROOT))
    env.pop(cache.ENV, None)
    if cap is not None:
        env[cache.ENV] = str(cap)
    return subprocess.Popen([sys.executable, "-m", "pytest", "--boxlite", "-q", "-p", "no:cacheprovider"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str]) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "2 passed" in out, out
    return out


@pytest.fixture
def bounded_home(tmp_path, runtime):
    """A home of its own (its templates, bases, volumes and kernels are evicted here, not the session's),
    sharing only the session's default image tree (building it again takes a minute)."""
    resolve_image(None, runtime.home.root)
    home = tmp_path / "home"
    (home / "images").mkdir(parents=True)
    (home / "images" / "default").symlink_to(runtime.home.images / "default", target_is_directory=True)
    return home


def check_consistent(home: Path) -> None:
    """Every entry left is whole, nothing half-done or orphaned is left, and no VM outlives the runs."""
    for entry in cache.entries(home):
        if entry.kind in ("template", "boot snapshot"):
            meta = json.loads((entry.path / "template.json").read_text())
            assert (entry.path / "ram").stat().st_size == 512 << 20 and meta["state_sha256"]
    leftovers = [p for p in home.rglob("*") if ".tmp-" in p.name or p.name.startswith(".staging-")]
    assert leftovers == []
    assert list((home / "boxes").iterdir()) == []
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{home}"], capture_output=True, text=True).stdout
    assert out == ""


@pytest.mark.slow
def test_many_projects_under_a_small_cap_and_two_at_once(bounded_home, tmp_path):
    """Five projects, each its own template (~120 MiB), under a cap that holds two: three one after another,
    each run passing and the home ending within the cap; then two at once under the same pressure."""
    home = bounded_home
    finish(pytest_boxlite(make_project(tmp_path, "p0"), home, None))
    (first,) = [e for e in cache.entries(home) if e.kind == "template"]
    cap = cache.home_size(home) + first.size + (16 << 20)  # what one run needs, plus a second template
    for i in range(1, 3):
        finish(pytest_boxlite(make_project(tmp_path, f"p{i}"), home, cap))
        assert cache.home_size(home) <= cap
    templates = [e for e in cache.entries(home) if e.kind == "template"]
    assert 1 <= len(templates) <= 2 and first.path not in [e.path for e in templates]
    both = [pytest_boxlite(make_project(tmp_path, f"q{i}"), home, cap) for i in range(2)]
    for proc in both:
        finish(proc)
    assert cache.home_size(home) <= cap
    check_consistent(home)
