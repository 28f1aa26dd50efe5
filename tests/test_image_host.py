"""The `host` image: the host's interpreter and site-packages run in the box; its secrets stay out."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from vmm import BoxOptions
from vmm.images.host import host_tree, interpreter_paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the host image's view is built with root's mounts")


def test_the_view_shares_system_dirs_and_the_interpreter_only():
    tree = host_tree()
    assert "/usr" in tree.binds or ("/usr", "usr") in tree.symlinks
    assert all(not b.startswith(("/root/", "/home/")) or any(b.startswith(p) for p in interpreter_paths())
               for b in tree.binds)
    assert "/root" not in tree.binds and "/home" not in tree.binds and "/" not in tree.binds
    assert "/etc/shadow" in tree.masks


@pytest.fixture
def secrets():
    """Files a test in the box must not read: in root's home, the user's home, and /home."""
    token = uuid.uuid4().hex
    places = [Path("/root"), Path.home()] + ([Path("/home")] if Path("/home").is_dir() else [])
    made = []
    for place in dict.fromkeys(places):
        path = place / f".boxlite-secret-{token}"
        path.write_text(token)
        made.append(path)
    yield token, made
    for path in made:
        path.unlink()


def test_a_host_box_runs_the_host_python_and_cannot_read_home_or_root(runtime, secrets):
    token, paths = secrets
    with runtime.create(BoxOptions(image="host", network=False)) as box:
        probe = "import sys, pytest, pluggy; print(sys.prefix); print(pytest.__file__)"
        result = box.exec(sys.executable, "-c", probe)
        import pytest as host_pytest

        assert result.stdout.decode().split() == [sys.prefix, host_pytest.__file__]
        for path in paths:
            attempt = box.exec("cat", str(path))
            assert attempt.exit_code != 0 and token.encode() not in attempt.stdout
        # Only the interpreter's own directories are there, not the rest of the homes.
        allowed = {p.split("/")[2] for p in interpreter_paths() if p.startswith("/root/")}
        assert set(box.exec("ls", "-A", "/root").stdout.decode().split()) <= allowed
        assert box.exec("sh", "-c", f"grep -r {token} /home /etc 2>/dev/null").stdout == b""
        assert box.exec("cat", "/etc/shadow").stdout == b""
        # Writes land in the box's overlay, never on the host.
        assert box.exec("sh", "-c", "echo x > /usr/boxlite-written && rm -rf /etc/hostname").exit_code == 0
    assert not os.path.exists("/usr/boxlite-written") and os.path.exists("/etc/hostname")
