"""MQTT: the headless daemon's sessions, and the thin bridge on a performer's machine.

A GPU box runs ``cadenza serve --transport mqtt``; each performer runs ``cadenza bridge
--session NAME`` beside their keyboard and synth. The broker (Mosquitto, or a cluster of them)
is the only thing both sides talk to, so boxes scale out behind it without a protocol of our own.

Topics (``PREFIX`` is ``mqtt.topic_prefix``, default ``cadenza``; SESSION is 1–64 characters
from ``A-Z a-z 0-9 _ . -``, not starting with ``_``)::

    PREFIX/SESSION/in      bridge -> daemon   MIDI the performer played
    PREFIX/SESSION/out     daemon -> bridge   what the engine made of it (colorized notes, CCs...)
    PREFIX/SESSION/bye     bridge -> daemon   the bridge left (also its MQTT will): release the
                                              session's notes and forget its state
    PREFIX/_daemon/ID/status   retained ``online`` / ``offline`` (the daemon's will)
    PREFIX/_daemon/ID/stats    the daemon's metrics as JSON, every ``engine.stats_interval_s``

Every ``in`` and ``out`` payload is raw MIDI: one or more complete messages, each with its status
byte (no running status), in order — ``mosquitto_pub -t cadenza/me/in -m ...`` can play a note.
The daemon stamps messages on arrival, so timing as the model sees it includes the network's
jitter (well under a millisecond on a LAN). Malformed stretches, unknown topics, oversized
payloads and sessions over the limit are dropped and counted, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections import deque
from typing import Any, Callable

from cadenza.buffers.ledger import NoteLedger
from cadenza.config.settings import MqttSettings, Settings
from cadenza.errors import BrokerError, ConfigError
from cadenza.stream.messages import split_messages

log = logging.getLogger(__name__)

# Small packets must leave at once: with Nagle's algorithm on, a 3-byte note waits for the ACK of
# the previous packet, which the peer delays by up to 40 ms (the broker needs `set_tcp_nodelay
# true` in mosquitto.conf for its side of the same problem).
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

SESSION_RE = re.compile(r"^[A-Za-z0-9.\-][A-Za-z0-9_.\-]{0,63}$")


def _aiomqtt():
    import aiomqtt

    return aiomqtt


class _StampingQueue(asyncio.Queue):
    """aiomqtt's incoming queue, stamping each message with the moment the socket delivered
    it: that, not when the receive task gets to it, is the note's arrival time. The instance
    is kept (``latest``) so the receiver can drain everything that has arrived at once."""

    latest: "_StampingQueue | None" = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        type(self).latest = self

    def put_nowait(self, item) -> None:
        item.arrived = time.monotonic()
        super().put_nowait(item)


def client_id(settings: MqttSettings, role: str) -> str:
    return settings.client_id or f"cadenza-{role}-{socket.gethostname()}-{os.getpid()}"


def check_session(name: str) -> str:
    if not SESSION_RE.match(name):
        raise ConfigError(f"session name {name!r} must be 1-64 characters from A-Z a-z 0-9 _ . - and not start with _")
    return name


async def connect(settings: MqttSettings, *, identifier: str, will_topic: str, will_payload: bytes, retain_will: bool) -> tuple[Any, contextlib.AsyncExitStack]:
    """An open aiomqtt client (and the stack that closes it); BrokerError in one line if the
    broker does not answer within ``connect_timeout_s``. ``client.incoming`` is its queue of
    received messages."""
    aiomqtt = _aiomqtt()

    class Incoming(_StampingQueue):
        pass

    password = settings.password.get_secret_value() if settings.password is not None else None
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        identifier=identifier,
        username=settings.username,
        password=password,
        keepalive=settings.keepalive_s,
        timeout=settings.connect_timeout_s,
        will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=retain_will),
        logger=logging.getLogger("cadenza.mqtt.client"),
        socket_options=NODELAY,
        queue_type=Incoming,
    )
    client.incoming = Incoming.latest
    stack = contextlib.AsyncExitStack()
    try:
        await asyncio.wait_for(stack.enter_async_context(client), settings.connect_timeout_s)
    except (aiomqtt.MqttError, OSError, asyncio.TimeoutError) as exc:
        await stack.aclose()
        reason = str(exc) or type(exc).__name__
        raise BrokerError(f"cannot reach the MQTT broker at {settings.host}:{settings.port} ({reason}); start one (e.g. `mosquitto -p {settings.port}`) or set mqtt.host / mqtt.port") from None
    return client, stack


class _Outbox:
    """Outgoing MIDI per topic, coalesced: everything queued for one topic since the last wake
    goes out as one payload (a chord is one MQTT packet), topics in order of first use."""

    def __init__(self) -> None:
        self._items: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self.first_put = 0.0  # when the oldest item still queued was put

    def put(self, topic: str, data: bytes) -> None:
        if not self._items:
            self.first_put = time.monotonic()
        self._items.append((topic, data))
        self._wake.set()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> int:
        n = len(self._items)
        self._items.clear()
        return n

    def take(self) -> dict[str, bytes]:
        payloads: dict[str, bytearray] = {}
        while self._items:
            topic, data = self._items.popleft()
            buf = payloads.get(topic)
            if buf is None:
                payloads[topic] = bytearray(data)
            else:
                buf += data
        self._wake.clear()
        return {t: bytes(b) for t, b in payloads.items()}

    async def wait(self) -> None:
        await self._wake.wait()


async def _publish_all(client, payloads: dict[str, bytes], qos: int) -> None:
    """Hand every payload to the client at once (packets queue in order on the one socket);
    waiting for each write before queueing the next cost a loop round trip per session."""
    if len(payloads) == 1:
        topic, payload = next(iter(payloads.items()))
        await client.publish(topic, payload, qos=qos)
    elif payloads:
        await asyncio.gather(*(client.publish(t, p, qos=qos) for t, p in payloads.items()))


# ---- the daemon side ------------------------------------------------------------------------


class MqttTransport:
    """The daemon's source and sink: sessions in, each session's output back to its own topic.

    It is an engine sink with ``routed = True``: the engine hands it ``(source, data)`` and it
    publishes to that source's ``out`` topic. Session names map to engine sources 1, 2, ...
    """

    routed = True
    name = "mqtt"

    def __init__(self, settings: MqttSettings, engine_settings) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix.rstrip("/")
        self.identifier = client_id(settings, "serve")
        self.status_topic = f"{self.prefix}/_daemon/{self.identifier}/status"
        self.stats_interval = engine_settings.stats_interval_s
        self.engine = None
        self.on_online: Callable[[], None] | None = None  # called once, when sessions are first taken
        self.client = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._outbox = _Outbox()
        self._sources: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._out_topics: dict[int, str] = {}
        self._last_input: dict[int, float] = {}
        self._next_source = 1
        self._refused: set[str] = set()

    # ---- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (BrokerError in one line if the broker does not answer); sessions are taken
        only once :meth:`run` starts, when the engine and its model are ready."""
        self.client, self._stack = await connect(self.settings, identifier=self.identifier, will_topic=self.status_topic, will_payload=b"offline", retain_will=True)
        log.info("mqtt: connected to %s:%d as %s", self.settings.host, self.settings.port, self.identifier)

    async def _go_online(self) -> None:
        await self.client.subscribe([(f"{self.prefix}/+/in", 0), (f"{self.prefix}/+/bye", 1)])
        await self.client.publish(self.status_topic, b"online", qos=1, retain=True)
        log.info("mqtt: online; sessions on %s/+/in", self.prefix)
        on_online, self.on_online = self.on_online, None
        if on_online is not None:
            on_online()

    async def _drop_connection(self) -> None:
        stack, self._stack, self.client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def run(self) -> None:
        """Receive, publish, expire idle sessions; reconnect when the broker is lost."""
        aiomqtt = _aiomqtt()
        while True:
            if self.client is None:
                try:
                    await self.connect()
                except BrokerError as exc:
                    log.warning("mqtt: %s; retrying in %.0f s", exc, self.settings.reconnect_interval_s)
                    await asyncio.sleep(self.settings.reconnect_interval_s)
                    continue
                # What went out while we were away is lost; the notes it left sounding are
                # released now, as for a MIDI port that comes back.
                self.engine.panic("mqtt reconnected")
            try:
                await self._go_online()
            except (aiomqtt.MqttError, OSError) as exc:
                await self._lost(exc)
                continue
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._receive(), name="mqtt-receive")
                    tg.create_task(self._publish(), name="mqtt-publish")
                    tg.create_task(self._expire(), name="mqtt-expire")
                    tg.create_task(self._stats(), name="mqtt-stats")
            except* (aiomqtt.MqttError, OSError) as group:
                await self._lost(group.exceptions[0])

    async def _lost(self, exc: BaseException) -> None:
        self.engine.metrics.inc("mqtt_disconnects")
        log.warning("mqtt: lost the broker (%s); reconnecting", exc)
        await self._drop_connection()
        lost = self._outbox.clear()
        if lost:
            self.engine.metrics.inc("mqtt_out_lost", lost)
        await asyncio.sleep(self.settings.reconnect_interval_s)

    async def close(self, timeout: float = 3.0) -> None:
        """Publish what is still queued (the shutdown's note-offs), say offline, disconnect."""
        if self.client is not None:
            try:
                async with asyncio.timeout(timeout):
                    await _publish_all(self.client, self._outbox.take(), 1)
                    await self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            except Exception as exc:  # broker gone at the very end: nothing more to do
                log.warning("mqtt: could not publish the final messages (%s)", exc)
        await self._drop_connection()

    # ---- input --------------------------------------------------------------------------

    async def _receive(self) -> None:
        # Everything that has arrived is handed to the engine in one go, so the pump sees a
        # chord (or notes of several sessions) as one batch and one model call, instead of a
        # loop round and a model call per message.
        incoming = self.client.incoming
        async for message in self.client.messages:
            self._take(message)
            while not incoming.empty():
                self._take(incoming.get_nowait())

    def _take(self, message) -> None:
        engine = self.engine
        metrics = engine.metrics
        parts = message.topic.value.split("/")
        name, verb = parts[-2], parts[-1]
        payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
        if verb == "bye":
            source = self._sources.get(name)
            if source is not None:
                self._end(source, "session said bye")
            return
        source = self._source(name)
        if source is None:
            metrics.inc("dropped")
            metrics.inc("dropped_session")
            return
        if not payload or len(payload) > self.settings.max_payload_bytes:
            metrics.inc("dropped")
            metrics.inc("dropped_payload_size")
            return
        now = getattr(message, "arrived", None) or time.monotonic()
        metrics.observe("mqtt_in_wait", time.monotonic() - now)  # socket -> the engine has it
        self._last_input[source] = now
        for data in split_messages(bytes(payload)):
            engine.deliver_now(now, data, source=source)

    def _source(self, name: str) -> int | None:
        source = self._sources.get(name)
        if source is not None:
            return source
        if not SESSION_RE.match(name) or len(self._sources) >= self.settings.max_sessions:
            if name not in self._refused and len(self._refused) < 1000:
                self._refused.add(name)
                why = "an invalid session name" if not SESSION_RE.match(name) else f"over mqtt.max_sessions={self.settings.max_sessions}"
                log.warning("mqtt: refusing session %r (%s)", name, why)
            return None
        source = self._next_source
        self._next_source += 1
        self._sources[name] = source
        self._names[source] = name
        self._out_topics[source] = f"{self.prefix}/{name}/out"
        self.engine.metrics.gauge("sessions", len(self._sources))
        log.info("mqtt: session %r started", name)
        return source

    def _end(self, source: int, reason: str) -> None:
        name = self._names.pop(source)
        log.info("mqtt: session %r ended (%s)", name, reason)
        self.engine.forget_source(source, f"session {name} ended")  # its note-offs are queued by now
        del self._sources[name]
        del self._out_topics[source]
        self._last_input.pop(source, None)
        self.engine.metrics.inc("sessions_ended")
        self.engine.metrics.gauge("sessions", len(self._sources))

    async def _expire(self) -> None:
        idle = self.settings.session_idle_s
        if idle <= 0:
            return
        while True:
            await asyncio.sleep(min(idle, 1.0))
            now = time.monotonic()
            for source, t in list(self._last_input.items()):
                if now - t >= idle:
                    self._end(source, f"no input for {idle:g} s")

    # ---- output -------------------------------------------------------------------------

    def send_from(self, source: int, data: bytes) -> None:
        topic = self._out_topics.get(source)
        if topic is None:  # not a session (source 0 has no remote peer)
            return
        if self.client is None:
            self.engine.metrics.inc("mqtt_out_lost")
            return
        self._outbox.put(topic, data)

    def send(self, data: bytes) -> None:  # the Sink protocol; routed sinks get send_from
        raise TypeError("MqttTransport is a routed sink: use send_from(source, data)")

    async def _publish(self) -> None:
        qos = self.settings.out_qos
        observe = self.engine.metrics.observe
        while True:
            await self._outbox.wait()
            t0 = self._outbox.first_put
            await _publish_all(self.client, self._outbox.take(), qos)
            observe("mqtt_out", time.monotonic() - t0)  # emitted -> written to the socket

    async def _stats(self) -> None:
        if self.stats_interval <= 0:
            return
        topic = f"{self.prefix}/_daemon/{self.identifier}/stats"
        while True:
            await asyncio.sleep(self.stats_interval)
            snap = self.engine.metrics.snapshot()
            snap["sessions"] = sorted(self._sources)
            await self.client.publish(topic, json.dumps(snap).encode(), qos=0)


