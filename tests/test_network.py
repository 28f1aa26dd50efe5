"""The network policy (vmm/engines/network.py, docs/security-network.md), on real VMs.

Traffic goes only to the host's loopback and to a network namespace this module makes: a veth pair whose
far end (in the namespace) holds a "private" and a "link-local" address, with a server on each.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, get_with_retries, vm_processes
from vmm import Box, BoxOptions, Port, Runtime
from vmm.engines import network
from vmm.errors import ConfigError

pytestmark = pytest.mark.skipif(bool(network.missing_tools()) or os.geteuid() != 0,
                                reason="needs root, pasta and nft (sudo boxlite setup)")

# Unusual subnets this machine does not route (checked by the fixture), /30 each: host end .1, peer .2.
PRIVATE = ("10.231.77.1", "10.231.77.2")
LINK_LOCAL = ("169.254.231.1", "169.254.231.2")
PEER_PORT = 18431

# Run in the guest: connect to each HOST:PORT (or send a datagram to udp:HOST:PORT), read the answer, say what
# happened (as JSON).
PROBE = """
import json, socket, sys, threading
out = {}
def probe(target):
    host, port = target.removeprefix("udp:").rsplit(":", 1)
    try:
        if target.startswith("udp:"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(4)
                s.sendto(b"ping", (host, int(port)))
                out[target] = "ok:" + s.recv(64).decode()
            return
        with socket.create_connection((host, int(port)), timeout=4) as s:
            s.settimeout(4)
            out[target] = "ok:" + s.recv(64).decode()
    except OSError as e:
        out[target] = type(e).__name__
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


class _Banner(threading.Thread):
    """A TCP server on the host's loopback that greets each connection with `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.text = text
        self.start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.text.encode())


Servers = tuple[_Banner, _Banner]  # allowed, other


@pytest.fixture(scope="module")
def host_servers() -> Iterator[Servers]:
    allowed, other = _Banner("allowed"), _Banner("other")
    yield allowed, other
    allowed.sock.close()
    other.sock.close()


class Peer:
    """A network namespace joined to the host by a veth pair; a server in it on the private and link-local
    addresses counts the connections it accepted."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns, self.host_if, self.peer_if = f"bxnet{tag}", f"bxh{tag}", f"bxp{tag}"
        self.server: subprocess.Popen[str] | None = None

    def ip(self, *args: str, ns: bool = False) -> str:
        argv = ["ip", *(["-n", self.ns] if ns else []), *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    def setup(self) -> None:
        routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        assert "10.231.77." not in routes and "169.254.231." not in routes, "the test subnets are in use here"
        self.ip("netns", "add", self.ns)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if, "netns", self.ns)
        # Every TCP or UDP packet that reaches the peer for its server's port is counted, before any other hook.
        rules = ("table ip peer {\n counter arrived {}\n chain pre {\n  type filter hook prerouting priority -300;\n"
                 f"  meta l4proto {{ tcp, udp }} th dport {PEER_PORT} counter name arrived\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=rules, text=True, check=True)
        for (host_addr, peer_addr) in (PRIVATE, LINK_LOCAL):
            self.ip("addr", "add", f"{host_addr}/30", "dev", self.host_if)
            self.ip("addr", "add", f"{peer_addr}/30", "dev", self.peer_if, ns=True)
        self.ip("link", "set", self.host_if, "up")
        self.ip("link", "set", self.peer_if, "up", ns=True)
        self.ip("link", "set", "lo", "up", ns=True)
        serve = ("import socket, threading\n"
                 f"u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.bind(('0.0.0.0', {PEER_PORT}))\n"
                 "def echo():\n while True:\n  d, a = u.recvfrom(64)\n  print(a[0], flush=True)\n"
                 "  u.sendto(b'peer', a)\n"
                 "threading.Thread(target=echo, daemon=True).start()\n"
                 f"s = socket.create_server(('0.0.0.0', {PEER_PORT}))\nprint('up', flush=True)\n"
                 "while True:\n c, a = s.accept()\n print(a[0], flush=True)\n c.sendall(b'peer')\n c.close()")
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, "python3", "-c", serve],
                                       stdout=subprocess.PIPE, text=True)
        assert self.server.stdout is not None and self.server.stdout.readline().strip() == "up"
        self.accepted: list[str] = []
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        assert self.server is not None and self.server.stdout is not None
        for line in self.server.stdout:
            self.accepted.append(line.strip())

    def arrived(self) -> int:
        """TCP packets that reached the peer for its server's port (SYNs included), so far."""
        out = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-j", "list", "counter", "ip", "peer", "arrived"],
                             check=True, capture_output=True, text=True).stdout
        return int(next(item["counter"]["packets"] for item in json.loads(out)["nftables"] if "counter" in item))

    def targets(self) -> list[str]:
        return [f"{proto}{address}:{PEER_PORT}" for address in (PRIVATE[1], LINK_LOCAL[1]) for proto in ("", "udp:")]

    def teardown(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    made = Peer()
    try:
        made.setup()
        yield made
    finally:
        made.teardown()


def _probe(box: Box, *targets: str) -> dict[str, str]:
    done = box.exec("python3", "-c", PROBE, *targets, timeout=180)
    assert done.exit_code == 0, done.stderr
    seen: dict[str, str] = json.loads(done.stdout)
    return seen


@pytest.mark.parametrize("snapshots", [True, False], ids=["restored", "booted"])
def test_internet_reaches_allowed_host_ports_only_and_nothing_private(runtime: Runtime, host_servers: Servers,
                                                                      peer: Peer, snapshots: bool) -> None:
    allowed, other = host_servers
    before = runtime.metrics()
    options = BoxOptions(host_ports=(allowed.port,), snapshots=snapshots)  # network="internet": the default
    with runtime.create(options) as box:
        restored = runtime.metrics().restores - before.restores
        assert restored == (1 if snapshots else 0), "the box was restored from its boot snapshot, or booted"
        assert any("pasta" in p for p in vm_processes(box.id)), "the box's network has its pasta"
        assert box.exec("id", "-u").stdout == b"0\n"  # the probes below run as root in the guest
        arrived = peer.arrived()
        seen = _probe(box, f"10.0.2.2:{allowed.port}", f"host.boxlite.internal:{allowed.port}",
                      f"10.0.2.2:{other.port}", *peer.targets())
        assert seen[f"10.0.2.2:{allowed.port}"] == "ok:allowed"
        assert seen[f"host.boxlite.internal:{allowed.port}"] == "ok:allowed"
        # neither another loopback port, nor the private and link-local peers; as root in the guest
        for target in (f"10.0.2.2:{other.port}", *peer.targets()):
            assert not seen[target].startswith("ok"), (target, seen)
        # the blocked packets never left the host: the peer received nothing
        assert peer.arrived() == arrived and peer.accepted == []
        box_id = box.id
    assert vm_processes(box_id) == []  # neither qemu nor pasta outlives the box


def test_full_reaches_the_host_loopback_and_private_addresses(runtime: Runtime, host_servers: Servers,
                                                              peer: Peer) -> None:
    allowed, other = host_servers
    arrived = peer.arrived()
    with runtime.create(BoxOptions(network="full")) as box:
        seen = _probe(box, f"10.0.2.2:{allowed.port}", f"host.boxlite.internal:{other.port}", *peer.targets())
    assert seen == {f"10.0.2.2:{allowed.port}": "ok:allowed", f"host.boxlite.internal:{other.port}": "ok:other",
                    **{t: "ok:peer" for t in peer.targets()}}
    assert sorted(peer.accepted) == sorted([PRIVATE[0], LINK_LOCAL[0]] * 2) and peer.arrived() > arrived
    peer.accepted.clear()


def test_none_has_no_interface_but_lo(runtime: Runtime, host_servers: Servers, peer: Peer) -> None:
    allowed, _ = host_servers
    arrived = peer.arrived()
    with runtime.create(BoxOptions(network=False)) as box:
        assert box.exec("ls", "/sys/class/net").stdout.split() == [b"lo"]
        seen = _probe(box, f"10.0.2.2:{allowed.port}", *peer.targets())
    assert not any(v.startswith("ok") for v in seen.values()), seen
    assert peer.arrived() == arrived


def test_ports_forward_into_an_internet_box(runtime: Runtime) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host_port = s.getsockname()[1]
    with runtime.create(BoxOptions(ports=(Port.parse(f"{host_port}:8000"),))) as box:
        serve = box.spawn("python3", "-m", "http.server", "8000", "-d", "/etc")
        assert "debian_version" in get_with_retries(host_port)
        serve.kill()


def test_bad_network_options_are_config_errors(runtime: Runtime) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(network="lan"), "network='lan' is invalid: use 'internet'"),
        (dict(network=False, host_ports=(5432,)), "host_ports need network='internet'"),
        (dict(host_ports=(0,)), "host_ports: port=0 is out of range"),
        (dict(host_ports="5432"), "give a list of port numbers"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            runtime.create(BoxOptions(**bad))


def test_the_rules_deny_what_is_not_public() -> None:
    rules = network.ruleset([5432], [], ["127.0.0.1", "192.0.2.2", "fd00::2", "2001:db8::2"], ["10.255.255.53"])
    assert "oif lo ip daddr 127.0.0.1 tcp dport { 5432 } accept" in rules
    assert "ip daddr { 10.255.255.53 } meta l4proto { tcp, udp } th dport 53 accept" in rules
    for denied in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
                   "100.64.0.0/10", "224.0.0.0/4", "192.0.2.2"):
        assert denied in rules.split("ip daddr {")[-1]
    assert f"ip6 daddr != {network.PUBLIC6} reject" in rules and "ip6 daddr { 2001:db8::2 } reject" in rules
    # the rules load (nft checks them without applying: -c)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"boxlite-rules-{os.getpid()}.nft"
    path.write_text(rules)
    try:
        subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(path)], check=True, capture_output=True)
    finally:
        path.unlink()


