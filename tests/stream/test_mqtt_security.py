"""The daemon and the bridges over TLS with credentials, against a real Mosquitto running the
shipped deploy/mosquitto.conf and deploy/acl (only its listener and paths templated) and a CA
this test makes.

The sessions are kept apart by the broker's ACL, not by our code: these tests are what shows
that the shipped ACL does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from pathlib import Path

import pytest

from cadenza.config.settings import load_settings
from cadenza.errors import BrokerError, ConfigError
from cadenza.harness.mosquitto import MosquittoBroker, make_certificates
from cadenza.messages import note_off, note_on
from cadenza.stream.mqtt.ownership import Status

from .conftest import wait_for
from .test_mqtt import note_ons, running_daemon

aiomqtt = pytest.importorskip("aiomqtt")
pytestmark = pytest.mark.mosquitto

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DAEMON = "cadenza-daemon"  # the daemons' account in deploy/acl


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return make_certificates(folder / "ours"), make_certificates(folder / "strangers")


@pytest.fixture(scope="module")
def passwords():
    return {DAEMON: secrets.token_urlsafe(12), "alice": secrets.token_urlsafe(12), "bob": secrets.token_urlsafe(12)}


def deploy_broker(tmp_path, pki, passwords, *, require_certificate: bool = False) -> MosquittoBroker:
    conf = (DEPLOY / "mosquitto.conf").read_text()
    if require_certificate:
        assert "#require_certificate true" in conf
        conf = conf.replace("#require_certificate true", "require_certificate true")
    return MosquittoBroker(log=tmp_path / "mosquitto.log", conf=conf, tls=pki[0], users=passwords, acl_file=DEPLOY / "acl")


@pytest.fixture()
def broker(tmp_path, pki, passwords):
    with deploy_broker(tmp_path, pki, passwords) as b:
        yield b


def mqtt(broker, pki, **more) -> dict:
    return {"host": "localhost", "port": broker.port, "tls_ca_file": str(pki[0].ca), "connect_timeout_s": 3, **more}


def daemon_settings(broker, pki, tmp_path, passwords):
    secret = tmp_path / "daemon.password"
    secret.write_text(passwords[DAEMON] + "\n")  # as `echo` writes it: the newline is stripped
    return load_settings(
        overrides={
            "mqtt": mqtt(broker, pki, username=DAEMON, password_file=str(secret), reconnect_interval_s=0.2),
            "engine": {"stats_interval_s": 0},
            "velocity": {"deadline_ms": 20.0},
        }
    )


class Port:
    """A bridge's local output port: keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


@contextlib.asynccontextmanager
async def bridge(settings, session: str):
    from cadenza.stream.mqtt.bridge import Bridge

    b = Bridge(settings, session)
    b.port = Port()
    ready = asyncio.Event()
    task = asyncio.create_task(b.run(b.port, ready=lambda _: ready.set()))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raises what stopped it
    assert ready.is_set(), "bridge did not connect"
    try:
        yield b
    finally:
        b.stop()
        await asyncio.wait_for(task, 10)


