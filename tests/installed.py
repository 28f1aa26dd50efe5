"""The package as users get it: this checkout built into an sdist and a wheel (`python -m build`, the wheel
built from the sdist), installed with pip into fresh venvs outside the checkout.

Fixtures (session-scoped, shared by every test that uses them; imported by conftest.py):
    dists           -> Dists(wheel, sdist): the built files
    installed_venv  -> Path of the python of a venv with the wheel installed (and nothing else of the project)
`user_env()` is the environment to run that python with: as a user's, with nothing pointing into the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 600  # pip fetches the dependencies (and, for the build, setuptools) from the package index


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path


def user_env(**extra: str) -> dict[str, str]:
    """os.environ without what would make a run use the checkout (PYTHONPATH, BOXLITE_AGENT, a venv); the
    runtime home ($BOXLITE_HOME) stays, with its images."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BOXLITE_AGENT", "VIRTUAL_ENV")}
    return {**env, **extra}


def run(argv: list[str | Path], cwd: Path, timeout: float = PIP_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """`argv` in `cwd` with user_env(); AssertionError with its output if it fails."""
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=user_env(**env), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def fresh_venv(path: Path, *requirements: str | Path, pip_args: tuple[str, ...] = ()) -> Path:
    """A new venv at `path` with `requirements` pip-installed; its python."""
    run([sys.executable, "-m", "venv", path], cwd=path.parent)
    python = path / "bin" / "python"
    if requirements:
        run([python, "-m", "pip", "install", "-q", *pip_args, *requirements], cwd=path.parent)
    return python


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    work = tmp_path_factory.mktemp("dists")
    tool = fresh_venv(work / "build-tool", "build")
    run([tool, "-m", "build", "--outdir", work / "dist", ROOT], cwd=work)
    (wheel,) = (work / "dist").glob("*.whl")
    (sdist,) = (work / "dist").glob("*.tar.gz")
    return Dists(wheel, sdist)


@pytest.fixture(scope="session")
def installed_venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("installed") / "venv", dists.wheel)
