"""A live service on a private JACK server, with a player and a listener attached to it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import rtmidi

from cadenza.config.settings import load_settings
from cadenza.stream.ports import InputPoller
from cadenza.stream.spin import SpinEventLoop


class Listener:
    """Collects everything that arrives on a port, stamped with time.monotonic()."""

    def __init__(self, port_suffix: str, name: str = "listener") -> None:
        self.midi = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name)
        self.midi.ignore_types(sysex=False, timing=False, active_sense=True)
        ports = self.midi.get_ports()
        self.midi.open_port(next(i for i, p in enumerate(ports) if p.endswith(port_suffix)))
        self.got: list[tuple[float, bytes]] = []
        self._poller = InputPoller(self.midi, lambda t, m: self.got.append((t, m)), name=name)

    def messages(self) -> list[bytes]:
        return [m for _, m in self.got]

    def wait_for(self, pred, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred(self.messages()):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._poller.stop()
        self.midi.close_port()
        self.midi.delete()


class Player:
    def __init__(self, port_suffix: str, name: str = "player") -> None:
        self.midi = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name)
        ports = self.midi.get_ports()
        self.midi.open_port(next(i for i, p in enumerate(ports) if p.endswith(port_suffix)))

    def send(self, *msgs) -> None:
        for m in msgs:
            self.midi.send_message(list(m))

    def close(self) -> None:
        self.midi.close_port()
        self.midi.delete()


def sounding(messages: list[bytes]) -> dict[tuple[int, int], int]:
    """Notes left on after a message stream (note-on count minus note-off count, CC 123 clears)."""
    on: dict[tuple[int, int], int] = {}
    for m in messages:
        kind = m[0] & 0xF0
        if kind == 0x90 and len(m) == 3 and m[2] > 0:
            on[(m[0] & 15, m[1])] = on.get((m[0] & 15, m[1]), 0) + 1
        elif kind in (0x80, 0x90) and len(m) == 3:
            k = (m[0] & 15, m[1])
            if on.get(k):
                on[k] -= 1
        elif kind == 0xB0 and len(m) == 3 and m[1] == 123:
            for k in [k for k in on if k[0] == (m[0] & 15)]:
                on[k] = 0
    return {k: v for k, v in on.items() if v}


def pedal_down(messages: list[bytes]) -> set[int]:
    """Channels whose sustain pedal (CC 64) is left down after a message stream."""
    down: set[int] = set()
    for m in messages:
        if m[0] & 0xF0 == 0xB0 and len(m) == 3 and m[1] == 64:
            (down.add if m[2] >= 64 else down.discard)(m[0] & 15)
        elif m[0] & 0xF0 == 0xB0 and len(m) == 3 and m[1] == 121:
            down.discard(m[0] & 15)
    return down


class LiveService:
    """`serve` running in a thread of this process (its own event loop)."""

    def __init__(self, settings, mode: str) -> None:
        from cadenza.stream.serve import serve

        self.engine = None
        self.snapshot = None
        self.error: BaseException | None = None
        ready = threading.Event()

        def on_ready(engine):
            self.engine = engine
            ready.set()

        def run():
            # engine.busy_poll: the spinning loop `cadenza serve --busy-poll` runs on
            loop = SpinEventLoop() if settings.engine.busy_poll else asyncio.new_event_loop()
            self.loop = loop
            try:
                self.snapshot = loop.run_until_complete(serve(settings, mode=mode, ready=on_ready, install_signals=False))
            except BaseException as exc:  # surfaced by stop()
                self.error = exc
                ready.set()
            finally:
                loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(60), "service did not start"
        if self.error:
            raise self.error

    def call(self, fn, *args):
        """Run fn on the service's loop and return its result."""
        done = threading.Event()
        box = {}

        def wrapper():
            box["r"] = fn(*args)
            done.set()

        self.loop.call_soon_threadsafe(wrapper)
        assert done.wait(5)
        return box.get("r")

    def stop(self) -> dict:
        if self.engine is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.engine.stop)
        self.thread.join(15)
        assert not self.thread.is_alive(), "service did not stop"
        if self.error:
            raise self.error
        return self.snapshot