def test_each_performer_reaches_only_their_own_session(broker, pki, passwords, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    # alice's password from a file, bob's from the environment, as an operator would set them
    (tmp_path / "alice.password").write_text(passwords["alice"])
    alice_settings = load_settings(
        overrides={"mqtt": mqtt(broker, pki, username="alice", password_file=str(tmp_path / "alice.password"), client_id="bridge-alice")}
    )
    with monkeypatch.context() as env:
        env.setenv("CADENZA_MQTT__USERNAME", "bob")
        env.setenv("CADENZA_MQTT__PASSWORD", passwords["bob"])
        bob_settings = load_settings(overrides={"mqtt": mqtt(broker, pki, client_id="bridge-bob")})
    assert bob_settings.mqtt.username == "bob"

    async def main():
        async with (
            running_daemon(daemon_settings(broker, pki, tmp_path, passwords)) as d,
            bridge(alice_settings, "alice") as alice,
            bridge(bob_settings, "bob") as bob,
        ):
            for i in range(12):
                alice.played(note_on(0, 60 + i, 80))
                alice.played(note_off(0, 60 + i))
                await asyncio.sleep(0.03)
            assert await wait_for(lambda: len(note_ons(alice.port.sent)) == 12), alice.port.sent
            vels = [m[2] for m in note_ons(alice.port.sent)]
            assert [m[1] for m in note_ons(alice.port.sent)] == list(range(60, 72))
            assert len(set(vels)) > 1 and all(1 <= v <= 127 for v in vels), vels  # colorized

            # alice, with her own credentials, tries bob's session and the daemons' topics
            tls = ssl.create_default_context(cafile=str(pki[0].ca))
            intruder = aiomqtt.Client("localhost", broker.port, username="alice", password=passwords["alice"], tls_context=tls)
            seen: list[tuple[str, bytes]] = []
            async with intruder:
                for topic in ("cadenza/bob/out", "cadenza/bob/#", "cadenza/#", "cadenza/_daemon/+/status"):
                    await intruder.subscribe(topic)

                async def collect():
                    async for m in intruder.messages:
                        seen.append((m.topic.value, bytes(m.payload)))

                collector = asyncio.create_task(collect())
                await intruder.publish("cadenza/_daemon/fake/status", b"online", qos=1, retain=True)
                await intruder.publish("cadenza/bob/in", note_on(0, 100, 127) + note_off(0, 100), qos=1)
                for i in range(6):
                    bob.played(note_on(3, 40 + i, 70))
                    await asyncio.sleep(0.03)
                await intruder.publish("cadenza/bob/bye", b"", qos=1)  # would release bob's notes
                for i in range(6):
                    bob.played(note_off(3, 40 + i))
                await intruder.publish("cadenza/bob/in", note_on(0, 101, 127), qos=1)
                assert await wait_for(lambda: len(bob.port.sent) >= 12)
                await asyncio.sleep(0.5)  # time for anything that leaked to arrive
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await collector

            # bob's notes only, in order: none of the intruder's, and no release before his note-offs
            assert [m[:2] for m in bob.port.sent] == [bytes([0x93, 40 + i]) for i in range(6)] + [bytes([0x83, 40 + i]) for i in range(6)]
            assert d["engine"].metrics.counters["sessions_ended"] == 0
            topics = {t for t, _ in seen}
            assert not any(t.startswith("cadenza/bob/") for t in topics), topics
            # the daemons' status is readable (the real one, retained), and cannot be forged
            statuses = {t: p for t, p in seen if t.startswith("cadenza/_daemon/")}
            assert [Status.decode(v).state for v in statuses.values()] == ["online"] and "cadenza/_daemon/fake/status" not in statuses, (
                statuses
            )
            assert d["transport"].status_topic in statuses

            alice.played(note_on(0, 50, 80))  # still serving alice
            assert await wait_for(lambda: any(m[:2] == b"\x90\x32" for m in alice.port.sent))

    asyncio.run(main())
    logged = caplog.text + (tmp_path / "mosquitto.log").read_text()
    assert "session 'alice' started" in logged  # the logs were captured at all
    for password in passwords.values():
        assert password not in logged


def test_wrong_password_untrusted_broker_and_missing_password_file_are_one_line(broker, pki, passwords, tmp_path, caplog):
    from cadenza.stream.mqtt.bridge import Bridge

    caplog.set_level(logging.DEBUG)

    def attempt(**more) -> str:
        settings = load_settings(overrides={"mqtt": mqtt(broker, pki, **more)})
        with pytest.raises((BrokerError, ConfigError)) as caught:
            asyncio.run(Bridge(settings, "alice").run(Port()))
        message = str(caught.value)
        assert "\n" not in message and caught.value.__suppress_context__, message
        return message

    wrong = secrets.token_urlsafe(12)
    message = attempt(username="alice", password=wrong)
    assert "refused user 'alice'" in message and "password" in message
    assert "anonymous" in attempt()
    message = attempt(username="alice", password=passwords["alice"], tls_ca_file=str(pki[1].ca))
    assert "certificate of the MQTT broker" in message and "not trusted" in message and "tls_ca_file" in message
    message = attempt(username="alice", password_file=str(tmp_path / "nowhere"))
    assert "mqtt.password_file" in message and "No such file" in message
    for password in (*passwords.values(), wrong):
        assert password not in caplog.text


def test_daemon_shows_a_client_certificate_where_the_broker_requires_one(pki, passwords, tmp_path):
    from cadenza.stream.mqtt.client import connect

    async def main(broker):
        settings = daemon_settings(broker, pki, tmp_path, passwords)
        settings.mqtt.tls_cert_file, settings.mqtt.tls_key_file = pki[0].client_cert, pki[0].client_key
        async with running_daemon(settings) as d:
            assert d["transport"].client is not None  # online, through the certificate check
        # the same credentials without a certificate, and with one from a CA the broker does not know
        for cert, key, why in ((None, None, "wants a client certificate"), (pki[1].client_cert, pki[1].client_key, "does not trust")):
            settings.mqtt.tls_key_file = None
            settings.mqtt.tls_cert_file, settings.mqtt.tls_key_file = cert, key
            settings.mqtt.connect_timeout_s = 1.0
            with pytest.raises(BrokerError) as caught:
                await connect(
                    settings.mqtt, identifier="no-cert", will_topic="cadenza/_daemon/x/status", will_payload=b"", retain_will=True
                )
            assert why in str(caught.value) and "\n" not in str(caught.value), caught.value

    with deploy_broker(tmp_path, pki, passwords, require_certificate=True) as broker:
        asyncio.run(main(broker))


def test_a_broker_hanging_up_inside_tls_is_read_as_a_certificate_refusal(pki):
    """Under TLS 1.3 the broker checks the client certificate after the handshake; when it closes
    the socket before its alert is read, paho sees only an EOF. That is still a certificate
    problem, and the line says which (a race the live test above hits now and then)."""
    from cadenza.config.settings import MqttSettings
    from cadenza.stream.mqtt.client import _refused

    eof = OSError("failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)")
    for cert, why in ((None, "wants a client certificate"), (pki[1].client_cert, "does not trust the client certificate")):
        settings = MqttSettings(port=8883, tls_ca_file=pki[0].ca, tls_cert_file=cert)
        message = _refused(eof, settings, "cadenza/_daemon/x/status", None)
        assert why in message and "mqtt.tls_cert_file" in message and "start one" not in message, message
    # without TLS an EOF is just a broker that went away
    assert "start one" in _refused(eof, MqttSettings(), "t", None)
