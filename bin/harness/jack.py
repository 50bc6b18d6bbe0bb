"""Start and stop a private JACK server with the dummy driver.

Machines without a sound card or an ALSA sequencer (CI, containers, GPU servers) still get real
virtual MIDI ports this way: ``jackd --no-realtime -d dummy`` runs entirely in user space. Tests
and ``cadenza bench latency`` start their own server under a unique name, so they never touch a
server the user is running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from cadenza.errors import PortError


class JackServer:
    """A ``jackd`` process with the dummy driver; a context manager.

    While it runs, ``JACK_DEFAULT_SERVER`` is set to its name in this process, so every JACK client
    created here (python-rtmidi, PortAudio) talks to it. ``stop()`` is safe twice.

    ``sync`` (the default) makes the server wait for every client each cycle. Without it a client
    that is late on a loaded machine has its previous cycle's port buffer read again, and MIDI
    events arrive twice or in place of others.
    """

    def __init__(self, *, name: str | None = None, rate: int = 48000, period: int = 64, log: Path | None = None, sync: bool = True) -> None:
        self.name = name or f"cadenza-{uuid.uuid4().hex[:8]}"
        self.rate = rate
        self.period = period
        self.log = log
        self.sync = sync
        self._proc: subprocess.Popen | None = None
        self._old_env: str | None = None

    @property
    def period_s(self) -> float:
        return self.period / self.rate

    def start(self, timeout: float = 10.0) -> JackServer:
        jackd = shutil.which("jackd")
        if jackd is None:
            raise PortError("jackd not found: install JACK (Debian/Ubuntu: apt-get install jackd2)")
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [
                jackd,
                "--no-realtime",
                *(["--sync"] if self.sync else []),
                "-n",
                self.name,
                "-d",
                "dummy",
                "-r",
                str(self.rate),
                "-p",
                str(self.period),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._old_env = os.environ.get("JACK_DEFAULT_SERVER")
        os.environ["JACK_DEFAULT_SERVER"] = self.name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise PortError(f"jackd exited at start (code {self._proc.returncode})")
            if _server_answers(self.name):
                return self
            time.sleep(0.05)
        self.stop()
        raise PortError(f"JACK server {self.name!r} did not come up within {timeout:.0f} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._old_env is None:
            os.environ.pop("JACK_DEFAULT_SERVER", None)
        else:
            os.environ["JACK_DEFAULT_SERVER"] = self._old_env
        self._old_env = None

    def __enter__(self) -> JackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM a server we started, SIGKILL it if it has not gone within 5 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _server_answers(name: str) -> bool:
    lsp = shutil.which("jack_lsp")
    if lsp is None:
        time.sleep(0.5)
        return True
    env = dict(os.environ, JACK_DEFAULT_SERVER=name, JACK_NO_START_SERVER="1")
    r = subprocess.run([lsp], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
    return r.returncode == 0


def jack_running() -> bool:
    """Whether a JACK server answers under the current default name (without starting one)."""
    return shutil.which("jack_lsp") is not None and _server_answers(os.environ.get("JACK_DEFAULT_SERVER", "default"))
