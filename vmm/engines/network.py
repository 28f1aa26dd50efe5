"""The "internet" network policy, enforced on the host: a VM's network runs in a network namespace of its own.

The VMM's user-mode network (QEMU's slirp, libkrun's passt) opens ordinary sockets for the guest. Started in
a fresh network namespace, those sockets reach only what that namespace holds:
- pasta (Debian's `passt` package) gives it a way out: a tap device whose traffic pasta replays with sockets
  of the host's namespace. `--no-map-gw`: the gateway is not the host's loopback; no port is forwarded from the
  namespace to the host but the box's `host_ports` (`-T`), so the host's loopback is out of reach;
- nftables rules in the namespace (its output hook) reject every destination that is not a public address:
  loopback (but `host_ports`), private, shared, link-local (the metadata address too), multicast, reserved,
  and the host's own addresses; DNS to the host's resolvers is let through. A rejected packet is turned back
  inside the namespace: it never reaches pasta, so it never leaves the host.
The guest holds none of this: root in the guest cannot change a rule. docs/security-network.md says more.

`isolate()` makes the namespace for one VM and starts its pasta; `Namespace.prefix` starts a command (the
VMM) in it. Nothing outlives the VM: the namespace goes when its last process (the VMM, pasta) ends.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..errors import BoxError, EngineUnavailable
from ..options import Port

log = logging.getLogger(__name__)

FIX = "install them with `sudo boxlite setup` (Debian: `sudo apt-get install passt nftables`)"
TOOLS = ("pasta", "nft", "unshare", "nsenter")
READY_TIMEOUT = 10.0
# Not public, so not reachable from an "internet" box (RFC 6890 and the list).
DENIED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
)
# IPv6: only global unicast (2000::/3) is public; this excludes ::1, fc00::/7, fe80::/10, ff00::/8,
# the IPv4-mapped and NAT64 prefixes (which could name a denied IPv4 address).
PUBLIC6 = "2000::/3"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not process.which(t)]




def require() -> None:
    """EngineUnavailable naming the package to install, unless every tool the policy needs is here."""
    absent = missing_tools()
    if absent:
        raise EngineUnavailable(f"network='internet' needs {', '.join(absent)}, which this host lacks: {FIX}; "
                                "or choose network='full' (no policy) or 'none'")


def readiness() -> str:
    """What `boxlite doctor` shows: how the policy is enforced here, or EngineUnavailable saying why not."""
    require()
    # what every box does first: make a namespace (and, not as root, a user namespace) with rules in it
    with tempfile.TemporaryDirectory(prefix="boxlite-netcheck-") as tmp:
        rules = Path(tmp) / "check.nft"
        rules.write_text(ruleset([], [], [], []))
        for fd in _make_namespace(rules):
            if fd is not None:
                os.close(fd)
    how = "" if os.geteuid() == 0 else " (in a user namespace of the runner's)"
    return f"enforced: a network namespace per box{how}, pasta as its way out, nftables rules in it"


@dataclass
class Namespace:
    """A network namespace made for one VM, held by `fd` until the VM is started in it, with its pasta.
    Not as root, `user_fd` is the user namespace that owns it (where the runner is root)."""

    fd: int
    user_fd: int | None
    pasta: subprocess.Popen[bytes]
    pid_file: Path

    @property
    def fds(self) -> tuple[int, ...]:
        """To pass to the command started with `prefix`."""
        return (self.fd,) if self.user_fd is None else (self.fd, self.user_fd)

    @property
    def prefix(self) -> list[str]:
        """Prepended to a command's argv, starts it in the namespace (pass it `fds`)."""
        user = [] if self.user_fd is None else [f"--user=/proc/self/fd/{self.user_fd}", "--preserve-credentials"]
        return ["nsenter", *user, f"--net=/proc/self/fd/{self.fd}", "--"]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until pasta has set up the namespace's way out (it writes its pid file then)."""
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if self.pasta.poll() is not None:
                raise BoxError(f"pasta exited with {self.pasta.returncode}: "
                               f"{_tail(self.pid_file.with_name('pasta.log'))}")
            if time.monotonic() > deadline:
                raise BoxError(f"pasta did not set up the box's network within {timeout:.0f} s")
            time.sleep(0.002)

    def close(self) -> None:
        """Drop our hold on the namespace: from now on it lives as long as the processes in it."""
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)
        self.fd, self.user_fd = -1, None


