"""Several daemons on one broker: real Mosquitto, real daemon processes, real bridges.

Each daemon is ``python -m cadenza serve --transport mqtt`` with its own client id; the bridges
are :class:`~cadenza.stream.mqtt.bridge.Bridge` objects in this process, each playing into a
list that stands where the performer's synth would be (what reached it is what they hear).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from cadenza.config.settings import load_settings
from cadenza.harness.daemons import DaemonProcess, wait_online
from cadenza.harness.mosquitto import MosquittoBroker
from cadenza.harness.mosquitto import flood as mosquitto_flood
from cadenza.messages import note_off, note_on
from cadenza.stream.mqtt.ownership import owner

from .conftest import MqttPeer, sounding, wait_for

aiomqtt = pytest.importorskip("aiomqtt")
pytestmark = pytest.mark.mosquitto

SESSIONS = [f"s{i:02d}" for i in range(12)]
DAEMON_ENV = {"CADENZA_ENGINE__STATS_INTERVAL_S": "0.3", "CADENZA_VELOCITY__DEADLINE_MS": "20"}


@pytest.fixture()
def broker(tmp_path):
    with MosquittoBroker(log=tmp_path / "mosquitto.log") as b:
        yield b


@contextlib.contextmanager
def daemons(broker, tmp_path, *idents, mode="colorize"):
    procs = [DaemonProcess(broker.host, broker.port, i, mode=mode, env=DAEMON_ENV, log=tmp_path / f"{i}.log") for i in idents]
    try:
        for p in procs:
            p.start()
        wait_online(broker.host, broker.port, procs)
        yield {p.ident: p for p in procs}
    finally:
        for p in procs:
            p.stop()


class Peer(MqttPeer):
    """Plays sessions and collects every ``out`` message with its arrival time, and every daemon's stats."""

    topics = ("cadenza/+/out", "cadenza/_daemon/+/stats")

    def __init__(self, broker) -> None:
        super().__init__(broker)
        self.got: dict[str, list[tuple[float, bytes]]] = {}
        self.stats: dict[str, dict] = {}

    async def _collect(self) -> None:
        from cadenza.messages import split_messages

        async for m in self.client.messages:
            parts = m.topic.value.split("/")
            if parts[1] == "_daemon":
                with contextlib.suppress(ValueError):  # a test publishes junk there too
                    self.stats[parts[2]] = json.loads(m.payload)
                continue
            now = time.monotonic()
            self.got.setdefault(parts[1], []).extend((now, d) for d in split_messages(bytes(m.payload)))

    def note_ons(self, session: str, pitch: int | None = None) -> list[float]:
        return [t for t, m in self.got.get(session, []) if m[0] & 0xF0 == 0x90 and m[2] > 0 and (pitch is None or m[1] == pitch)]

    async def served_by(self, idents, timeout: float = 5.0) -> dict[str, list[str]]:
        """Each daemon's sessions, from stats published after now."""
        self.stats.clear()
        assert await wait_for(lambda: all(i in self.stats for i in idents), timeout), f"no stats from {set(idents) - set(self.stats)}"
        return {i: self.stats[i]["sessions"] for i in idents}


async def play_round(peer: Peer, pitch: int) -> None:
    """Every session plays ``pitch`` once; each must be answered exactly once."""
    for s in SESSIONS:
        await peer.play(s, note_on(0, pitch, 80), note_off(0, pitch))
    assert await wait_for(lambda: all(len(peer.note_ons(s, pitch)) >= 1 for s in SESSIONS)), "a session was not answered"
    await asyncio.sleep(0.3)  # a second answer would have come by now
    twice = [s for s in SESSIONS if len(peer.note_ons(s, pitch)) > 1]
    assert not twice, f"answered twice: {twice}"