@contextlib.contextmanager
def served_process(*serve_args: str):
    """`cadenza serve SERVE_ARGS` as its own process on the current JACK server, with a player
    on its input and a listener on its output; yields (process, player, listener). The test
    stops the process itself (to check how it stops); anything left running is killed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CADENZA_MIDI__API="jack", CADENZA_ENGINE__STATS_INTERVAL_S="0")
    proc = subprocess.Popen([sys.executable, "-m", "cadenza", "serve", *serve_args], env=env, stderr=subprocess.PIPE, text=True)
    player = listener = None
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            try:
                player, listener = Player("cadenza in"), Listener("cadenza out")
                break
            except StopIteration:
                time.sleep(0.2)
        assert player is not None, f"serve did not open its ports: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
        time.sleep(0.2)
        yield proc, player, listener
    finally:
        if proc.poll() is None:
            proc.kill()
        for x in (player, listener):
            if x is not None:
                x.close()


@contextlib.contextmanager
def running_service(mode: str, **sections):
    """A service in ``mode`` on the current JACK server, a player on its input and a listener
    on its output. ``sections`` override settings (``phrase={...}``)."""
    overrides = {"midi": {"api": "jack"}, "engine": {"stats_interval_s": 0}, **sections}
    svc = LiveService(load_settings(overrides=overrides), mode)
    player, listener = Player("cadenza in"), Listener("cadenza out")
    time.sleep(0.05)
    try:
        yield svc, player, listener
    finally:
        player.close()
        if svc.thread.is_alive():
            svc.stop()
        listener.close()


@pytest.fixture(params=["inline", "thread", "busy"])
def colorize_service(jack_server, request):
    """The colorize service with the model run inline on the loop (the CPU default), in its
    own thread (the GPU default), and inline on a busy-polling loop that reads the input port
    itself (``engine.busy_poll``): all must behave the same. The inline ones run with keep-warm
    ticks on (they must not change any answer)."""
    # A generous deadline: these tests check what comes out, not how fast, on a busy CI machine.
    worker = "thread" if request.param == "thread" else "inline"
    velocity = {"deadline_ms": 20.0, "worker": worker, "keep_warm_ms": 0.0 if worker == "thread" else 1.0}
    with running_service("colorize", velocity=velocity, engine={"stats_interval_s": 0, "busy_poll": request.param == "busy"}) as parts:
        yield parts


async def wait_for(pred, timeout: float = 10.0) -> bool:
    """Until ``pred()`` holds (True) or ``timeout`` seconds pass (False), looking every 20 ms and
    once more at the deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return bool(pred())


class MqttPeer:
    """The performers' side over a real broker: publishes to SESSION/in, collects every
    SESSION/out message (and whatever else ``topics`` names: subclasses collect more)."""

    topics: tuple[str, ...] = ("cadenza/+/out",)

    def __init__(self, broker) -> None:
        import aiomqtt

        self.client = aiomqtt.Client(broker.host, broker.port)
        self.got: dict[str, list[bytes]] = {}
        self._task = None

    async def __aenter__(self) -> MqttPeer:
        await self.client.__aenter__()
        await self.client.subscribe([(t, 0) for t in self.topics])
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc) -> None:
        import aiomqtt

        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        from cadenza.messages import split_messages

        async for m in self.client.messages:
            session = m.topic.value.split("/")[1]
            self.got.setdefault(session, []).extend(split_messages(bytes(m.payload)))

    async def play(self, session: str, *msgs: bytes) -> None:
        await self.client.publish(f"cadenza/{session}/in", b"".join(msgs))

    def out(self, session: str) -> list[bytes]:
        return list(self.got.get(session, []))

    async def wait_for(self, pred, timeout: float = 10.0) -> bool:
        return await wait_for(pred, timeout)