async def serve_mqtt(settings: Settings, *, mode: str = "colorize", ready: Callable | None = None, install_signals: bool = True) -> dict:
    """The headless daemon: sessions over MQTT through one engine and one model worker (which
    batches notes across sessions). Returns the final metrics."""
    import signal

    from cadenza.models.worker import pick_device
    from cadenza.stream.engine import Engine
    from cadenza.stream.serve import build_velocity_worker

    if mode != "colorize":
        raise ConfigError(f"--transport mqtt serves --mode colorize (got {mode}); continuation and lookahead answer one performer on one port pair")
    loop = asyncio.get_running_loop()
    transport = MqttTransport(settings.mqtt, settings.engine)
    await transport.connect()
    try:
        worker = build_velocity_worker(settings)
        await asyncio.to_thread(worker.start, loop)
        try:
            engine = Engine(settings, sinks=[transport], velocity_worker=worker)
            engine.bind(loop)
            transport.engine = engine
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, engine.stop)
            log.info("serving sessions over MQTT (model on %s); Ctrl-C to stop", pick_device(settings.velocity.device))
            if ready is not None:
                transport.on_online = lambda: ready(engine, transport)
            try:
                await engine.run(transport.run)
            finally:
                if install_signals:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.remove_signal_handler(sig)
            snapshot = engine.metrics.snapshot()
        finally:
            worker.stop()
    finally:
        await transport.close()
    return snapshot


