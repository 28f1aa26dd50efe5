"""The `host` image: the host's own root, read-only, as far as a test needs it and no further.

Shared: the system directories, the running interpreter (its prefixes and site-packages, wherever they
live, e.g. under ~/.pyenv) at their own paths. Not shared: everything else, home directories and /root
included. Masked inside what is shared: password hashes, SSH and TLS private keys, sudo and other
credentials. The masking happens on the host (the guest runs its own kernel), in the file server's view.
"""

from __future__ import annotations

import os
import site
import sys

from vmm.engines.base import ComposedTree
from vmm.errors import ImageError
from vmm.images.model import DEFAULT_PATH, ImageConfig, ResolvedImage

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
SECRETS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/security/opasswd",
    "/etc/ssh", "/etc/ssl/private", "/etc/sudoers", "/etc/sudoers.d", "/etc/docker", "/etc/wireguard",
    "/etc/NetworkManager/system-connections", "/etc/krb5.keytab", "/etc/machine-id",
)
# Never shared whole: an interpreter below them is bound by its own paths, not its parents'.
PRIVATE_ROOTS = ("/", "/root", "/home")
MOUNT_POINTS = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/mnt")


def interpreter_paths() -> list[str]:
    """What the running interpreter needs: its prefixes, its executable's directory, its site-packages."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in site.getsitepackages() if os.path.isdir(p))
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user_site in sys.path and os.path.isdir(user_site):
        paths.add(user_site)
    return sorted(os.path.realpath(p) for p in paths if p)


def host_tree() -> ComposedTree:
    binds: list[str] = []
    symlinks: list[tuple[str, str]] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            symlinks.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(path)
    homes = {os.path.realpath(os.path.expanduser("~")), *PRIVATE_ROOTS}
    for path in interpreter_paths():
        if path in homes:
            raise ImageError(
                f"image 'host': the interpreter's files are {path}, a home directory, which the host image "
                "never shares whole: use a virtual environment or an interpreter installed elsewhere"
            )
        if not any(path == b or path.startswith(b + "/") for b in binds):
            binds.append(path)
    # A path below another bind is kept only if its parent is not shared (e.g. a venv inside /opt is
    # already there); the result is minimal and ordered parents first.
    binds = sorted({b for b in binds if not any(b != o and b.startswith(o + "/") for o in binds)})
    masks = tuple(p for p in SECRETS if os.path.lexists(p))
    return ComposedTree(binds=tuple(binds), symlinks=tuple(symlinks), masks=masks, dirs=MOUNT_POINTS)


def resolve_host() -> ResolvedImage:
    tree = host_tree()
    # The host's interpreter first on PATH, so `python3` in the box is the one running the tests.
    path = f"PATH={os.path.dirname(sys.executable)}:{DEFAULT_PATH.removeprefix('PATH=')}"
    config = ImageConfig(env=(path, "LANG=C.UTF-8"), working_dir="/", user="root")
    return ResolvedImage(ref="host", digest="host", base=None, config=config, tree=tree)


__all__ = ["host_tree", "interpreter_paths", "resolve_host"]
