"""python="host": the interpreter that runs pytest runs the boxed tests, whatever python the image has.

Real VMs, real images: a Debian 13 root (python3.13, made with mmdebstrap once per runtime home) and a
busybox-only root (no python at all), and the `host` image; a sample project that imports numpy (installed
from the registry into a fresh venv outside the checkout) runs with the outcomes of a local run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from filelock import FileLock

from vmm.errors import HostPythonUnsupported
from vmm.hostpython import LOADER, check_supported, with_interpreter
from vmm.images.default import remove_tree

ROOT = Path(__file__).resolve().parent.parent
HOST = f"{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the test roots are made as root (mmdebstrap, device nodes)"),
]

SAMPLE = '''
import multiprocessing
import subprocess
import sys

import numpy as np
import pytest

HOST_VERSION = {version!r}


def test_numpy():
    assert np.arange(10).sum() == 45
    assert np.linalg.inv(np.eye(3)).trace() == 3.0


def test_the_hosts_interpreter():
    assert sys.version == HOST_VERSION


def test_a_subprocess_of_sys_executable():
    out = subprocess.run([sys.executable, "-c", "import numpy, sys; print(numpy.ones(3).sum(), sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3.0", sys.prefix]


def _square(x):
    return x * x


def test_multiprocessing():
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_square, range(4)) == [0, 1, 4, 9]


def test_the_images_shell():
    assert subprocess.run(["sh", "-c", "echo shell"], capture_output=True, text=True).stdout == "shell\\n"


@pytest.mark.timeout(5)
def test_within_five_seconds():
    assert np.ones(2).sum() == 2


def test_fails():
    assert np.zeros(2).tolist() == [1.0]


@pytest.mark.skip(reason="skipped here and there")
def test_skipped():
    pass
'''
OUTCOME = re.compile(r"^(test_\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)")


@pytest.fixture(scope="session")
def numpy_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with numpy, pytest-timeout and this plugin; its python."""
    venv = tmp_path_factory.mktemp("numpy-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "numpy", "pytest-timeout", "-e", str(ROOT)],
                   check=True, capture_output=True)
    return python


@pytest.fixture(scope="session")
def trixie_root(runtime) -> Path:
    """A Debian 13 root whose python3 is 3.13, made once per runtime home (mmdebstrap from the registry)."""
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap)")
    root = runtime.home.root / "test-roots" / "trixie-python3"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        if not (root / "usr" / "bin" / "python3").exists():
            partial = root.with_name(root.name + ".partial")
            remove_tree(partial)
            subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3", "trixie", str(partial)],
                           check=True, capture_output=True)
            partial.rename(root)
    assert os.readlink(root / "usr" / "bin" / "python3") != f"python{HOST}"  # the point of this root
    return root


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with busybox's static binary and its applets, and no python at all."""
    root = tmp_path_factory.mktemp("busybox-root")
    for directory in ("bin", "usr", "etc", "tmp"):
        (root / directory).mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "echo", "ls", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def sample_project(tmp_path: Path, extra: str = "") -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_sample.py").write_text(SAMPLE.format(version=sys.version) + extra)
    return project


def pytest_in(python: Path, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "pytest", "-v", "-p", "no:cacheprovider", *args], cwd=project,
                          capture_output=True, text=True, timeout=900)


