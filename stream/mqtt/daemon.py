"""The headless daemon: every session over MQTT through one engine (``serve --transport mqtt``)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import time
from collections.abc import Callable

from cadenza.config.settings import MqttSettings, Settings
from cadenza.errors import BrokerError, ConfigError
from cadenza.messages import split_messages
from cadenza.stream.mqtt.client import SESSION_RE, _aiomqtt, _Outbox, _publish_all, client_id, connect
from cadenza.stream.mqtt.limits import SessionGate
from cadenza.stream.mqtt.ownership import DRAINING, OFFLINE, ONLINE, LiveSet, Status, daemon_of

log = logging.getLogger(__name__)


class MqttTransport:
    """The daemon's source and sink: sessions in, each session's output back to its own topic.

    It is a :class:`~cadenza.stream.sinks.RoutedSink`: the engine hands it ``(source, data)`` and
    it publishes to that source's ``out`` topic. Session names map to engine sources 1, 2, ...

    Several daemons may share a broker: each follows the others' retained statuses and answers
    only the sessions it owns (:mod:`cadenza.stream.mqtt.ownership`); when the live set changes,
    the sessions that moved away are ended here (their notes released) and start afresh at their
    new owner with the next note played.
    """

    name = "mqtt"

    def __init__(self, settings: MqttSettings, engine_settings) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix.rstrip("/")
        self.identifier = client_id(settings, "serve")
        self.status_topic = f"{self.prefix}/_daemon/{self.identifier}/status"
        self.live = LiveSet(3 * settings.status_interval_s)
        self.draining = False
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
        self._gates: dict[int, SessionGate] = {}

    # ---- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (BrokerError in one line if the broker does not answer); sessions are taken
        only once :meth:`run` starts, when the engine and its model are ready."""
        self.client, self._stack = await connect(
            self.settings, identifier=self.identifier, will_topic=self.status_topic, will_payload=b"offline", retain_will=True
        )
        log.info("mqtt: connected to %s:%d as %s", self.settings.host, self.settings.port, self.identifier)

    async def _go_online(self) -> None:
        # Learn the live set first (the retained statuses arrive at once), so that no session
        # another daemon owns is answered twice while this one starts.
        self.live = LiveSet(3 * self.settings.status_interval_s)
        status_filter = f"{self.prefix}/_daemon/+/status"
        await self.client.subscribe(status_filter, qos=1)
        await self._settle_statuses()
        self.live.update(self.identifier, self._online(), time.time())
        await self.client.subscribe([(f"{self.prefix}/+/in", 0), (f"{self.prefix}/+/bye", 1)])
        await self.client.publish(self.status_topic, self._online().encode(), qos=1, retain=True)
        log.info("mqtt: online as %s, one of %d daemons; sessions on %s/+/in", self.identifier, len(self.live), self.prefix)
        on_online, self.on_online = self.on_online, None
        if on_online is not None:
            on_online()

    async def _settle_statuses(self, quiet: float = 0.15, limit: float = 1.0) -> None:
        """Take status messages until none has come for ``quiet`` seconds (at most ``limit``)."""
        incoming = self.client.incoming
        end = time.monotonic() + limit
        while (left := end - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(incoming.get(), min(quiet, left))
            except TimeoutError:
                return
            self._take(message)

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
                except (BrokerError, ConfigError) as exc:  # a password file being rotated, too
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
                    tg.create_task(self._heartbeat(), name="mqtt-heartbeat")
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

    def drain(self) -> None:
        """Stop taking sessions (SIGTERM): say so, so the others take them over at once; the
        engine's shutdown then releases this daemon's notes and :meth:`close` says offline."""
        if self.draining:
            return
        self.draining = True
        log.info("mqtt: draining: handing %d sessions over", len(self._sources))
        if self.client is not None:
            asyncio.get_running_loop().create_task(self._say(Status(DRAINING, self.settings.capacity, time.time())))

    def _online(self) -> Status:
        return Status(ONLINE, self.settings.capacity, time.time())

    async def _heartbeat(self) -> None:
        """Repeat the status (so others can tell this daemon from a stale retained one) and drop
        the daemons that stopped repeating theirs."""
        interval = self.settings.status_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if not self.draining:
                await self.client.publish(self.status_topic, self._online().encode(), qos=1, retain=True)
            gone = self.live.expire(time.time(), keep=self.identifier)
            if gone:
                log.warning("mqtt: no status from %s for %.0f s; taking their sessions", ", ".join(gone), self.live.max_age)
                self._rebalance()

    async def _say(self, status: Status) -> None:
        with contextlib.suppress(Exception):
            await self.client.publish(self.status_topic, status.encode(), qos=1, retain=True)

    async def close(self, timeout: float = 3.0) -> None:
        """Publish what is still queued (the shutdown's note-offs), say offline, disconnect."""
        if self.client is not None:
            try:
                async with asyncio.timeout(timeout):
                    await _publish_all(self.client, self._outbox.take(), 1)
                    await self.client.publish(self.status_topic, Status(OFFLINE).encode(), qos=1, retain=True)
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
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
        daemon = daemon_of(topic)
        if daemon is not None:
            self._status(daemon, bytes(payload))
            return
        parts = topic.split("/")
        name, verb = parts[-2], parts[-1]
        if verb == "bye":
            source = self._sources.get(name)
            if source is not None:
                self._end(source, "session said bye")
            return
        if self.draining or (self._sources.get(name) is None and self.live.owner(name) != self.identifier):
            return  # another daemon's session (or this one is leaving)
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
        gate = self._gates[source]
        if not gate.admit_payload(len(payload), now):
            metrics.inc("dropped_rate_limit_payloads")
            self._throttle(source, gate, now)
            return
        messages = split_messages(bytes(payload))
        allowed = gate.admit_messages(len(messages), now)
        for data in messages[:allowed] if allowed < len(messages) else messages:
            gate.passed(data)
            engine.deliver_now(now, data, source=source)
        if allowed < len(messages):
            metrics.inc("dropped", len(messages) - allowed)
            metrics.inc("dropped_rate_limit", len(messages) - allowed)
            self._throttle(source, gate, now)

    def _throttle(self, source: int, gate: SessionGate, now: float) -> None:
        owed = gate.throttle()
        if owed:
            log.warning("mqtt: session %r over its rate limit; releasing its notes", self._names[source])
        for data in owed:
            self.engine.deliver_now(now, data, source=source)

    def _status(self, daemon: str, payload: bytes) -> None:
        status = Status.decode(payload)
        if status is None:
            self.engine.metrics.inc("mqtt_bad_status")
            return
        if daemon == self.identifier and status.state != ONLINE and not self.draining:
            # our own will, left over from a previous connection or published by the broker
            # while it thought us gone: we are here, say so again
            asyncio.get_running_loop().create_task(self._say(self._online()))
            return
        if self.live.update(daemon, status, time.time()):
            log.info("mqtt: daemon %s is %s; %d live", daemon, status.state, len(self.live))
            self._rebalance()

    def _rebalance(self) -> None:
        """The live set changed: end the sessions that now belong to another daemon."""
        self.engine.metrics.inc("ownership_changes")
        self.engine.metrics.gauge("daemons", len(self.live))
        for name, source in list(self._sources.items()):
            new_owner = self.live.owner(name)
            if new_owner != self.identifier:
                self.engine.metrics.inc("sessions_moved_out")
                self._end(source, f"moved to {new_owner}")

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
        m = self.settings
        self._gates[source] = SessionGate(
            m.session_msgs_per_s, m.session_burst_msgs, m.session_bytes_per_s, m.session_burst_bytes, time.monotonic()
        )
        self.engine.metrics.gauge("sessions", len(self._sources))
        log.info("mqtt: session %r started", name)
        return source

    def _end(self, source: int, reason: str) -> None:
        name = self._names.pop(source)
        log.info("mqtt: session %r ended (%s)", name, reason)
        self.engine.forget_source(source, f"session {name} ended")  # its note-offs are queued by now
        del self._sources[name]
        del self._out_topics[source]
        self._gates.pop(source, None)
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
            snap["daemons"] = dict(self.live.daemons)
            await self.client.publish(topic, json.dumps(snap).encode(), qos=0)


async def serve_mqtt(settings: Settings, *, mode: str = "colorize", ready: Callable | None = None, install_signals: bool = True) -> dict:
    """The headless daemon: sessions over MQTT through one engine and one model worker (which
    batches notes across sessions). Returns the final metrics."""
    import signal

    from cadenza.models.runtime import pick_device
    from cadenza.stream.build import build_engine
    from cadenza.stream.prometheus import prometheus_exporter

    loop = asyncio.get_running_loop()
    transport = MqttTransport(settings.mqtt, settings.engine)
    await transport.connect()
    try:
        async with build_engine(settings, mode, [transport], loop=loop) as engine:
            transport.engine = engine
            for name in ("ownership_changes", "sessions_moved_out", "sessions_ended", "dropped_rate_limit"):
                engine.metrics.inc(name, 0)  # scraped from the start, not from their first count
            device = pick_device(settings.velocity.device)
            # opened before the signal handlers: a port in use is one line, with nothing to undo
            with prometheus_exporter(settings.metrics, engine.metrics, info={"mode": mode, "device": str(device), "role": "daemon"}):
                if install_signals:

                    def leave() -> None:  # SIGINT and SIGTERM: hand the sessions over, then stop
                        # A stop that has not finished by the deadline writes every thread's
                        # stack to the log and exits 1, so a stuck shutdown is a diagnosis, not a
                        # daemon that systemd (or a test) has to kill blind.
                        faulthandler.dump_traceback_later(settings.mqtt.stop_deadline_s, exit=True)
                        transport.drain()
                        engine.stop()

                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, leave)
                log.info("serving sessions over MQTT, mode %s (model on %s); Ctrl-C or SIGTERM to hand over and stop", mode, device)
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
        await transport.close()
        faulthandler.cancel_dump_traceback_later()
    return snapshot
