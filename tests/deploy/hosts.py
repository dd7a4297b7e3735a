"""Hosts for `ray up` on one machine: each host is a network namespace (its own address, its own ports)
with its own PID namespace, so the `ray stop` a start command runs sees only that host's processes,
joined by a bridge the test's machine sits on; each runs a real OpenSSH server.

The SSH login is an alias of root whose home is a temporary directory: Ray runs as root (the venv's
Python lives under /root, which no other user may enter), while everything `~` names on the hosts
stays in the test's directory. The hosts share this machine's filesystem, as hosts on a shared home
directory would. One thing leaks out: ssh expands the `~` of an identity file with the uid's passwd
home, so the key Ray's autoscaler on the head uses for the worker hosts (`~/ray_bootstrap_key.pem`)
is looked up in /root; a link there points into the test's home while the hosts run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = Path("/usr/sbin/sshd")
USER = "maverick-rayup"
BRIDGE, SUBNET = "mvbr0", "10.213.0"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _keygen(path: Path) -> None:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path))


def _remove_user() -> None:
    # -f: the alias shares uid 0 with every process here, which userdel would otherwise refuse
    subprocess.run(["userdel", "-f", USER], capture_output=True)


def _roots_bootstrap_key() -> Path:
    return Path(pwd.getpwuid(0).pw_dir) / "ray_bootstrap_key.pem"


@dataclass
class Host:
    index: int
    root: Path
    process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"mav-h{self.index}"

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    def net_namespace(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino

    def start_sshd(self, host_key: Path, home: Path) -> None:
        config = self.root / f"sshd_config.{self.name}"
        config.write_text(f"ListenAddress {self.ip}:22\nHostKey {host_key}\nPidFile {self.root}/sshd.{self.name}.pid\n"
                          f"AuthorizedKeysFile {home}/.ssh/authorized_keys\nPermitRootLogin prohibit-password\n"
                          "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                          f"AllowUsers {USER}\n")
        log = (self.root / f"sshd.{self.name}.log").open("w")
        # nsenter joins the host's network namespace and execs unshare (no fork: the process started
        # here is unshare itself); sshd is PID 1 of a new PID namespace, so when unshare dies its child
        # is killed, and with it every process this host started
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.name}", "unshare", "--pid", "--mount-proc", "--kill-child",
             str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=log)

    def listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"sshd on {self.name} exited: {(self.root / f'sshd.{self.name}.log').read_text()}")
        # the sshd log says so once it has bound its address
        return "Server listening on" in (self.root / f"sshd.{self.name}.log").read_text()


@dataclass
class Hosts:
    root: Path
    count: int = 2
    hosts: list[Host] = field(default_factory=list)
    linked_key: Path | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def client_key(self) -> Path:
        return self.root / "client_key"

    def start(self) -> Hosts:
        missing = [tool for tool in (str(SSHD), "rsync", "ssh-keygen", "ip", "nsenter", "unshare") if not shutil.which(tool)]
        if missing:
            raise RuntimeError(f"`ray up` needs {missing}: run `make test` (it installs openssh-server and rsync)")
        self.stop()  # what a killed earlier run left
        (self.home / ".ssh").mkdir(parents=True)
        for name in (".bashrc", ".profile"):  # Ray's runner sources ~/.bashrc in an interactive login shell
            if (Path("/etc/skel") / name).exists():
                shutil.copy(Path("/etc/skel") / name, self.home / name)
        _keygen(self.root / "host_key")
        _keygen(self.client_key)
        shutil.copy(self.client_key.with_suffix(".pub"), self.home / ".ssh" / "authorized_keys")
        _run("useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", str(self.home), "-s", "/bin/bash",
             "-p", "*", USER)  # '*': no password, and not locked (sshd refuses a locked account)
        self._share_kernel_build()
        key = _roots_bootstrap_key()
        if key.exists() and not key.is_symlink():
            raise RuntimeError(f"{key} exists (a Ray head ran as root here): the worker hosts' key would clash")
        key.unlink(missing_ok=True)  # a link an interrupted run left
        key.symlink_to(self.home / "ray_bootstrap_key.pem")
        self.linked_key = key
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for index in range(self.count):
            host = Host(index, self.root)
            self.hosts.append(host)
            ns = ["ip", "netns", "exec", host.name]
            _run("ip", "netns", "add", host.name)
            _run("ip", "link", "add", f"mvh{index}", "type", "veth", "peer", "name", "eth0", "netns", host.name)
            _run("ip", "link", "set", f"mvh{index}", "master", BRIDGE, "up")
            _run(*ns, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _run(*ns, "ip", "link", "set", "eth0", "up")
            _run(*ns, "ip", "link", "set", "lo", "up")
            _run(*ns, "ip", "route", "add", "default", "via", f"{SUBNET}.1")
            host.start_sshd(self.root / "host_key", self.home)
        return self

    def _share_kernel_build(self) -> None:
        """The CPU kernels this venv already built (they would otherwise build again in the new home)."""
        from torch.utils.cpp_extension import get_default_build_root

        built = Path(get_default_build_root())
        if built.is_dir():
            shutil.copytree(built, self.home / ".cache" / "torch_extensions")  # the default build root there

    def processes_on(self, host: Host) -> list[psutil.Process]:
        inode = host.net_namespace()
        found = []
        for process in psutil.process_iter(["name"]):
            try:
                if os.readlink(f"/proc/{process.pid}/ns/net") == f"net:[{inode}]":
                    found.append(process)
            except OSError:
                pass
        return found

    def stop(self) -> None:
        for host in self.hosts:
            if host.process is not None and host.process.poll() is None:
                host.process.kill()  # unshare does not die of SIGTERM while it waits for its child
                host.process.wait(timeout=30)
        for index in range(self.count):
            subprocess.run(["ip", "netns", "del", f"mav-h{index}"], capture_output=True)
            subprocess.run(["ip", "link", "del", f"mvh{index}"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        # a head killed with its namespace leaves its address where the next plain ray.init() looks
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().startswith(SUBNET + "."):
            current.unlink()
        _remove_user()
        if self.linked_key is not None:
            self.linked_key.unlink(missing_ok=True)
