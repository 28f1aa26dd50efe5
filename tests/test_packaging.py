"""`pip install pytest-boxlite` as users do it: from the wheel and from the sdist, into fresh venvs outside the
checkout (no PYTHONPATH, no BOXLITE_AGENT), then `boxlite doctor` and `pytest --boxlite` on a small project."""

from __future__ import annotations

import os
import platform
import struct
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path
from xml.etree import ElementTree

import pytest

import vmm
from tests.installed import Dists, fresh_venv, run, user_env
from vmm import BoxOptions, Runtime, agent, engines, kernel, snapshot
from vmm.errors import EngineUnavailable
from vmm.images import resolve_image

AGENT_IN_PACKAGE = "vmm/bin/boxlite-agent"
PT_INTERP = 3

SAMPLE = '''
import os

import pytest


def test_writes_into_the_project():
    with open("written-by-a-test.txt", "w") as f:  # in a box, the write stays in the box
        f.write("x")
    assert os.path.exists("written-by-a-test.txt")


def test_fails():
    assert 6 * 7 == 41


@pytest.mark.skipif(os.sep == "/", reason="skipped everywhere")
def test_skipped():
    pass
'''
EXPECTED = {"test_writes_into_the_project": "passed", "test_fails": "failed", "test_skipped": "skipped"}


