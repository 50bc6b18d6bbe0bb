"""MQTT client plumbing shared by the daemon and the bridge: connecting (TLS, credentials,
one-line errors, TCP_NODELAY), arrival stamps, session names, and the coalescing outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
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


def _password(settings: MqttSettings) -> str | None:
    """The broker password: mqtt.password_file, read now (so a rotated file is picked up at the
    next connect), or mqtt.password. Never logged, never in an error message."""
    path = settings.password_file
    if path is None:
        return settings.password.get_secret_value() if settings.password is not None else None
    try:
        password = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"cannot read mqtt.password_file {str(path)!r} ({reason})") from None
    if not password:
        raise ConfigError(f"mqtt.password_file {str(path)!r} is empty")
    return password


def _tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """TLS when mqtt.tls_ca_file is set: the broker's certificate must chain to that CA and name
    mqtt.host; a client certificate is shown if one is configured. Loaded at each connect, so
    renewed certificates are picked up without a restart."""
    if settings.tls_ca_file is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(settings.tls_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load mqtt.tls_ca_file {str(settings.tls_ca_file)!r} ({_reason(exc)})") from None
    if settings.tls_cert_file is not None:
        key = settings.tls_key_file
        try:
            context.load_cert_chain(str(settings.tls_cert_file), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as exc:
            what = f"{str(settings.tls_cert_file)!r}" + (f" with its key {str(key)!r}" if key is not None else "")
            hint = "; if its key is in another file, set mqtt.tls_key_file" if key is None else ""
            raise ConfigError(f"cannot load the client certificate mqtt.tls_cert_file {what} ({_reason(exc)}){hint}") from None
    return context


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


class _LoggedFailure(logging.Handler):
    """The last error paho logs while connecting. Under TLS 1.3 a broker that rejects our client
    certificate (or wants one) says so only after the handshake; paho logs the alert and aiomqtt
    keeps waiting for a CONNACK, so without this the reason would be a bare timeout."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


def _refused(exc: BaseException, settings: MqttSettings, will_topic: str, logged: str | None) -> str:
    """One line saying why the broker could not be used, and what to change."""
    where = f"{settings.host}:{settings.port}"
    code = getattr(getattr(exc, "rc", None), "value", getattr(exc, "rc", None))
    user = settings.username
    if code in (4, 5, 134, 135) and user is None:  # MQTT 3.1.1 / 5 refusals
        return f"the MQTT broker at {where} does not let anonymous clients in: set mqtt.username and a password"
    if code in (4, 134):
        return f"the MQTT broker at {where} refused user {user!r}: wrong user name or password"
    if code in (5, 135):  # Mosquitto says "not authorized" for a wrong password too
        return (
            f"the MQTT broker at {where} refused user {user!r} (not authorized): wrong user name or password, "
            f"or its ACL does not let this user set its will on {will_topic!r}"
        )
    reason = logged if isinstance(exc, TimeoutError) and logged else _reason(exc)
    if settings.tls_ca_file is not None and "EOF occurred in violation of protocol" in reason:
        # The broker hung up inside the TLS session before any MQTT: it checked our client
        # certificate (TLS 1.3 does so after the handshake) and closed before its alert was read.
        why = "does not trust the client certificate" if settings.tls_cert_file else "wants a client certificate"
        return (
            f"TLS with the MQTT broker at {where} failed ({reason}); the broker closed the session: it probably {why} (mqtt.tls_cert_file)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        why = reason.split("] ")[-1]
        return f"TLS: the certificate of the MQTT broker at {where} is not trusted ({why}); check mqtt.tls_ca_file and mqtt.host"
    if "SSL" in reason or "TLS" in reason:
        hints = {
            "WRONG_VERSION_NUMBER": "; is that port a TLS listener (usually 8883)?",
            "CERTIFICATE_REQUIRED": "; the broker wants a client certificate (mqtt.tls_cert_file)",
            "UNKNOWN_CA": "; the broker does not trust the client certificate (mqtt.tls_cert_file)",
        }
        hint = next((h for k, h in hints.items() if k in reason), "")
        return f"TLS with the MQTT broker at {where} failed ({reason}){hint}"
    hint = " or set mqtt.tls_ca_file if it only speaks TLS" if settings.tls_ca_file is None else ""
    return f"cannot reach the MQTT broker at {where} ({reason}); start one (e.g. `mosquitto -p {settings.port}`) or set mqtt.host / mqtt.port{hint}"


async def connect(
    settings: MqttSettings, *, identifier: str, will_topic: str, will_payload: bytes, retain_will: bool
) -> tuple[Any, contextlib.AsyncExitStack]:
    """An open aiomqtt client (and the stack that closes it). TLS and credentials come from
    ``settings``. BrokerError in one line if the broker does not answer within
    ``connect_timeout_s``, refuses the credentials or its certificate is not trusted;
    ConfigError if a password or TLS file cannot be read. ``client.incoming`` is its queue of
    received messages."""
    aiomqtt = _aiomqtt()

    class Incoming(_StampingQueue):
        pass

    client_log = logging.getLogger("cadenza.mqtt.client")
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        identifier=identifier,
        username=settings.username,
        password=_password(settings),
        keepalive=settings.keepalive_s,
        timeout=settings.connect_timeout_s,
        will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=retain_will),
        logger=client_log,
        socket_options=NODELAY,
        queue_type=Incoming,
        tls_context=_tls_context(settings),
    )
    client.incoming = Incoming.latest
    stack = contextlib.AsyncExitStack()
    logged = _LoggedFailure()
    client_log.addHandler(logged)
    try:
        await asyncio.wait_for(stack.enter_async_context(client), settings.connect_timeout_s)
    except (TimeoutError, aiomqtt.MqttError, OSError) as exc:
        await stack.aclose()
        raise BrokerError(_refused(exc, settings, will_topic, logged.message)) from None
    finally:
        client_log.removeHandler(logged)
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
