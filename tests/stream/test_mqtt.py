"""The headless daemon over MQTT, against a real Mosquitto broker (and real JACK for the bridge).

Each test runs the daemon (`serve_mqtt`, the shipped causal model inline) on its own event loop
with a plain aiomqtt client playing the performers' side.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from cadenza.config.settings import load_settings
from cadenza.harness.mosquitto import MosquittoBroker, free_port
from cadenza.messages import control, note_off, note_on, pitch_bend

from .conftest import Listener, Player, sounding
from .conftest import MqttPeer as Peer

aiomqtt = pytest.importorskip("aiomqtt")
pytestmark = pytest.mark.mosquitto


@pytest.fixture()
def broker(tmp_path):
    with MosquittoBroker(log=tmp_path / "mosquitto.log") as b:
        yield b


def daemon_settings(broker, **mqtt):
    return load_settings(
        overrides={
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_interval_s": 0.2, **mqtt},
            "engine": {"stats_interval_s": 0},
            # these tests check what comes out, not how fast, on a busy CI machine
            "velocity": {"deadline_ms": 20.0},
        }
    )


@contextlib.asynccontextmanager
async def running_daemon(settings, mode: str = "colorize"):
    from cadenza.stream.mqtt.daemon import serve_mqtt

    box: dict = {}
    started = asyncio.Event()

    def ready(engine, transport):
        box.update(engine=engine, transport=transport)
        started.set()

    task = asyncio.create_task(serve_mqtt(settings, mode=mode, ready=ready, install_signals=False))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises what stopped it
    assert started.is_set(), "daemon did not start"
    box["task"] = task
    try:
        yield box
    finally:
        if not task.done():
            box["engine"].stop()
        box["snapshot"] = await asyncio.wait_for(task, 20)


def note_ons(msgs):
    return [m for m in msgs if m[0] & 0xF0 == 0x90 and m[2] > 0]


def test_sessions_are_colorized_and_answered_on_their_own_topic(broker):
    async def main():
        async with running_daemon(daemon_settings(broker)) as d, Peer(broker) as peer:
            sent = {"alice": [], "bob": []}
            for i in range(16):
                for session, base, ch in (("alice", 60, 0), ("bob", 40, 3)):
                    msgs = [note_on(ch, base + (i * 5) % 12, 80)]
                    if i == 5:
                        msgs.append(control(ch, 64, 127))  # pedal down
                    if i == 9:
                        msgs.append(pitch_bend(ch, 80 << 7))
                    msgs.append(note_off(ch, base + (i * 5) % 12))
                    sent[session].extend(msgs)
                    await peer.play(session, *msgs)
                await asyncio.sleep(0.03 + 0.02 * (i % 3))
            assert await peer.wait_for(lambda: all(len(peer.out(s)) >= len(sent[s]) for s in sent))
            for session, msgs in sent.items():
                out = peer.out(session)[: len(msgs)]
                # same messages in the same order; only note-on velocities changed
                assert [(m[0], m[1]) for m in out] == [(m[0], m[1]) for m in msgs]
                assert [m for m in out if m[0] & 0xF0 != 0x90] == [m for m in msgs if m[0] & 0xF0 != 0x90]
                vels = [m[2] for m in note_ons(out)]
                assert all(1 <= v <= 127 for v in vels) and len(set(vels)) > 3, vels
                assert all(m[0] & 0x0F == msgs[0][0] & 0x0F for m in out)  # nothing of the other session
            assert d["engine"].metrics.counters["deadline_miss"] == 0

    asyncio.run(main())


def test_bad_payloads_are_dropped_and_counted_and_a_burst_leaves_nothing_stuck(broker):
    settings = daemon_settings(broker, max_payload_bytes=100_000)

    async def main():
        async with running_daemon(settings) as d, Peer(broker) as peer:
            rng = random.Random(7)
            await peer.play("alice", bytes(rng.randrange(256) for _ in range(2000)))  # noise
            await peer.play("alice", b"\x90\x3c")  # truncated note-on
            await peer.play("alice", b"\x40\x40\x40")  # data bytes without status
            await peer.play("alice", b"\xf0" + b"\x01" * 65534 + b"\xf7")  # 64 KiB SysEx, over sysex_max
            await peer.play("alice", b"\x90\x3c\x40" * 40_000)  # payload over max_payload_bytes
            await peer.client.publish("cadenza/_reserved/in", b"\x90\x3c\x40")  # not a session name
            # a burst of 10,000 messages in one packet: 5,000 notes on and off
            burst = b"".join(note_on(0, 36 + i % 60, 90) + note_off(0, 36 + i % 60) for i in range(5000))
            await peer.play("bob", burst)
            await asyncio.sleep(0.5)
            await peer.play("alice", b"\x90\x45\x50", b"\x80\x45\x00")
            assert await peer.wait_for(lambda: any(m[:2] == b"\x80\x45" for m in peer.out("alice")), 20)
            c = d["engine"].metrics.counters
            # what is over bob's rate (mqtt.session_burst_msgs at once) is dropped and counted;
            # the rest is answered, and what it left sounding is released
            assert await peer.wait_for(lambda: len(peer.out("bob")) >= 10_000 - c["dropped_queue_full"] - c["dropped_rate_limit"], 20)
            assert 0 < c["dropped_rate_limit"] <= 10_000 - settings.mqtt.session_burst_msgs, c
            assert c["dropped_malformed"] >= 3 and c["dropped_payload_size"] == 1 and c["dropped_session"] == 1, c
            assert await peer.wait_for(lambda: sounding(peer.out("bob")) == {})  # every note of the burst released
            assert d["task"].done() is False  # still serving
            # the noise held notes on (random note-ons are still notes): leaving releases them
            await peer.client.publish("cadenza/alice/bye", b"", qos=1)
            assert await peer.wait_for(lambda: sounding(peer.out("alice")) == {})

    asyncio.run(main())


def test_bye_releases_only_that_sessions_notes_and_shutdown_releases_the_rest(broker):
    async def main():
        async with running_daemon(daemon_settings(broker)) as d, Peer(broker) as peer:
            await peer.play("alice", b"\x90\x3c\x50", b"\x90\x40\x50", b"\x90\x43\x50")
            await peer.play("bob", b"\x91\x30\x50", b"\x91\x37\x50")
            assert await peer.wait_for(lambda: len(note_ons(peer.out("alice"))) == 3 and len(note_ons(peer.out("bob"))) == 2)
            await peer.client.publish("cadenza/alice/bye", b"", qos=1)
            assert await peer.wait_for(lambda: sounding(peer.out("alice")) == {})
            await asyncio.sleep(0.2)
            assert len(sounding(peer.out("bob"))) == 2  # untouched
            assert d["engine"].metrics.counters["sessions_ended"] == 1
            d["engine"].stop()  # shutdown in the middle of bob's chord
            await asyncio.wait_for(asyncio.shield(d["task"]), 20)
            assert await peer.wait_for(lambda: sounding(peer.out("bob")) == {})

    asyncio.run(main())


def test_session_limit_and_idle_sessions(broker):
    settings = daemon_settings(broker, max_sessions=2, session_idle_s=0.5)

    async def main():
        async with running_daemon(settings) as d, Peer(broker) as peer:
            for s in ("a", "b", "c"):
                await peer.play(s, b"\x90\x3c\x50")
            assert await peer.wait_for(lambda: len(note_ons(peer.out("a"))) == 1 and len(note_ons(peer.out("b"))) == 1)
            c = d["engine"].metrics.counters
            assert c["dropped_session"] == 1 and peer.out("c") == []
            # nobody plays: after 0.5 s both sessions end and their held notes are released
            assert await peer.wait_for(lambda: sounding(peer.out("a")) == {} and sounding(peer.out("b")) == {}, 5)
            assert await peer.wait_for(lambda: d["engine"].metrics.counters["sessions_ended"] == 2)
            await peer.play("c", b"\x90\x3c\x50")  # a place is free again
            assert await peer.wait_for(lambda: len(note_ons(peer.out("c"))) == 1)

    asyncio.run(main())


def test_daemon_survives_a_broker_restart(tmp_path):
    port = free_port()
    broker = MosquittoBroker(port, log=tmp_path / "m1.log").start()

    async def main():
        nonlocal broker
        async with running_daemon(daemon_settings(broker)) as d:
            async with Peer(broker) as peer:
                await peer.play("alice", b"\x90\x3c\x50")
                assert await peer.wait_for(lambda: len(note_ons(peer.out("alice"))) == 1)
            broker.stop()
            await asyncio.sleep(0.5)
            broker = MosquittoBroker(port, log=tmp_path / "m2.log").start()
            async with Peer(broker) as peer:
                # back: the note left sounding when the broker went away is released on reconnect
                assert await peer.wait_for(lambda: sounding(peer.out("alice")) == {} and peer.out("alice") != [], 10)
                await peer.play("alice", b"\x90\x40\x50", b"\x80\x40\x00")
                assert await peer.wait_for(lambda: any(m[:2] == b"\x80\x40" for m in peer.out("alice")))
            assert d["engine"].metrics.counters["mqtt_disconnects"] >= 1

    try:
        asyncio.run(main())
    finally:
        broker.stop()


def test_unreachable_broker_is_one_line():
    import io
    import sys

    from cadenza.cli import main

    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        rc = main(["--log-level", "error", "serve", "--transport", "mqtt", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(free_port())])
    finally:
        sys.stderr = old
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "cannot reach the MQTT broker" in lines[0], lines


@pytest.mark.jack
def test_bridge_plays_through_the_daemon_and_releases_its_notes_when_it_stops(broker, jack_server):
    from cadenza.stream.mqtt.bridge import run_bridge

    bridge_settings = load_settings(overrides={"midi": {"api": "jack"}, "mqtt": {"host": broker.host, "port": broker.port}})

    async def main():
        async with running_daemon(daemon_settings(broker)) as d:
            box = {}
            ready = asyncio.Event()
            task = asyncio.create_task(
                run_bridge(bridge_settings, "stage-left", ready=lambda b: (box.update(b=b), ready.set()), install_signals=False)
            )
            await asyncio.wait_for(ready.wait(), 20)
            player, listener = Player("cadenza in"), Listener("cadenza out")
            try:
                for i in range(8):
                    player.send(note_on(0, 60 + 2 * i, 70), note_off(0, 60 + 2 * i))
                    await asyncio.sleep(0.05)
                player.send(b"\x90\x30\x46", b"\x90\x34\x46", b"\x90\x37\x46")  # a held chord
                ok = await asyncio.to_thread(listener.wait_for, lambda ms: len(note_ons(ms)) == 11, 10)
                assert ok, listener.messages()
                vels = [m[2] for m in note_ons(listener.messages())]
                assert len(set(vels)) > 2 and all(1 <= v <= 127 for v in vels)
                assert len(sounding(listener.messages())) == 3
                box["b"].stop()  # the bridge leaves mid-chord
                counts = await asyncio.wait_for(task, 10)
                assert await asyncio.to_thread(listener.wait_for, lambda ms: sounding(ms) == {}, 5)
                assert counts["in"] == 19 and counts["out"] >= 19
                # its bye reached the daemon: the session is gone there too
                for _ in range(100):
                    if d["engine"].metrics.counters["sessions_ended"] == 1:
                        break
                    await asyncio.sleep(0.02)
                assert d["engine"].metrics.counters["sessions_ended"] == 1
            finally:
                player.close()
                listener.close()

    asyncio.run(main())


def test_the_daemon_serves_prometheus_metrics(broker):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    settings = daemon_settings(broker)
    settings.metrics.prometheus_port = port

    async def main():
        async with running_daemon(settings), Peer(broker) as peer:
            await peer.play("alice", b"\x90\x3c\x50", b"\x80\x3c\x00")
            assert await peer.wait_for(lambda: len(peer.out("alice")) == 2)
            url = f"http://127.0.0.1:{port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    text = asyncio.run(main())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {f.name: f.samples[0].value for f in families.values() if f.samples}
    assert value["cadenza_sessions"] == 1 and families["cadenza_ownership_changes"].type == "counter"
    assert families["cadenza_internal_seconds"].type == "histogram"
    info = families["cadenza_info"].samples[0].labels
    assert info["role"] == "daemon" and info["mode"] == "colorize"


@pytest.mark.parametrize("mode", ["continue", "vary", "lookahead"])
def test_every_mode_answers_two_sessions_at_once_each_on_its_own_topic(broker, mode):
    """Call and response, vary and lookahead over MQTT: each session its own state and answers."""
    settings = daemon_settings(broker)
    settings.phrase.silence_ms = 300
    settings.phrase.length_mode = "seconds"
    settings.phrase.response_seconds = 1.5
    settings.engine.bpm = 240.0  # vary: a 2-bar loop is 2 s
    settings.controls.state_out_cc = None
    settings.velocity.lookahead_s = 0.5

    async def main():
        async with running_daemon(settings, mode) as d, Peer(broker) as peer:
            loop = (60, 62, 64, 65, 67, 65, 64, 62)
            for i in range(24 if mode == "vary" else 10):  # eighth notes at 240 bpm, or a short phrase
                for session, ch, shift in (("alice", 0, 0), ("bob", 2, -12)):
                    p = loop[i % 8] + shift
                    await peer.play(session, note_on(ch, p, 80))
                    await peer.play(session, note_off(ch, p))
                await asyncio.sleep(0.125)
            played = {"alice": 0, "bob": 2}

            def answered(s):  # notes on the channel the mode answers on, beyond what was played
                ons = note_ons(peer.out(s))
                if mode == "vary":
                    return [m for m in ons if m[0] & 0x0F == settings.vary.out_channel]
                if mode == "lookahead":
                    return ons
                return ons[24 if mode == "vary" else 10 :]

            assert await peer.wait_for(lambda: all(answered(s) for s in played), 15), {s: len(peer.out(s)) for s in played}
            for s, ch in played.items():
                if mode == "continue":  # the answer is on the session's own channel, after its phrase
                    assert all(m[0] & 0x0F == ch for m in answered(s))
            await asyncio.sleep(0.5)
            d["engine"].stop()
            await asyncio.wait_for(asyncio.shield(d["task"]), 20)
            assert await peer.wait_for(lambda: all(sounding(peer.out(s)) == {} for s in played))

    asyncio.run(main())