def test_two_daemons_split_the_sessions_and_a_third_moves_only_its_share(broker, tmp_path):
    async def main(ds):
        async with Peer(broker) as peer:
            await play_round(peer, 60)
            served = await peer.served_by(["d1", "d2"])
            expect = {d: sorted(s for s in SESSIONS if owner(s, {"d1": 1.0, "d2": 1.0}) == d) for d in ("d1", "d2")}
            assert {d: sorted(v) for d, v in served.items()} == expect
            assert expect["d1"] and expect["d2"]  # both take a share

            ds3 = DaemonProcess(broker.host, broker.port, "d3", env=DAEMON_ENV, log=tmp_path / "d3.log").start()
            try:
                await asyncio.to_thread(wait_online, broker.host, broker.port, [ds3])
                three = {"d1": 1.0, "d2": 1.0, "d3": 1.0}
                moved = sorted(s for s in SESSIONS if owner(s, three) == "d3")
                assert moved and len(moved) < len(SESSIONS)
                await play_round(peer, 62)
                served = await peer.served_by(["d1", "d2", "d3"])
                assert sorted(served["d3"]) == moved
                for d in ("d1", "d2"):  # the others kept theirs, minus what moved
                    assert sorted(served[d]) == sorted(set(expect[d]) - set(moved))
                out = sum(peer.stats[d]["counters"].get("sessions_moved_out", 0) for d in ("d1", "d2"))
                assert out == len(moved)
            finally:
                ds3.stop()
        assert all(p.alive for p in ds.values())

    with daemons(broker, tmp_path, "d1", "d2") as ds:
        asyncio.run(main(ds))


