"""vmm: the pytest-boxlite microVM runtime, usable without pytest.

    from vmm import Runtime, BoxOptions
    with Runtime() as rt, rt.create(BoxOptions(memory_mib=256)) as box:
        print(box.exec("python3", "-c", "print(6 * 7)").stdout)
"""

from .aio import AsyncBox, AsyncExecution, AsyncRuntime
from .box import Box, BoxInfo, BoxMetrics
from .engines import select as select_engine
from .errors import (
    AgentTimeout,
    BoxError,
    BoxliteError,
    BoxNotFound,
    ConfigError,
    EngineUnavailable,
    ExecError,
    ExecTimeout,
    GuestProtocolError,
    HostPythonUnsupported,
    ImageError,
    NoSpaceForTemplate,
    OutputLimitExceeded,
    PythonMismatch,
    WorkerLost,
    WorkerTimeout,
)
from .execution import ExecResult, Execution
from .hostpython import HostPython, host_python, interpreter_dirs, system_python
from .images import ResolvedImage, resolve_image
from .images.probe import python_version as image_python_version
from .log import enable_from_env
from .options import ENGINES, BoxOptions, Port, Volume, network_mode
from .runtime import Runtime, RuntimeMetrics
from .snapshot import Template
from .volumes import directory_image

__version__ = "0.1.0"

__all__ = [
    "AgentTimeout", "AsyncBox", "AsyncExecution", "AsyncRuntime", "Box", "BoxError", "BoxInfo", "BoxliteError",
    "BoxMetrics", "BoxNotFound", "BoxOptions", "ConfigError", "EngineUnavailable", "ExecError", "ExecResult",
    "ExecTimeout", "Execution", "GuestProtocolError", "HostPythonUnsupported", "ImageError", "NoSpaceForTemplate",
    "OutputLimitExceeded", "Port", "PythonMismatch", "Runtime", "RuntimeMetrics", "Volume", "WorkerLost",
    "WorkerTimeout",
    "enable_from_env",  # $BOXLITE_LOG: logging to stderr, turned on where a program starts (vmm/log.py)
    # Building blocks the pytest plugin uses (each documented where it is defined): engines by name, images and
    # their python, directories as volume images, the host's interpreter carried into boxes, and the snapshot
    # templates that Runtime.template() builds and Runtime.restore() clones.
    "ENGINES", "HostPython", "ResolvedImage", "Template", "directory_image", "host_python", "image_python_version",
    "interpreter_dirs", "network_mode", "resolve_image", "select_engine", "system_python",
]
