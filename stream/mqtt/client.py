"""MQTT client plumbing shared by the daemon and the bridge: connecting (one-line errors,
TCP_NODELAY), arrival stamps, session names, and the coalescing outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections import deque
from typing import Any

from cadenza.config.settings import MqttSettings
from cadenza.errors import BrokerError, ConfigError

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

    latest: _StampingQueue | None = None

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


async def connect(
    settings: MqttSettings, *, identifier: str, will_topic: str, will_payload: bytes, retain_will: bool
) -> tuple[Any, contextlib.AsyncExitStack]:
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
    except (TimeoutError, aiomqtt.MqttError, OSError) as exc:
        await stack.aclose()
        reason = str(exc) or type(exc).__name__
        raise BrokerError(
            f"cannot reach the MQTT broker at {settings.host}:{settings.port} ({reason}); start one (e.g. `mosquitto -p {settings.port}`) or set mqtt.host / mqtt.port"
        ) from None
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
