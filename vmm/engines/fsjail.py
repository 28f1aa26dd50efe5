"""virtiofsd's jail step, exec'd between the runtime and virtiofsd when the runner is root
(docs/security-vmm.md, "virtiofsd"). Run as a script by the runtime's python (`-I -S`: stdlib only):

    python -I -S fsjail.py SOURCE SOCKET UID GID READONLY -- virtiofsd ARGS...

0. The listening socket at SOCKET (made here, as the runner: UID may not write where it goes), handed to
   virtiofsd as `--fd=N`.
1. A private mount namespace (still root on the host): an idmapped bind of SOURCE, recursive, in which the
   owner and group of SOURCE read as UID and GID (an unprivileged uid of the box's), is mounted over /run.
   READONLY=1 makes it read-only (the guest's own mount flags prove nothing).
2. A user namespace whose root is UID (and GID): virtiofsd keeps the capabilities it serves files with
   (setting its fs uid per request, overriding permissions) inside it only, and they reach only files whose
   owner is mapped: through the idmapped mount, those of SOURCE's owner. A file the guest's root creates
   lands on the host as SOURCE's owner, as when virtiofsd ran as root.
3. exec virtiofsd, whose shared directory is /run (a path UID can reach; SOURCE's own path may not be: a
   runtime home in /root). The parent-death signal is set again (the kernel clears it when the uid changes).

Exit status 70 and a line on stderr (virtiofsd's log) when a step fails. `fsjail.py --probe SOURCE` says
(exit status 0, or 70 and why) whether an idmapped mount of SOURCE can be made: not every file system
supports them; the runtime asks first, and where they do not, starts virtiofsd as root as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

MOUNT_POINT = "/run"
FAILED = 70

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_PR_SET_PDEATHSIG = 1
# The same numbers on every architecture (new system calls are numbered once for all since Linux 5.1).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _user_namespace(uid_map: str, gid_map: str) -> int:
    """A descriptor of a new user namespace with these maps (a child makes it and waits to be ended)."""
    child = subprocess.Popen(["unshare", "--user", "--", "sh", "-c", "echo made && read _"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        if child.stdout.readline() != b"made\n":
            raise OSError(0, "could not make a user namespace (unshare --user)")
        _write(f"/proc/{child.pid}/uid_map", uid_map)
        _write(f"/proc/{child.pid}/gid_map", gid_map)
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def idmapped_view(source: str, uid: int, gid: int, readonly: bool) -> int:
    """A detached mount of `source` (and what is mounted below it) in which its owner and group read as
    `uid` and `gid`; other owners read as nobody."""
    st = os.stat(source)
    userns = _user_namespace(f"{st.st_uid} {uid} 1\n", f"{st.st_gid} {gid} 1\n")
    try:
        tree = _check(_libc.syscall(_SYS_OPEN_TREE, -100, source.encode(),
                                    _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE), f"open_tree({source})")
        attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
                          | (_MOUNT_ATTR_RDONLY if readonly else 0), 0, 0, userns)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr),
                             ctypes.sizeof(attr)), f"an idmapped mount of {source} (mount_setattr)")
        return tree
    finally:
        os.close(userns)


def enter_user_namespace(uid: int, gid: int) -> None:
    """Become root of a new user namespace that is `uid`/`gid` on the host (a child, still root on the host,
    writes the maps once this process has made it)."""
    me = os.getpid()
    writer = subprocess.Popen(["sh", "-c", f'read _ && echo "0 {uid} 1" > /proc/{me}/uid_map && '
                                           f'echo "0 {gid} 1" > /proc/{me}/gid_map'], stdin=subprocess.PIPE)
    assert writer.stdin is not None
    try:
        _check(_libc.unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        writer.stdin.write(b"go\n")
    finally:
        writer.stdin.close()
        if writer.wait():
            raise OSError(0, f"could not map uid {uid} into virtiofsd's user namespace")
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _private_mount_namespace() -> None:
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "a private mount namespace")


def jail(source: str, uid: int, gid: int, readonly: bool) -> None:
    _private_mount_namespace()
    tree = idmapped_view(source, uid, gid, readonly)
    _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", -100, MOUNT_POINT.encode(), _MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount to {MOUNT_POINT}")
    os.close(tree)
    enter_user_namespace(uid, gid)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--probe"]:  # can `source` be served this way here? (in this process's own namespace)
        try:
            _private_mount_namespace()
            os.close(idmapped_view(argv[1], 65534, 65534, True))
        except OSError as exc:
            print(exc.strerror or exc, file=sys.stderr)
            return FAILED
        return 0
    source, sock_path, uid, gid, readonly, dashes, *command = argv
    if dashes != "--" or not command:
        print("usage: fsjail.py SOURCE SOCKET UID GID READONLY -- COMMAND...", file=sys.stderr)
        return 2
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(sock_path + ".new")
        sock.listen(1)
        os.rename(sock_path + ".new", sock_path)  # the runtime connects as soon as the path exists
        sock.set_inheritable(True)
        command.append(f"--fd={sock.fileno()}")
        jail(source, int(uid), int(gid), readonly == "1")
    except OSError as exc:
        print(f"boxlite: virtiofsd's jail failed: {exc.strerror or exc}", file=sys.stderr)
        return FAILED
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
