"""vmm: the pytest-boxlite microVM runtime, usable without pytest.

    from vmm import Runtime, BoxOptions
    with Runtime() as rt, rt.create(BoxOptions(memory_mib=256)) as box:
        print(box.exec("python3", "-c", "print(6 * 7)").stdout)
"""

from .aio import AsyncBox, AsyncExecution, AsyncRuntime
from .box import Box, BoxInfo, BoxMetrics
from .errors import (
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
from .options import BoxOptions, Port, Volume
from .runtime import Runtime, RuntimeMetrics

__version__ = "0.1.0"

__all__ = [
    "AsyncBox", "AsyncExecution", "AsyncRuntime", "Box", "BoxError", "BoxInfo", "BoxliteError", "BoxMetrics",
    "BoxNotFound", "BoxOptions", "ConfigError", "EngineUnavailable", "ExecError", "ExecResult", "ExecTimeout",
    "Execution", "GuestProtocolError", "HostPythonUnsupported", "ImageError", "NoSpaceForTemplate",
    "OutputLimitExceeded", "Port", "PythonMismatch", "Runtime", "RuntimeMetrics", "Volume", "WorkerLost",
    "WorkerTimeout",
]
