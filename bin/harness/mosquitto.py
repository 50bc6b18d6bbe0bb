"""Start and stop a private Mosquitto broker on a free loopback port.

The tests and ``cadenza bench mqtt`` use one so they never depend on, or disturb, a broker the
operator runs. Mosquitto 2 only listens on loopback without a config file, and anonymous access
must be allowed explicitly; the config written here does both for one port.

For the security tests it can also run a real operator's configuration (``deploy/mosquitto.conf``):
everything in that file is kept except the listener's port and the paths, which point at files
made here — a test CA and server certificate (:func:`make_certificates`, with the ``openssl``
CLI), a password file (``mosquitto_passwd -b``), the ACL file given.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cadenza.errors import BrokerError
from cadenza.harness.jack import stop_process

# set_tcp_nodelay: MIDI messages are tiny packets, and Nagle's algorithm would hold each one back
# until the previous one is acknowledged (tens of milliseconds).
PLAIN_CONF = "listener 1883\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"

# Lines of an operator's config that name a place on this machine; the harness writes its own.
# (`user`: as root, Mosquitto would otherwise switch to the `mosquitto` user, who cannot read
# the test's files.)
_LOCAL_KEYS = {"listener", "port", "cafile", "capath", "certfile", "keyfile", "password_file", "acl_file", "persistence_location"}
_LOCAL_KEYS |= {"log_dest", "pid_file", "include_dir", "user", "persistence_file", "crlfile"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str, *where: str) -> str:
    exe = shutil.which(name) or next((p for p in where if Path(p).is_file()), None)
    if exe is None:
        raise BrokerError(f"{name} not found: install it (Debian/Ubuntu: apt-get install mosquitto)")
    return exe


def _run(*cmd: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        err = (done.stderr or done.stdout).strip().splitlines()
        raise BrokerError(f"{cmd[0]} {cmd[1]} failed: {err[-1] if err else done.returncode}")


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1/localhost signed by it,
    and a client certificate (CN ``client_name``) signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path, *, client_name: str = "cadenza-daemon", days: int = 2) -> Certificates:
    """A CA and the certificates it signs, made with the ``openssl`` CLI (EC P-256: fast)."""
    openssl = _exe("openssl", "/usr/bin/openssl")
    folder.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca_ext = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _run(
        openssl,
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        str(days),
        "-subj",
        "/CN=Cadenza test CA",
        *ca_ext,
        cwd=folder,
    )
    leaves = {
        "server": ("/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        "client": (f"/CN={client_name}", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, ext) in leaves.items():
        (folder / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{ext}"
        )
        _run(openssl, "req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
        _run(openssl, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", str(days),
             "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder)  # fmt: skip
    return Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt", folder / "client.key")


def _templated(conf: str, local: list[str]) -> str:
    """``conf`` with every line that names a port or a path replaced by ``local``'s lines; the
    listener comes first, so the listener options after it in ``conf`` stay its own."""
    kept = [line for line in conf.splitlines() if line.split(maxsplit=1)[:1] and line.split()[0] not in _LOCAL_KEYS]
    kept = [line for line in kept if not line.lstrip().startswith("#")]
    return "\n".join(local + kept) + "\n"


class MosquittoBroker:
    """A ``mosquitto`` process on 127.0.0.1:``port``; a context manager, ``stop()`` safe twice.

    By default anonymous and plain. ``conf``: an operator's mosquitto.conf to run instead (its
    listener and paths replaced); ``tls``: serve TLS with these certificates (clients must show
    one signed by the same CA when ``conf`` says ``require_certificate true``); ``users``: user
    name -> password, written with ``mosquitto_passwd``; ``acl_file``: the ACL to enforce.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log: Path | None = None,
        conf: str | None = None,
        tls: Certificates | None = None,
        users: dict[str, str] | None = None,
        acl_file: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log = log
        self.conf = conf
        self.tls = tls
        self.users = users
        self.acl_file = acl_file
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def _write_conf(self, folder: Path) -> Path:
        local = [f"listener {self.port} {self.host}"]
        if self.tls is not None:
            local += [f"cafile {self.tls.ca}", f"certfile {self.tls.server_cert}", f"keyfile {self.tls.server_key}"]
        if self.users is not None:
            passwd = folder / "passwd"
            passwd.touch(mode=0o600)
            for user, password in self.users.items():
                _run(_exe("mosquitto_passwd", "/usr/bin/mosquitto_passwd"), "-b", str(passwd), user, password)
            local.append(f"password_file {passwd}")
        if self.acl_file is not None:
            local.append(f"acl_file {self.acl_file}")
        local += [f"persistence_location {folder}/", "log_dest stdout", f"user {getpass.getuser()}"]
        conf = folder / "mosquitto.conf"
        conf.write_text(_templated(self.conf or PLAIN_CONF, local))
        return conf

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        exe = _exe("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
        self._dir = tempfile.TemporaryDirectory(prefix="cadenza-mosquitto-")
        try:
            conf = self._write_conf(Path(self._dir.name))
        except BrokerError:
            self.stop()
            raise
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise BrokerError(f"mosquitto exited at start (code {code}); is port {self.port} taken?")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout:.0f} s")

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its sockets open and answers nothing (a hung broker)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()  # a frozen broker must run to hear SIGTERM
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def flood(host: str, port: int, seconds: float, per_s: int, names: list[str], seed: int = 11) -> None:
    """A broken or hostile client: ``per_s`` payloads of random bytes a second for ``seconds`` to
    the input topics of a few session names, paced. Blocks; run it in a process of its own
    (``multiprocessing`` with the spawn context: it lives in an installed module, so the child
    can import it however the parent was started)."""
    import asyncio
    import random

    import aiomqtt

    async def main() -> None:
        rng = random.Random(seed)
        async with aiomqtt.Client(host, port) as c:
            t0 = time.monotonic()
            for k in range(int(seconds * per_s)):
                await asyncio.sleep(max(0.0, t0 + k / per_s - time.monotonic()))
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(50, 400)))
                await c.publish(f"cadenza/{names[k % len(names)]}/in", payload)

    asyncio.run(main())
