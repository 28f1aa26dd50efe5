"""The system packages the runtime needs, what each is for, and how to install those missing.

The one list: `boxlite setup` imports this module, and tools/install-system-packages runs it with the system
python3 before any venv exists (`python3 -I vmm/hostpackages.py --install --dev`), so it uses the standard
library only. Package names follow /etc/os-release: Debian 12 and 13 (tested), Ubuntu (known, untested).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RUNTIME, AGENT, DEV = "runtime", "agent", "dev"  # needed by every user; to compile the agent; by this repo's tests


@dataclass(frozen=True)
class Distro:
    id: str  # "debian", "ubuntu", or another os-release ID
    version: tuple[int, ...]  # VERSION_ID as numbers; () on testing/unstable
    name: str  # PRETTY_NAME

    @property
    def known(self) -> bool:
        return self.id in ("debian", "ubuntu")


@dataclass(frozen=True)
class Need:
    packages: tuple[str, ...]  # any one of them meets the need; the first is the one installed
    purpose: str
    group: str = RUNTIME

    @property
    def package(self) -> str:
        return self.packages[0]


def distro(os_release: Path = Path("/etc/os-release")) -> Distro:
    fields: dict[str, str] = {}
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    version = tuple(int(p) for p in fields.get("VERSION_ID", "").split(".") if p.isdigit())
    ident = fields.get("ID", "")
    if ident not in ("debian", "ubuntu") and "debian" in fields.get("ID_LIKE", "").split():
        ident = "debian"  # derivatives (Raspberry Pi OS, ...) use Debian's names
    return Distro(ident, version, fields.get("PRETTY_NAME") or fields.get("ID") or "an unknown system")


def needs(host: Distro, groups: tuple[str, ...] = (RUNTIME,)) -> list[Need]:
    """What this host needs, in its distribution's package names."""
    ubuntu = host.id == "ubuntu"
    if ubuntu:
        kernel = Need(("linux-image-virtual", "linux-image-kvm"),
                      "the guest kernel (Ubuntu's builds virtio in; vmm looks for it in /boot)")
    else:
        kernel = Need(("linux-image-cloud-amd64",), "the guest kernel: Debian's cloud kernel, small and fast to boot")
    # virtiofsd ships on its own from Debian 13 and Ubuntu 24.04; before, qemu's packages bring it.
    own_virtiofsd = host.version >= (24, 4) if ubuntu else host.version == () or host.version >= (13,)
    found = [
        Need(("qemu-system-x86",), "QEMU, the virtual machine monitor that runs every box"),
        Need(("qemu-utils",), "qemu-img: the disks of boxes with a persistent disk (disk_size_gb)"),
        kernel,
        *([Need(("virtiofsd",), "shares host directories (the project, volumes) with boxes")]
          if own_virtiofsd else []),
        Need(("busybox-static",), "the tools of the boxes' initramfs (static busybox)"),
        Need(("e2fsprogs",), "mkfs.ext4: the read-only disk image of every image's root"),
        Need(("mmdebstrap",), "builds the default image (Debian or Ubuntu with python3) from the host's apt sources"),
        Need(("lz4",), "unpacks lz4-compressed kernels"),
        Need(("zstd",), "unpacks zstd-compressed kernels and kernel modules"),
        Need(("util-linux",), "unshare and umount, used while building images; unshare, pivot_root and setpriv "
                              "jail the VMM (docs/security-vmm.md); nsenter, for the network policy"),
        Need(("mount",), "mount: the VMM jail's root and the host image's view"),
        Need(("passt",), "pasta: the only way out of an 'internet' box's network namespace (the network policy)"),
        Need(("nftables",), "nft: the network policy's rules in each 'internet' box's namespace (no private, "
                            "loopback or link-local destinations)"),
        Need(("gcc",), "compiles the guest agent from guest/agent.c (a checkout, or an sdist)", AGENT),
        Need(("libc6-dev",), "the static C library the guest agent is linked with", AGENT),
        Need(("make",), "the project's Makefile (make setup, demo, test)", DEV),
        Need(("docker-registry",), "a registry on loopback for the image tests", DEV),
        Need(("skopeo",), "copies test images into that registry and into OCI layouts", DEV),
        Need(("umoci",), "unpacks OCI images for the pull benchmark", DEV),
    ]
    if importlib.util.find_spec("ensurepip") is None:  # Debian splits `python3 -m venv` off
        found.append(Need(("python3-venv",), "python3 -m venv, for the project's .venv", DEV))
    return [n for n in found if n.group in groups]


