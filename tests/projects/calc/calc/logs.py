import logging
import signal

log = logging.getLogger("calc")


def checked(value):
    if value > 10:
        log.warning("value %d is large", value)
    return value


def on_alarm(callback):
    """Run `callback` from SIGALRM (a signal delivered to this process)."""
    signal.signal(signal.SIGALRM, lambda *_: callback())
    signal.setitimer(signal.ITIMER_REAL, 0.01)