# ---- the bridge (on the performer's machine) -----------------------------------------------


class Bridge:
    """Local MIDI ports <-> one session on the broker.

    What the performer plays on the input port is published to ``SESSION/in`` as it arrives
    (messages that arrive together share a packet); what comes back on ``SESSION/out`` is sent
    to the output port. Every note it sends locally is in its ledger, so leaving — Ctrl-C, the
    broker lost, the daemon gone — never leaves a note sounding.
    """

    def __init__(self, settings: Settings, session: str) -> None:
        self.settings = settings
        self.session = check_session(session)
        prefix = settings.mqtt.topic_prefix.rstrip("/")
        self.in_topic, self.out_topic, self.bye_topic = (f"{prefix}/{session}/{v}" for v in ("in", "out", "bye"))
        self.identifier = client_id(settings.mqtt, "bridge")
        self.ledger = NoteLedger()
        self.counts = {"in": 0, "out": 0, "dropped_malformed": 0, "dropped_offline": 0, "disconnects": 0}
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
        self.client, self._stack = await connect(self.settings.mqtt, identifier=self.identifier, will_topic=self.bye_topic, will_payload=b"", retain_will=False)
        await self.client.subscribe(self.out_topic, qos=0)

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
        from cadenza.stream.messages import classify

        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
            for data in split_messages(bytes(payload)):
                if classify(data) is None:
                    self.counts["dropped_malformed"] += 1
                    continue
                self._out_port.send(data)
                self.ledger.track(data)
                self.counts["out"] += 1

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
                        tasks = [tg.create_task(self._receive()), tg.create_task(self._publish())]
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
        inp = MidiInputPort(api, client_name=midi.client_name, name=midi.in_port, attach=midi.attach_in, deliver=lambda t, data: loop.call_soon_threadsafe(bridge.played, data))
        opened.callback(inp.close)
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, bridge.stop)
                opened.callback(loop.remove_signal_handler, sig)
        return await bridge.run(out, ready=ready)