def installed(package: str) -> bool:
    """Whether dpkg has `package` installed (dpkg-query honours $DPKG_ADMINDIR)."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                              check=False)
    except OSError:
        return False
    return done.stdout.strip() == "install ok installed"


def missing(wanted: list[Need]) -> list[Need]:
    return [n for n in wanted if not any(installed(p) for p in n.packages)]


def is_root() -> bool:
    return os.geteuid() == 0


def install_commands(wanted: list[Need], root: bool) -> list[list[str]]:
    sudo = [] if root else ["sudo"]
    return [[*sudo, "apt-get", "update"],
            [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *[n.package for n in wanted]]]


def shell_line(commands: list[list[str]]) -> str:
    return " && ".join(shlex.join(c) for c in commands)


def kernel_globs(host: Distro) -> tuple[str, ...]:
    return ("vmlinuz-*-generic", "vmlinuz-*-kvm") if host.id == "ubuntu" else ("vmlinuz-*-cloud-amd64",)


def unreadable_kernels(host: Distro, boot: Path = Path("/boot")) -> list[Path]:
    """The guest kernels the runtime would use but others cannot read (Debian and Ubuntu install them 0600)."""
    return sorted(k for g in kernel_globs(host) for k in boot.glob(g) if not os.stat(k).st_mode & 0o004)


def describe(wanted: list[Need]) -> str:
    width = max((len(n.package) for n in wanted), default=0)
    return "\n".join(f"  {n.package.ljust(width)}  {n.purpose}" for n in wanted)


def ensure(groups: tuple[str, ...], install: bool, say: Callable[[str], None] = print) -> bool:
    """Say what is missing and what each package is for; install it (apt-get, through sudo unless root) if
    `install`, else say the exact command. False if something is still missing."""
    host = distro()
    if not host.known:
        say(f"{host.name}: only Debian and Ubuntu package names are known; install the equivalents of:\n"
            f"{describe(needs(host, groups))}")
        return True  # nothing to check against: the host checks that follow tell what is really missing
    wanted = missing(needs(host, groups))
    if not wanted:
        say(f"nothing to install: {', '.join(n.package for n in needs(host, groups))} "
            f"are installed")
    else:
        commands = install_commands(wanted, is_root())
        say(f"missing system packages:\n{describe(wanted)}")
        if not install:
            say(f"install them with:\n  {shell_line(commands)}")
            return False
        for command in commands:
            say(f"$ {shlex.join(command)}")
            # no debconf questions (a kernel's, say) when root; through sudo apt-get may still ask
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            if subprocess.run(command, env=env, check=False).returncode != 0:
                say(f"`{shlex.join(command)}` failed: see its output above")
                return False
    kernels = unreadable_kernels(host)
    if kernels:
        chmod = [*([] if is_root() else ["sudo"]), "chmod", "0644", *map(str, kernels)]
        say(f"the guest kernel is readable by root only ({', '.join(map(str, kernels))})")
        if not install:
            say(f"make it readable with:\n  {shlex.join(chmod)}")
            return False
        say(f"$ {shlex.join(chmod)}")
        if subprocess.run(chmod, check=False).returncode != 0:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 vmm/hostpackages.py",
                                     description="Checks (or installs) the system packages pytest-boxlite needs.")
    parser.add_argument("--dev", action="store_true", help="also what this repository's tests and Makefile need")
    parser.add_argument("--install", action="store_true", help="install those missing (apt-get; sudo unless root)")
    ns = parser.parse_args(argv)
    groups = (RUNTIME, AGENT, DEV) if ns.dev else (RUNTIME, AGENT)
    return 0 if ensure(groups, ns.install) else 1


if __name__ == "__main__":
    sys.exit(main())
