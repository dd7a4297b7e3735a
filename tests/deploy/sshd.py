"""A real OpenSSH server on a loopback address for `ray up` with the local provider: its own host key,
a client key made here, and a login whose home is a temporary directory (an alias of root, so the
`ray stop` and /tmp/ray of the cluster it starts behave as on a host where Ray runs as root, while
everything `~` names on the "remote" side stays inside the test's directory)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = Path("/usr/sbin/sshd")
USER = "maverick-rayup"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def remove_user() -> None:
    # -f: the alias shares uid 0 with every process here, which userdel would otherwise refuse
    subprocess.run(["userdel", "-f", USER], capture_output=True)


@dataclass
class Sshd:
    root: Path
    host: str  # a loopback address of its own, so port 22 is free there
    process: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def client_key(self) -> Path:
        return self.root / "client_key"

    def start(self) -> Sshd:
        missing = [tool for tool in (str(SSHD), "rsync", "ssh-keygen") if not shutil.which(tool)]
        if missing:
            raise RuntimeError(f"`ray up` needs {missing}: run `make test` (it installs openssh-server and rsync)")
        (self.home / ".ssh").mkdir(parents=True)
        for name in (".bashrc", ".profile"):  # Ray's runner sources ~/.bashrc in an interactive login shell
            if (Path("/etc/skel") / name).exists():
                shutil.copy(Path("/etc/skel") / name, self.home / name)
        _keygen(self.root / "host_key")
        _keygen(self.client_key)
        shutil.copy(self.client_key.with_suffix(".pub"), self.home / ".ssh" / "authorized_keys")
        remove_user()
        subprocess.run(["useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", str(self.home), "-s", "/bin/bash",
                        "-p", "*", USER], check=True, capture_output=True)  # '*': no password, not locked
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        config = self.root / "sshd_config"
        config.write_text(f"ListenAddress {self.host}:22\nHostKey {self.root / 'host_key'}\n"
                          f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.home}/.ssh/authorized_keys\n"
                          "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                          "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                          f"AllowUsers {USER}\n")
        log = (self.root / "sshd.log").open("w")
        self.process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        return self

    def listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
        return any(c.laddr and c.laddr.ip == self.host and c.laddr.port == 22 and c.status == "LISTEN"
                   for c in psutil.net_connections("tcp4"))

    def sessions(self) -> list[psutil.Process]:
        """The per-connection sshd processes this server forked (they outlive a killed listener)."""
        return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith(f"sshd: {USER}")]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        for session in self.sessions():
            session.kill()
        remove_user()
