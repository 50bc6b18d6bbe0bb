"""Start, watch and stop ``cadenza serve --transport mqtt`` daemons as separate processes.

The cluster tests and ``cadenza bench mqtt --daemons N`` run several daemons against one
private broker, kill one (SIGKILL: what power loss looks like to the broker) or drain one
(SIGTERM), and watch the live set through the daemons' retained statuses, as bridges do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cadenza.errors import BrokerError
from cadenza.harness.jack import stop_process


class DaemonProcess:
    """One daemon process with a fixed client id (its name in the live set)."""

    def __init__(
        self,
        host: str,
        port: int,
        ident: str,
        *,
        mode: str = "colorize",
        env: dict[str, str] | None = None,
        log: Path | None = None,
        keepalive_s: int = 1,
    ) -> None:
        self.host, self.port, self.ident, self.mode = host, port, ident, mode
        self.env = {
            "CADENZA_MQTT__CLIENT_ID": ident,
            "CADENZA_MQTT__KEEPALIVE_S": str(keepalive_s),
            "CADENZA_MQTT__RECONNECT_INTERVAL_S": "0.2",
            **(env or {}),
        }
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        cmd = [sys.executable, "-m", "cadenza", "--log-level", "info", "serve", "--transport", "mqtt", "--mode", self.mode]
        cmd += ["--mqtt-host", self.host, "--mqtt-port", str(self.port)]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        env = dict(os.environ, **self.env)
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye; the broker publishes the daemon's will."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the process and its connection stay, silent — what a box that lost its
        network looks like to the broker until the keepalive runs out. ``stop()`` still ends it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def drain(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code (a daemon stuck in its stop exits 1 by itself after
        writing every thread's stack to its log: see :meth:`log_tail`)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the daemon's log, for a failing assertion's message."""
        if self.log is None or not Path(self.log).is_file():
            return "(no log)"
        return Path(self.log).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen one must run to hear SIGTERM
        stop_process(self.proc)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_online(host: str, port: int, daemons: list[DaemonProcess], timeout: float = 120.0, prefix: str = "cadenza") -> None:
    """Until every daemon's retained status says online (BrokerError if one exits first)."""
    import aiomqtt

    from cadenza.stream.mqtt.ownership import ONLINE, Status, daemon_of

    want = {d.ident for d in daemons}

    async def main():
        seen: set[str] = set()
        async with aiomqtt.Client(host, port) as c:
            await c.subscribe(f"{prefix}/_daemon/+/status", qos=1)
            async for m in c.messages:
                ident = daemon_of(m.topic.value)
                status = Status.decode(bytes(m.payload))
                if ident in want and status is not None and status.state == ONLINE:
                    seen.add(ident)
                if seen == want:
                    return

    async def guarded():  # watches the processes while main() watches the statuses
        end = time.monotonic() + timeout
        task = asyncio.create_task(main())
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            dead = [d for d in daemons if not d.alive]
            if dead and not task.done():
                task.cancel()
                raise BrokerError(f"daemon {dead[0].ident} exited with code {dead[0].proc.poll()} before coming online")
            if time.monotonic() > end and not task.done():
                task.cancel()
                raise BrokerError(f"daemons did not come online within {timeout:.0f} s")
        task.result()

    asyncio.run(guarded())
