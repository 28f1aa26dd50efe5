"""Compiles the static guest agent into the wheel (vmm/bin/boxlite-agent), which makes it a platform wheel.

Metadata is in pyproject.toml. Building needs a C compiler and a static C library (gcc, libc6-dev).
"""

import importlib.util
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "guest" / "agent.c"
TARGET = Path("vmm", "bin", "boxlite-agent")  # where vmm.agent looks for it


def _agent_build():
    # By path: importing the vmm package would need its dependencies, which the build environment lacks.
    spec = importlib.util.spec_from_file_location("agent_build", ROOT / "vmm" / "agent_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithAgent(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable install runs from the checkout, which builds its agent into the runtime home
        agent_build = _agent_build()
        output = Path(self.build_lib) / TARGET
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            agent_build.compile_agent(SOURCE, output)
        except agent_build.AgentBuildError as exc:
            raise SystemExit(f"error: pytest-boxlite: {exc}") from None

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib) / TARGET)]


class BinaryDistribution(Distribution):
    """Not pure Python: installed as platform-specific files, in a platform wheel."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: any Python 3 (no extension modules), but only this architecture."""

    def get_tag(self):
        return ("py3", "none", super().get_tag()[2])


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPyWithAgent, "bdist_wheel": PlatformWheel})