# Run as an unprivileged user: the namespace, its rules and pasta, in a user namespace of that user's; a
# probe started in it the way the VMM is (`prefix`) reaches the allowed host port only.
AS_USER = """
import json, socket, subprocess, sys, tempfile
from pathlib import Path
from vmm.engines import network
allowed, other, peer = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ns = network.isolate(Path(tempfile.mkdtemp()), [allowed], [])
try:
    ns.wait_ready()
    targets = [f"127.0.0.1:{allowed}", f"127.0.0.1:{other}", peer]
    done = subprocess.run([*ns.prefix, sys.executable, "-c", sys.argv[4], *targets], pass_fds=ns.fds,
                          capture_output=True, text=True)
    print(done.stdout or done.stderr)
finally:
    ns.close()
    ns.pasta.kill()
    ns.pasta.wait()
"""


@pytest.mark.skipif(not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs setpriv and /usr/bin/python3")
def test_a_runner_that_is_not_root_gets_the_policy_in_a_user_namespace(host_servers: Servers, peer: Peer,
                                                                       tmp_path: Path) -> None:
    allowed, other = host_servers
    site = sysconfig.get_paths()["purelib"]  # this venv's packages (filelock, ...), readable by others
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": f"{ROOT}:{site}"}
    tmp_path.chmod(0o777)
    arrived = peer.arrived()
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           "/usr/bin/python3", "-c", AS_USER, str(allowed.port), str(other.port), peer.targets()[0],
                           PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen[f"127.0.0.1:{allowed.port}"] == "ok:allowed"
    assert not seen[f"127.0.0.1:{other.port}"].startswith("ok") and not seen[peer.targets()[0]].startswith("ok")
    assert peer.arrived() == arrived