def outcomes(run: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(m.groups() for m in map(OUTCOME.match, run.stdout.splitlines()) if m)


def restored(run: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"(\d+) boxes restored from snapshots", run.stdout)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("root", ["trixie_root", "busybox_root"])
def test_the_hosts_python_runs_in_an_image_with_another_python_or_none(request, numpy_venv, root, tmp_path):
    image = f"dir:{request.getfixturevalue(root)}"
    project = sample_project(tmp_path)
    local = pytest_in(numpy_venv, project)
    boxed = pytest_in(numpy_venv, project, "--boxlite", f"--boxlite-image={image}")
    assert outcomes(local) == outcomes(boxed), boxed.stdout[-3000:] + boxed.stderr[-2000:]
    assert len(outcomes(local)) == 8 and list(outcomes(local).values()).count("PASSED") == 6
    assert restored(boxed) == 8  # every test in a box restored from the template: no boot per test


def test_python_image_with_another_version_is_one_error_before_any_test(numpy_venv, trixie_root, tmp_path):
    project = sample_project(tmp_path)
    run = pytest_in(numpy_venv, project, "--boxlite", f"--boxlite-image=dir:{trixie_root}",
                    "--boxlite-python=image")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, run.stderr
    assert "python3.13" in errors[0] and f"python{HOST}" in errors[0] and 'python="host"' in errors[0]
    assert not outcomes(run) and "no tests ran" in run.stdout and "saving a snapshot" not in run.stdout


def test_python_image_without_any_python_says_so(numpy_venv, busybox_root, tmp_path):
    project = sample_project(tmp_path)
    run = pytest_in(numpy_venv, project, "--boxlite", f"--boxlite-image=dir:{busybox_root}",
                    "--boxlite-python=image")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "has no python3" in run.stderr and 'python="host"' in run.stderr


def test_the_host_image_restores_from_snapshots_and_keeps_home_out(numpy_venv, tmp_path):
    project = sample_project(tmp_path)
    secret = Path("/root") / f".boxlite-secret-{uuid.uuid4().hex}"
    (project / "test_secret.py").write_text(f"import os\n\ndef test_roots_home_is_not_there():\n"
                                            f"    assert not os.path.exists({str(secret)!r})\n")
    secret.write_text("secret")
    try:
        local = pytest_in(numpy_venv, project, "--ignore=test_secret.py")
        boxed = pytest_in(numpy_venv, project, "--boxlite", "--boxlite-image=host")
    finally:
        secret.unlink()
    found = outcomes(boxed)
    assert found.pop("test_secret.py::test_roots_home_is_not_there") == "PASSED", boxed.stdout[-3000:]
    assert outcomes(local) == found, boxed.stdout[-3000:] + boxed.stderr[-2000:]
    assert found["test_sample.py::test_within_five_seconds"] == "PASSED"
    assert restored(boxed) == 9


def test_the_executable_in_the_prefix_image_asks_for_the_relocated_loader(tmp_path):
    executable = Path(check_supported())
    patched = tmp_path / "python"
    patched.write_bytes(with_interpreter(executable.read_bytes(), LOADER, str(executable)))
    shown = subprocess.run(["readelf", "-l", str(patched)], capture_output=True, text=True, check=True).stdout
    assert f"[Requesting program interpreter: {LOADER}]" in shown
    # Nothing else moved: the same dynamic section.
    before = subprocess.run(["readelf", "-d", str(executable)], capture_output=True, text=True).stdout
    after = subprocess.run(["readelf", "-d", str(patched)], capture_output=True, text=True).stdout
    assert before.split("\n", 1)[1] == after.split("\n", 1)[1]


@pytest.mark.parametrize("change, says", [
    (lambda mp: mp.setattr("platform.libc_ver", lambda *a, **k: ("", "")), "musl"),
    (lambda mp: mp.setattr(sys, "base_prefix", "/usr"), "the system's (prefix /usr)"),
])
def test_an_interpreter_that_cannot_be_carried_says_to_use_the_images_python(monkeypatch, change, says):
    change(monkeypatch)
    with pytest.raises(HostPythonUnsupported) as error:
        check_supported()
    assert says in str(error.value) and 'python="image"' in str(error.value)


@pytest.mark.skipif(not Path("/usr/bin/python3").is_file(), reason="no system python3 (/usr/bin/python3)")
def test_the_systems_python_runs_the_images_python3_and_says_so(tmp_path):
    """A venv on the distro's own python cannot be carried (its files are the image's paths): the default image's
    python3, the distro's too, runs the tests, restored from snapshots, and the run says why."""
    venv = tmp_path / "system-venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True, capture_output=True)
    project = tmp_path / "project"
    project.mkdir()
    minor = int(subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[1])"],
                               capture_output=True, text=True, check=True).stdout)
    (project / "test_system.py").write_text(
        f"import sys\n\ndef test_version():\n    assert sys.version_info[:2] == (3, {minor})\n\n"
        "def test_fails():\n    assert False\n")
    local = pytest_in(python, project)
    boxed = pytest_in(python, project, "--boxlite")
    assert outcomes(local) == outcomes(boxed) == {"test_system.py::test_version": "PASSED",
                                                  "test_system.py::test_fails": "FAILED"}, boxed.stdout[-3000:]
    assert "is the system's python" in boxed.stdout and 'python="image"' in boxed.stdout
    assert "python image" in boxed.stdout  # the header says which python runs
    assert restored(boxed) == 2
