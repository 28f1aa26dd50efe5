"""The runtime's exec tests (test_exec.py), run on the libkrun engine.

They need a real libkrun and hardware virtualization (KVM or HVF); elsewhere every one of them skips with
the reason ("libkrun not installed" / "no hardware virtualization"). The libkrun test double cannot
boot a guest, so it is never used here.
"""

from __future__ import annotations

import pytest

from vmm import BoxOptions, engines

from .test_exec import *  # noqa: F401,F403 - the same tests, with this module's shared_box


@pytest.fixture(scope="module")
def shared_box(request):
    status, _ = engines.libkrun_status()
    if not status.usable:  # the reason starts "libkrun not installed" or "no hardware virtualization"
        pytest.skip(status.reason)
    runtime = request.getfixturevalue("runtime")  # only now: the session runtime may build the image
    with runtime.create(BoxOptions(engine="libkrun", env={"BOX_LEVEL": "box"})) as box:
        yield box