def isolate(box_dir: Path, host_ports: Sequence[int], forwards: Sequence[Port]) -> Namespace:
    """A fresh namespace for one VM with the policy's rules loaded, and its pasta starting (`wait_ready`).

    `host_ports`: host loopback TCP ports the VM may reach (at its namespace's 127.0.0.1, where QEMU's user
    network sends the guest's 10.0.2.2). `forwards`: the box's `ports`, host 127.0.0.1 to the namespace's,
    where the VMM listens for them."""
    require()
    rules = box_dir / "network.nft"
    rules.write_text(ruleset(host_ports, forwards, host_addresses(), nameservers()))
    fd, user_fd = _make_namespace(rules)
    fds = (fd,) if user_fd is None else (fd, user_fd)
    pid_file = box_dir / "pasta.pid"
    pid_file.unlink(missing_ok=True)
    # As root, pasta would switch to nobody before joining a namespace root owns, and fail: it keeps uid 0
    # with two capabilities, in its own seccomp filter and empty mount namespace. Not as root, it joins the
    # user namespace that owns the network namespace.
    owner = ["--runas", "0"] if user_fd is None else ["--userns", f"/proc/self/fd/{user_fd}"]
    # IPv4 only: the guest has no IPv6 (its kernel's ipv6.disable=1), and pasta then holds ~10 MB less.
    argv = [process.which("pasta") or "pasta", "--foreground", "--quiet", "--ipv4-only", "--config-net", "--no-map-gw",
            *owner,
            "--netns", f"/proc/self/fd/{fd}", "--no-netns-quit", "--pid", str(pid_file),
            "--tcp-ports", _spec([f"127.0.0.1/{p.host}" for p in forwards if p.protocol == "tcp"]),
            "--udp-ports", _spec([f"127.0.0.1/{p.host}" for p in forwards if p.protocol == "udp"]),
            # pasta's default ("auto") would forward every port the host listens on: only the allowed ones
            "--tcp-ns", _spec([str(p) for p in host_ports]), "--udp-ns", "none"]
    log.debug("starting %s", " ".join(argv))
    try:
        pasta = process.spawn(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(box_dir / "pasta.log", "wb"))
    except BaseException:
        for one in fds:
            os.close(one)
        raise
    return Namespace(fd, user_fd, pasta, pid_file)


def _spec(items: list[str]) -> str:
    return ",".join(items) or "none"


def _make_namespace(rules: Path) -> tuple[int, int | None]:
    """A new network namespace with `rules` loaded, and (not as root) the user namespace owning it: fds of
    both. Made by a short-lived child that waits until we hold them: no window exists without the rules."""
    script = 'nft -f "$0" && echo ready && read _'
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    child = subprocess.Popen(["unshare", *user, "--net", "--", "sh", "-c", script, str(rules)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fds: list[int] = []
    try:
        assert child.stdout is not None and child.stdin is not None and child.stderr is not None
        if child.stdout.readline().strip() != "ready":
            child.stdin.close()
            raise EngineUnavailable(f"could not make the box's network namespace: {child.stderr.read()[-1000:]} "
                                    f"(nftables rules in {rules}); {FIX}")
        for kind in ("net", *(["user"] if user else [])):
            fds.append(os.open(f"/proc/{child.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
        child.stdin.close()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        child.wait()
    return fds[0], (fds[1] if user else None)


def ruleset(host_ports: Sequence[int], forwards: Sequence[Port], own: Sequence[str],
            resolvers: Sequence[str]) -> str:
    """The nftables rules of a box's namespace: what its VMM may send (nothing reaches it from outside but
    pasta's forwards). `own`: the host's addresses; `resolvers`: its DNS servers (port 53 only)."""
    addresses = [ipaddress.ip_address(a) for a in own]
    # the host's addresses that the ranges below do not deny already (overlapping elements are an error)
    own4 = [str(a) for a in addresses if a.version == 4 and not any(a in ipaddress.ip_network(n) for n in DENIED)]
    own6 = [str(a) for a in addresses if a.version == 6 and a in ipaddress.ip_network(PUBLIC6)]
    dns4 = [a for a in resolvers if ipaddress.ip_address(a).version == 4]
    dns6 = [a for a in resolvers if ipaddress.ip_address(a).version == 6]
    lines = ["table inet boxlite {", "  chain output {", "    type filter hook output priority 0; policy accept;",
             # answers on connections pasta forwarded in, and on those let out below
             "    ct state established,related accept"]
    for proto in ("tcp", "udp"):
        ports = sorted({p.host for p in forwards if p.protocol == proto}
                       | (set(host_ports) if proto == "tcp" else set()))
        if ports:  # the namespace's loopback: pasta's listeners for host_ports, the VMM's for forwards
            lines.append(f"    oif lo ip daddr 127.0.0.1 {proto} dport {{ {', '.join(map(str, ports))} }} accept")
    for family, servers in (("ip", dns4), ("ip6", dns6)):
        if servers:
            lines.append(f"    {family} daddr {{ {', '.join(servers)} }} meta l4proto {{ tcp, udp }} th dport 53 "
                         "accept")
    lines.append(f"    ip daddr {{ {', '.join([*DENIED, *own4])} }} reject")
    lines.append(f"    ip6 daddr != {PUBLIC6} reject")
    if own6:
        lines.append(f"    ip6 daddr {{ {', '.join(own6)} }} reject")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def host_addresses() -> list[str]:
    """The host's own addresses (a public one would otherwise lead back to the host's services)."""
    found: set[str] = set()
    try:  # IPv4: the local routes of the kernel's routing trie
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if "/32 host LOCAL" in line:
                found.add(prev.split()[-1])
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError, IndexError):
        pass
    return sorted(found, key=lambda a: (":" in a, a))


def nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The resolvers QEMU's DNS proxy forwards to (it reads the same file), if they parse as addresses."""
    found = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    found.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
                except ValueError:
                    continue
    except OSError:
        pass
    return found


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-500:] or "nothing in its log"
    except OSError:
        return "no log"
