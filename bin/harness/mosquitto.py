"""Start and stop a private Mosquitto broker on a free loopback port.

The tests and ``cadenza bench mqtt`` use one so they never depend on, or disturb, a broker the
operator runs. Mosquitto 2 only listens on loopback without a config file, and anonymous access
must be allowed explicitly; the config written here does both for one port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cadenza.errors import BrokerError
from cadenza.harness.jack import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MosquittoBroker:
    """A ``mosquitto`` process on 127.0.0.1:``port``; a context manager, ``stop()`` safe twice."""

    def __init__(self, port: int | None = None, *, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log = log
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None
        )
        if exe is None:
            raise BrokerError("mosquitto not found: install it (Debian/Ubuntu: apt-get install mosquitto)")
        self._dir = tempfile.TemporaryDirectory(prefix="cadenza-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        # set_tcp_nodelay: MIDI messages are tiny packets, and Nagle's algorithm would hold each
        # one back until the previous one is acknowledged (tens of milliseconds).
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
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

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
