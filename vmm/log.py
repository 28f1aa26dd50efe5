"""`BOXLITE_LOG=debug` (or info, warning, ...): the runtime's logging to stderr, turned on where a program starts.

The library itself configures no logging (a handler attached at import would be a side effect of `import vmm`);
the `boxlite` CLI and the pytest plugin call `enable_from_env()`, and so may any program that embeds the runtime.
"""

from __future__ import annotations

import logging
import os

from .errors import ConfigError

ENV = "BOXLITE_LOG"
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_handler: logging.Handler | None = None


def enable_from_env() -> bool:
    """Send the `vmm` loggers' records at `$BOXLITE_LOG`'s level and above to stderr; whether it was set.

    Calling it again changes the level (to what the variable says now) but adds no second handler.
    """
    global _handler
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return False
    if value not in LEVELS:
        raise ConfigError(f"{ENV}={value!r} is not a log level: use one of {', '.join(LEVELS)}")
    logger = logging.getLogger("vmm")
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(_handler)
    logger.setLevel(value.upper())
    return True


__all__ = ["ENV", "enable_from_env"]