def is_static_elf(data: bytes) -> bool:
    """An x86-64/aarch64 ELF executable with no program interpreter (no dynamic loader, no shared C library)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return PT_INTERP not in types


def site_packages(python: Path) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip())


def listing(directory: Path) -> set[tuple[str, int, int]]:
    """Every file and directory below `directory`, with its size and modification time."""
    found = set()
    for top, dirs, files in os.walk(directory):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            found.add((os.path.relpath(os.path.join(top, name), directory), st.st_size, st.st_mtime_ns))
    return found


def outcomes(junitxml: Path) -> dict[str, str]:
    result = {}
    for case in ElementTree.parse(junitxml).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[case.get("name")] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            kinds[0] if kinds else "", "passed")
    return result


def check_installed_package_runs_tests(python: Path, tmp_path: Path) -> None:
    """`boxlite doctor` passes, and `pytest --boxlite` on a sample project gives a local run's outcomes, in boxes,
    without writing into site-packages."""
    bin_dir = python.parent
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_sample.py").write_text(SAMPLE)
    before = listing(site_packages(python))

    doctor = run([bin_dir / "boxlite", "doctor"], cwd=project)
    assert "ready: this host runs boxes" in doctor.stdout

    boxed = subprocess.run([bin_dir / "pytest", "--boxlite", "-v", "-p", "no:cacheprovider",
                            f"--junitxml={tmp_path / 'boxed.xml'}"], cwd=project, env=user_env(),
                           capture_output=True, text=True, timeout=900)
    assert boxed.returncode == 1, boxed.stdout + boxed.stderr  # test_fails failed, nothing else went wrong
    assert outcomes(tmp_path / "boxed.xml") == EXPECTED, boxed.stdout
    for name in EXPECTED:  # each test ran in a box (-v names it)
        assert any(name in line and "[box " in line for line in boxed.stdout.splitlines()), boxed.stdout
    assert not (project / "written-by-a-test.txt").exists()  # the boxed write stayed in its box
    assert listing(site_packages(python)) == before  # nothing built or cached into the installed package

    local = subprocess.run([bin_dir / "pytest", "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'local.xml'}"],
                           cwd=project, env=user_env(), capture_output=True, text=True, timeout=300)
    assert outcomes(tmp_path / "local.xml") == EXPECTED, local.stdout
    assert (project / "written-by-a-test.txt").exists()


def test_the_wheel_is_a_platform_wheel_holding_the_static_agent(dists: Dists):
    assert dists.wheel.name == f"pytest_boxlite-{vmm.__version__}-py3-none-linux_{platform.machine()}.whl"
    with zipfile.ZipFile(dists.wheel) as wheel:
        info = wheel.getinfo(AGENT_IN_PACKAGE)
        assert info.external_attr >> 16 & 0o111, "the agent is not executable"
        assert is_static_elf(wheel.read(AGENT_IN_PACKAGE))
        names = wheel.namelist()
        meta_dir = f"pytest_boxlite-{vmm.__version__}.dist-info"
        metadata = Parser().parsestr(wheel.read(f"{meta_dir}/METADATA").decode())
        wheel_info = Parser().parsestr(wheel.read(f"{meta_dir}/WHEEL").decode())
        entry_points = wheel.read(f"{meta_dir}/entry_points.txt").decode()
    assert not [n for n in names if n.startswith(("guest/", "tests/"))]
    assert {"vmm/py.typed", "pytest_boxlite/py.typed"} <= set(names)  # PEP 561: type checkers read the annotations
    assert (metadata["Name"], metadata["Version"]) == ("pytest-boxlite", vmm.__version__)
    assert wheel_info["Root-Is-Purelib"] == "false"
    assert "boxlite = vmm.cli:main" in entry_points.split("[console_scripts]")[1].split("[")[0]
    assert "boxlite = pytest_boxlite.plugin" in entry_points.split("[pytest11]")[1].split("[")[0]


def test_the_sdist_holds_the_agent_source_and_no_build_products(dists: Dists):
    with tarfile.open(dists.sdist) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"guest/agent.c", "guest/PROTOCOL.md", "setup.py", "vmm/agent_build.py", "vmm/hostpackages.py",
            "vmm/py.typed", "pytest_boxlite/py.typed"} <= names
    assert not [n for n in names if n.startswith(("vmm/bin", "tests/", "build/")) or n.endswith(".pyc")]


def test_the_installed_wheel_gives_the_cli_and_the_plugin(installed_venv: Path, tmp_path: Path):
    show = run([installed_venv, "-m", "pip", "show", "pytest-boxlite"], cwd=tmp_path).stdout
    assert f"Version: {vmm.__version__}" in show
    assert run([installed_venv.parent / "boxlite", "--help"], cwd=tmp_path).stdout.startswith("usage: boxlite")
    assert "--boxlite" in run([installed_venv.parent / "pytest", "--help"], cwd=tmp_path).stdout
    # It is the installed package that runs, with the agent the wheel ships
    found = run([installed_venv, "-c", "import vmm.agent as a; print(a.binary())"], cwd=tmp_path).stdout.strip()
    assert found == str(site_packages(installed_venv) / AGENT_IN_PACKAGE)


def test_tests_run_in_boxes_under_the_installed_wheel(installed_venv: Path, tmp_path: Path):
    check_installed_package_runs_tests(installed_venv, tmp_path)


def test_the_sdist_installs_compiling_the_agent_and_runs_tests(dists: Dists, tmp_path: Path):
    python = fresh_venv(tmp_path / "venv", dists.sdist, pip_args=("--no-cache-dir",))
    agent = site_packages(python) / AGENT_IN_PACKAGE
    assert is_static_elf(agent.read_bytes())
    check_installed_package_runs_tests(python, tmp_path)


def test_building_without_a_compiler_says_what_to_install(dists: Dists, tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", tmp_path,
                           dists.sdist], cwd=tmp_path, env=user_env(CC="/nonexistent/cc"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0
    assert "the C compiler `/nonexistent/cc` is missing" in done.stdout + done.stderr
    assert "apt-get install gcc libc6-dev" in done.stdout + done.stderr


# ---------------------------------------------------------------- the agent of a source checkout


def test_a_checkout_compiles_its_agent_once_per_source(tmp_path: Path):
    source = tmp_path / "agent.c"
    source.write_bytes(agent.SOURCE.read_bytes())
    first = agent.compiled(source, tmp_path / "home-agent")
    assert is_static_elf(first.read_bytes())
    assert agent.compiled(source, tmp_path / "home-agent") == first  # built once
    source.write_bytes(agent.SOURCE.read_bytes() + b"\n/* changed */\n")
    second = agent.compiled(source, tmp_path / "home-agent")
    assert second != first and first.exists() and second.exists()


def test_a_checkout_without_a_compiler_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(EngineUnavailable, match=r"apt-get install gcc libc6-dev"):
        agent.compiled(agent.SOURCE, tmp_path)


def test_a_changed_agent_changes_the_boot_files_and_snapshot_keys(runtime, tmp_path: Path, monkeypatch):
    built = agent.binary()
    changed = tmp_path / "boxlite-agent"
    changed.write_bytes(built.read_bytes() + b"\0")  # another agent, as a changed agent.c gives
    reinstalled = tmp_path / "reinstalled-agent"
    reinstalled.write_bytes(built.read_bytes())  # the same agent with a new mtime, as `pip install` leaves it
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "images").symlink_to(runtime.home.images)  # the session's images; boot files of its own
    runtime = Runtime(tmp_path / "home")
    engine = engines.select("auto", runtime.kernel.release)
    image = resolve_image(None, runtime.home.root)
    keys, boot = [], []
    for path in (built, changed, reinstalled):
        monkeypatch.setenv("BOXLITE_AGENT", str(path))
        files = kernel.boot_files(runtime.home.kernels, runtime.kernel, path)
        boot.append(files.initramfs)
        keys.append(snapshot.template_key(BoxOptions(), image, engine, files, agent.digest(path), snapshot.BOOT_KEY))
    assert boot[0] != boot[1] and keys[0] != keys[1]
    assert boot[2] == boot[0] and keys[2] == keys[0]  # keyed by content: a reinstall keeps boot files and snapshots
    assert changed.read_bytes() in boot[1].read_bytes()  # the new initramfs holds the new agent as /init


def test_no_agent_anywhere_says_how_to_get_one(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("BOXLITE_AGENT", raising=False)
    monkeypatch.setattr(agent, "PACKAGED", tmp_path / "site-packages" / "vmm" / "bin" / "boxlite-agent")
    monkeypatch.setattr(agent, "SOURCE", tmp_path / "guest" / "agent.c")
    with pytest.raises(EngineUnavailable, match=r"pip install --force-reinstall pytest-boxlite.*BOXLITE_AGENT"):
        agent.binary()
