"""The bridge on a performer's machine: local MIDI ports <-> one session on the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from cadenza.buffers.ledger import NoteLedger
from cadenza.config.settings import Settings
from cadenza.errors import BrokerError
from cadenza.messages import split_messages
from cadenza.stream.mqtt.client import _aiomqtt, _Outbox, _publish_all, check_session, client_id, connect
from cadenza.stream.mqtt.ownership import LiveSet, Status, daemon_of

log = logging.getLogger(__name__)


class Bridge:
    """Local MIDI ports <-> one session on the broker.

    What the performer plays on the input port is published to ``SESSION/in`` as it arrives
    (messages that arrive together share a packet); what comes back on ``SESSION/out`` is sent
    to the output port. Every note it sends locally is in its ledger, so leaving — Ctrl-C, the
    broker lost, the daemon gone — never leaves a note sounding.

    It follows the daemons' statuses as the daemons do, so it knows which one answers its
    session: when that one leaves or dies (its will), the notes it left sounding here are
    released at once, and the next note played is answered by the new owner.
    """

    def __init__(self, settings: Settings, session: str) -> None:
        self.session = check_session(session)
        m = settings.mqtt
        if m.username is None and (m.password is not None or m.password_file is not None):
            # the shipped ACL (deploy/acl) gives each performer the session named like their user
            settings = settings.model_copy(update={"mqtt": m.model_copy(update={"username": session})})
        elif m.username is not None and m.username != session:
            log.warning(
                "bridge: user %r plays session %r; with the shipped ACL a user may only use the session of its own name",
                m.username,
                session,
            )
        self.settings = settings
        prefix = settings.mqtt.topic_prefix.rstrip("/")
        self.in_topic, self.out_topic, self.bye_topic = (f"{prefix}/{session}/{v}" for v in ("in", "out", "bye"))
        self.status_filter = f"{prefix}/_daemon/+/status"
        self.live = LiveSet(3 * self.settings.mqtt.status_interval_s)
        self.owner: str | None = None  # the daemon answering this session
        self.identifier = client_id(settings.mqtt, f"bridge-{session}")
        self.ledger = NoteLedger()
        self.counts = {"in": 0, "out": 0, "dropped_malformed": 0, "dropped_offline": 0, "disconnects": 0, "failovers": 0}
        self.client = None
        self._stack = None
        self._outbox = _Outbox()
        self._out_port = None
        self._stop = asyncio.Event()

    def played(self, data: bytes) -> None:
        """Called on the loop for each message from the input port."""
        self.counts["in"] += 1
        if self.client is not None:
            self._outbox.put(self.in_topic, data)
        else:
            self.counts["dropped_offline"] += 1

    def stop(self) -> None:
        self._stop.set()

    async def _connect(self) -> None:
        self.client, self._stack = await connect(
            self.settings.mqtt, identifier=self.identifier, will_topic=self.bye_topic, will_payload=b"", retain_will=False
        )
        self.live = LiveSet(3 * self.settings.mqtt.status_interval_s)
        await self.client.subscribe([(self.out_topic, 0), (self.status_filter, 1)])

    async def _disconnect(self, *, say_bye: bool) -> None:
        if self.client is not None and say_bye:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await _publish_all(self.client, self._outbox.take(), 0)
                    await self.client.publish(self.bye_topic, b"", qos=1)
        stack, self._stack, self.client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    def release(self, reason: str) -> None:
        owed = self.ledger.release_all()
        if owed:
            log.info("bridge: %s: releasing %d notes", reason, sum(1 for d in owed if d[0] & 0xF0 == 0x80))
        for data in owed:
            self._out_port.send(data)

    async def _receive(self) -> None:
        from cadenza.messages import classify

        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
            daemon = daemon_of(message.topic.value)
            if daemon is not None:
                self._status(daemon, bytes(payload))
                continue
            for data in split_messages(bytes(payload)):
                if classify(data) is None:
                    self.counts["dropped_malformed"] += 1
                    continue
                self._out_port.send(data)
                self.ledger.track(data)
                self.counts["out"] += 1

    def _status(self, daemon: str, payload: bytes) -> None:
        status = Status.decode(payload)
        if status is not None and self.live.update(daemon, status, time.time()):
            self._follow_owner()

    async def _expire(self) -> None:
        """Daemons that stopped repeating their status are gone (as the daemons decide too)."""
        interval = self.settings.mqtt.status_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.live.expire(time.time()):
                self._follow_owner()

    def _follow_owner(self) -> None:
        owner = self.live.owner(self.session)
        if owner == self.owner:
            return
        if self.owner is not None:
            # The daemon that played our notes is gone, or handed us to one that joined: what
            # it left sounding here is released now (a live one releases them too; a note-off
            # twice is harmless), and the new owner starts afresh with the next note played.
            if self.owner not in self.live.daemons:
                self.counts["failovers"] += 1
            self.release(f"daemon {self.owner} left, {owner or 'no daemon'} takes over")
        else:
            log.info("bridge: session %r is served by %s", self.session, owner)
        self.owner = owner

    async def _publish(self) -> None:
        while True:
            await self._outbox.wait()
            await _publish_all(self.client, self._outbox.take(), 0)

    async def run(self, out_port, ready: Callable | None = None) -> dict:
        """Run until :meth:`stop`; the first connection must succeed (BrokerError otherwise)."""
        aiomqtt = _aiomqtt()
        self._out_port = out_port
        await self._connect()
        log.info("bridge: session %r on %s:%d", self.session, self.settings.mqtt.host, self.settings.mqtt.port)
        if ready is not None:
            ready(self)
        try:
            while not self._stop.is_set():
                if self.client is None:
                    try:
                        await self._connect()
                        log.info("bridge: reconnected")
                    except BrokerError as exc:
                        log.warning("bridge: %s; retrying", exc)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), self.settings.mqtt.reconnect_interval_s)
                        continue
                try:
                    async with asyncio.TaskGroup() as tg:
                        tasks = [tg.create_task(self._receive()), tg.create_task(self._publish()), tg.create_task(self._expire())]
                        await self._stop.wait()
                        for t in tasks:
                            t.cancel()
                except* (aiomqtt.MqttError, OSError) as group:
                    self.counts["disconnects"] += 1
                    log.warning("bridge: lost the broker (%s)", group.exceptions[0])
                    self.release("broker lost")
                    self._outbox.clear()
                    await self._disconnect(say_bye=False)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.settings.mqtt.reconnect_interval_s)
        finally:
            self.release("bridge stopping")
            await self._disconnect(say_bye=True)
        return dict(self.counts)


async def run_bridge(settings: Settings, session: str, *, ready: Callable | None = None, install_signals: bool = True) -> dict:
    """`cadenza bridge`: local ports (virtual ``cadenza in``/``cadenza out`` by default, or
    attached ones) to one session of a daemon."""
    import signal

    from cadenza.stream.ports import MidiInputPort, MidiOutputPort, resolve_api

    loop = asyncio.get_running_loop()
    bridge = Bridge(settings, session)
    midi = settings.midi
    api = resolve_api(midi.api)
    with contextlib.ExitStack() as opened:
        out = MidiOutputPort(api, client_name=midi.client_name, name=midi.out_port, attach=midi.attach_out)
        opened.callback(out.close)
        inp = MidiInputPort(
            api,
            client_name=midi.client_name,
            name=midi.in_port,
            attach=midi.attach_in,
            deliver=lambda t, data: loop.call_soon_threadsafe(bridge.played, data),
        )
        opened.callback(inp.close)
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, bridge.stop)
                opened.callback(loop.remove_signal_handler, sig)
        return await bridge.run(out, ready=ready)