class Synth:
    """What a bridge's output port would play."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.got.append(bytes(data))


@contextlib.asynccontextmanager
async def bridges(broker, sessions, **mqtt):
    from cadenza.stream.mqtt.bridge import Bridge

    settings = load_settings(overrides={"mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 1, **mqtt}})
    out = {s: (Bridge(settings, s), Synth()) for s in sessions}
    tasks = [asyncio.create_task(b.run(synth)) for b, synth in out.values()]
    assert await wait_for(lambda: all(b.owner is not None for b, _ in out.values())), "bridges did not learn their owners"
    try:
        yield out
    finally:
        for b, _ in out.values():
            b.stop()
        await asyncio.gather(*tasks)


def test_sigkill_of_a_daemon_mid_chord_moves_its_sessions_and_no_note_hangs(broker, tmp_path):
    async def main(ds):
        async with bridges(broker, SESSIONS[:6]) as bs:
            victims = [s for s in bs if bs[s][0].owner == "d1"]
            keepers = [s for s in bs if bs[s][0].owner == "d2"]
            assert victims and keepers
            chord = (60, 64, 67)
            for bridge, _ in bs.values():
                for p in chord:
                    bridge.played(note_on(0, p, 90))  # held: no note-offs
            assert await wait_for(lambda: all(len(sounding(synth.got)) == 3 for _, synth in bs.values())), "chords not answered"
            t_kill = time.monotonic()
            ds["d1"].kill()
            # the broker publishes d1's will; each bridge of d1's releases what d1 left sounding
            assert await wait_for(lambda: all(sounding(bs[s][1].got) == {} for s in victims), 2.0), "notes left hanging"
            assert all(len(sounding(bs[s][1].got)) == 3 for s in keepers)  # untouched
            assert all(bs[s][0].owner == "d2" for s in victims)
            # the next note of a moved session is answered by d2
            for s in victims:
                bs[s][0].played(note_on(0, 72, 90))
            assert await wait_for(lambda: all(any(m[:2] == b"\x90\x48" for m in bs[s][1].got) for s in victims), 2.0)
            assert time.monotonic() - t_kill < 3.0
            assert all(bs[s][0].counts["failovers"] == 1 for s in victims)
        # the bridges left: nothing sounds anywhere
        assert all(sounding(synth.got) == {} for _, synth in bs.values())
        assert ds["d2"].alive

    with daemons(broker, tmp_path, "d1", "d2") as ds:
        asyncio.run(main(ds))


def test_sigterm_drains_a_daemon_its_notes_released_and_its_sessions_served_by_the_other(broker, tmp_path):
    async def main(ds):
        async with Peer(broker) as peer:
            mine = [s for s in SESSIONS if owner(s, {"d1": 1.0, "d2": 1.0}) == "d1"]
            for s in mine:
                await peer.play(s, note_on(0, 60, 90), note_on(0, 64, 90))  # held
            assert await wait_for(lambda: all(len(peer.note_ons(s)) == 2 for s in mine))
            rc = await asyncio.to_thread(ds["d1"].drain)
            assert rc == 0, ds["d1"].log_tail()
            assert await wait_for(lambda: all(sounding([m for _, m in peer.got[s]]) == {} for s in mine), 2.0)
            for s in mine:
                await peer.play(s, note_on(0, 67, 90), note_off(0, 67))
            assert await wait_for(lambda: all(peer.note_ons(s, 67) for s in mine), 3.0), "not taken over"

    with daemons(broker, tmp_path, "d1", "d2") as ds:
        asyncio.run(main(ds))


def test_a_stop_past_its_deadline_leaves_every_threads_stack_in_the_log_and_exits_1(broker, tmp_path):
    """The guard against a daemon stuck in its stop. With the broker hung (SIGSTOP), the stop's
    final publish waits for an answer that does not come (up to its 3 s timeout, or until the
    keepalive gives the broker up), so a 0.5 s deadline cuts the stop off."""
    env = {**DAEMON_ENV, "CADENZA_MQTT__STOP_DEADLINE_S": "0.5"}
    d = DaemonProcess(broker.host, broker.port, "d1", env=env, log=tmp_path / "d1.log")
    try:
        d.start()
        wait_online(broker.host, broker.port, [d])
        broker.freeze()
        assert d.drain() == 1, d.log_tail()
        log = d.log_tail(100_000)
        assert "Timeout (0:00:00.500000)!" in log and "most recent call first" in log, log[-3000:]
    finally:
        broker.thaw()
        d.stop()


def test_a_flooding_session_loses_its_own_excess_while_the_others_keep_their_time(broker, tmp_path):
    import multiprocessing

    import numpy as np

    async def phase(peer: Peer, base: int, seconds: float) -> list[float]:
        """alice and bob play a note every 50 ms each; publish -> answer latencies."""
        lat = []
        for k in range(int(seconds / 0.05)):
            pitch = base + k % 24
            for s in ("alice", "bob"):
                t = time.monotonic()
                await peer.play(s, note_on(0, pitch, 70), note_off(0, pitch))
                ok = await wait_for(lambda s=s, pitch=pitch, t=t: any(x >= t for x in peer.note_ons(s, pitch)), 2.0)
                assert ok, f"{s}'s note {k} got no answer"
                lat.append(min(x for x in peer.note_ons(s, pitch) if x >= t) - t)
            await asyncio.sleep(0.05)
        return lat

    async def main(flood: multiprocessing.Process):
        async with Peer(broker) as peer:
            quiet = await phase(peer, 36, 2.0)
            flood.start()
            loud = await phase(peer, 60, 3.0)
            flood.join(10)
            await asyncio.sleep(2.0)
            t = time.monotonic()
            await peer.play("carol", note_on(0, 70, 70), note_off(0, 70))  # a fresh session after the flood
            assert await wait_for(lambda: peer.note_ons("carol", 70), 1.0), "no answer to a fresh session after the flood"
            stats = await peer.served_by(["d1"])  # noqa: F841 (fresh stats below)
            return quiet, loud, time.monotonic() - t, peer.stats["d1"]

    names = ["m0", "m1", "m2"]
    flood = multiprocessing.get_context("spawn").Process(
        target=mosquitto_flood, args=(broker.host, broker.port, 3.0, 1000, names), daemon=True
    )
    with daemons(broker, tmp_path, "d1"):
        quiet, loud, _, stats = asyncio.run(main(flood))
    q99, l99 = float(np.percentile(quiet, 99)), float(np.percentile(loud, 99))
    c = stats["counters"]
    assert c.get("dropped_rate_limit", 0) + c.get("dropped_rate_limit_payloads", 0) > 0, c  # the flood lost its excess
    # Every note of alice's and bob's was answered (phase() asserts it); the flood added less
    # than a note's deadline (velocity.deadline_ms in DAEMON_ENV) to their round trip's p99.
    assert l99 - q99 < 0.020, f"p99 {q99 * 1e3:.1f} ms quiet, {l99 * 1e3:.1f} ms under the flood"


def test_a_bridge_whose_broker_goes_away_releases_its_notes_and_plays_again_when_it_is_back(tmp_path):
    from cadenza.harness.mosquitto import free_port

    port = free_port()
    broker = MosquittoBroker(port, log=tmp_path / "m1.log").start()

    async def main(ds):
        nonlocal broker
        async with bridges(broker, ["alice"]) as bs:
            bridge, synth = bs["alice"]
            bridge.played(note_on(0, 60, 90))
            assert await wait_for(lambda: len(sounding(synth.got)) == 1), "no answer"
            broker.stop()
            assert await wait_for(lambda: sounding(synth.got) == {}, 5.0), "a note hangs with the broker gone"
            assert bridge.counts["disconnects"] == 1
            broker = MosquittoBroker(port, log=tmp_path / "m2.log").start()
            assert await wait_for(lambda: bridge.client is not None and bridge.owner == "d1", 15.0), "bridge not back"
            n = len(synth.got)
            for _ in range(50):  # the daemon reconnects on its own schedule: play until answered
                bridge.played(note_on(0, 62, 90))
                bridge.played(note_off(0, 62))
                if await wait_for(lambda: any(m[:2] == b"\x90\x3e" for m in synth.got[n:]), 0.3):
                    break
            assert any(m[:2] == b"\x90\x3e" for m in synth.got[n:]), "no answer after the broker came back"

    try:
        with daemons(broker, tmp_path, "d1") as ds:
            asyncio.run(main(ds))
    finally:
        broker.stop()


def test_malformed_and_oversized_payloads_on_every_topic_are_dropped_and_nothing_breaks(broker, tmp_path):
    import random

    async def main(ds):
        rng = random.Random(5)
        junk = [b"", b"\x00", bytes(rng.randrange(256) for _ in range(3000)), b'{"state": "online", "capacity": "lots"}', b"\xff" * 300_000]
        async with bridges(broker, ["alice"]) as bs, Peer(broker) as peer:
            bridge, synth = bs["alice"]
            for payload in junk:
                for topic in (
                    "cadenza/alice/in",
                    "cadenza/alice/out",
                    "cadenza/alice/bye",
                    "cadenza/_daemon/x/status",
                    "cadenza/_daemon/d1/stats",
                    "cadenza/a/b/c/in",
                ):
                    await peer.client.publish(topic, payload)
            await peer.client.publish("cadenza/_daemon/x/status", b"", retain=True)  # clear the retained junk
            await asyncio.sleep(0.5)
            assert bridge.owner == "d1" and ds["d1"].alive  # nobody took junk for a daemon
            n = len(synth.got)
            bridge.played(note_on(0, 64, 90))
            bridge.played(note_off(0, 64))
            assert await wait_for(lambda: any(m[:2] == b"\x90\x40" for m in synth.got[n:])), "no answer after the junk"
            assert bridge.counts["dropped_malformed"] > 0

    with daemons(broker, tmp_path, "d1") as ds:
        asyncio.run(main(ds))


def test_a_status_left_behind_by_a_dead_daemon_does_not_keep_its_sessions_unanswered(broker, tmp_path):
    """A daemon that died while the broker was down gets no will: its retained "online" stays.
    An old one is stale at once; a fresh one that is never repeated expires after 3 intervals."""
    import aiomqtt as mq

    from cadenza.stream.mqtt.ownership import Status

    async def plant(ident: str, at: float) -> None:
        async with mq.Client(broker.host, broker.port) as c:
            await c.publish(f"cadenza/_daemon/{ident}/status", Status("online", 1.0, at).encode(), qos=1, retain=True)

    old_ghost = [s for s in SESSIONS if owner(s, {"d1": 1.0, "old": 1.0}) == "old"]
    new_ghost = [s for s in SESSIONS if owner(s, {"d1": 1.0, "new": 1.0}) == "new"]
    assert old_ghost and new_ghost
    asyncio.run(plant("old", time.time() - 3600))
    env = {**DAEMON_ENV, "CADENZA_MQTT__STATUS_INTERVAL_S": "0.5"}

    async def main():
        async with Peer(broker) as peer:
            for s in old_ghost:  # the hour-old status is no daemon: d1 answers at once
                await peer.play(s, note_on(0, 60, 80), note_off(0, 60))
            assert await wait_for(lambda: all(peer.note_ons(s, 60) for s in old_ghost), 3.0)
            await plant("new", time.time())  # a fresh status nobody repeats
            async with bridges(broker, new_ghost[:1], status_interval_s=0.5) as bs:
                bridge, synth = bs[new_ghost[0]]
                assert await wait_for(lambda: bridge.owner == "new", 1.0), bridge.owner  # the fresh status counts
                assert await wait_for(lambda: bridge.owner == "d1", 3.0), "the bridge still follows the silent daemon"
                await asyncio.sleep(0.5)  # d1 drops it on its own timer (every 0.5 s here)
                bridge.played(note_on(0, 62, 80))
                assert await wait_for(lambda: any(m[:2] == b"\x90\x3e" for m in synth.got), 3.0), "d1 did not take it over"

    procs = [DaemonProcess(broker.host, broker.port, "d1", env=env, log=tmp_path / "d1.log").start()]
    try:
        wait_online(broker.host, broker.port, procs)
        asyncio.run(main())
    finally:
        procs[0].stop()
