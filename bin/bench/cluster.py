"""`cadenza bench mqtt --daemons N`: several daemons behind one broker, and a daemon's death.

A private Mosquitto, N daemons as separate processes (client ids ``bench-d0`` …, a 1 s
keepalive), and S sessions, each a real :class:`~cadenza.stream.mqtt.bridge.Bridge` in this
process playing the `bench latency` pattern (a different seed per session) into a list that
stands where its synth would be. Reported:

* ``sessions_per_daemon``: who owns what (rendezvous hashing over the live set);
* publish -> answer latency (``played()`` on the bridge -> the answer at its synth) p50/p99;
* ``answered_twice``: answers beyond one per note-on played (two daemons answering a session);
* ``deadline_misses`` and ``dropped`` from the daemons' own stats;

and with ``--kill-one``, SIGKILL of the daemon with the most sessions halfway through (its
connection closes, the broker publishes its will at once), or with ``--freeze-one``, SIGSTOP of it
(its connection stays open and silent, as when a box loses power or network: the broker waits
out 1.5 keepalives, 1 s each here):

* ``failover_s``: its death -> the first answer to a note played on one of its sessions after it;
* ``lost_in_failover``: note-ons played on its sessions after its death that were never answered;
* ``stuck_notes``: notes still sounding at any synth once the playing is over (before the
  bridges leave, which would release them anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

from cadenza.buffers.ledger import NoteLedger


class _Synth:
    """A bridge's output: every message with its arrival time."""

    def __init__(self) -> None:
        self.got: list[tuple[float, bytes]] = []

    def send(self, data: bytes) -> None:
        self.got.append((time.monotonic(), bytes(data)))


def _stuck(messages) -> int:
    """Notes a message stream leaves sounding, by the engine's own ledger."""
    ledger = NoteLedger()
    for m in messages:
        ledger.track(m)
    return ledger.sounding


async def _stats_listener(host: str, port: int, into: dict) -> None:
    import aiomqtt

    async with aiomqtt.Client(host, port) as c:
        await c.subscribe("cadenza/_daemon/+/stats")
        async for m in c.messages:
            with contextlib.suppress(ValueError):
                into[m.topic.value.split("/")[2]] = json.loads(m.payload)


async def _run(args, host: str, port: int, daemons: list) -> dict:
    from cadenza.bench.latency import _stats_ms, pattern
    from cadenza.config.settings import load_settings
    from cadenza.stream.mqtt.bridge import Bridge

    settings = load_settings(overrides={"mqtt": {"host": host, "port": port, "keepalive_s": 1}})
    names = [f"bench{i:02d}" for i in range(args.sessions)]
    plays = {s: pattern(args.seconds, args.rate, seed=i) for i, s in enumerate(names)}
    bridges = {s: (Bridge(settings, s), _Synth()) for s in names}
    stats: dict[str, dict] = {}
    stats_task = asyncio.create_task(_stats_listener(host, port, stats))
    tasks = [asyncio.create_task(b.run(synth)) for b, synth in bridges.values()]
    end = time.monotonic() + 20
    while not all(b.owner is not None for b, _ in bridges.values()):
        if time.monotonic() > end:
            raise RuntimeError("bench: the bridges did not learn their owners")
        await asyncio.sleep(0.05)
    owners = {s: b.owner for s, (b, _) in bridges.items()}
    per_daemon = Counter(owners.values())
    victim = per_daemon.most_common(1)[0][0] if args.kill_one or args.freeze_one else None
    victim_proc = next((d for d in daemons if d.ident == victim), None)
    moved = {s for s, o in owners.items() if o == victim}

    sent: dict[tuple[str, int], deque] = defaultdict(deque)
    played_on: list[tuple[float, str, int]] = []  # note-ons played: (time, session, pitch)
    merged = sorted((t, s, m) for s, events in plays.items() for t, m in events)
    t0 = time.monotonic() + 0.2
    t_kill = None
    for at, s, msg in merged:
        if victim_proc is not None and t_kill is None and at >= args.seconds / 2:
            victim_proc.freeze() if args.freeze_one else victim_proc.kill()
            t_kill = time.monotonic()
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        if msg[0] & 0xF0 == 0x90 and msg[2] > 0:
            sent[(s, msg[1])].append(now)
            played_on.append((now, s, msg[1]))
        bridges[s][0].played(msg)
    await asyncio.sleep(1.5)  # the last answers, and the daemons' next stats

    latencies: list[float] = []
    answered_twice = 0
    answered: set[tuple[str, int, float]] = set()
    for s, (_, synth) in bridges.items():
        answers = defaultdict(list)
        for t, m in synth.got:
            if len(m) == 3 and m[0] & 0xF0 == 0x90 and m[2] > 0:
                answers[m[1]].append(t)
        for pitch, times in answers.items():
            q = deque(sorted(sent.get((s, pitch), ())))
            for t in sorted(times):
                while q and t - q[0] > 1.0:
                    q.popleft()  # played over a second before: never answered (lost in a failover)
                if q and q[0] <= t:
                    played = q.popleft()
                    latencies.append(t - played)
                    answered.add((s, pitch, played))
                else:
                    answered_twice += 1  # no note-on left for it: a second answer
    stuck = sum(_stuck(m for _, m in synth.got) for _, synth in bridges.values())
    result = {
        "daemons": len(daemons),
        "sessions": args.sessions,
        "note_ons": len(played_on),
        "sessions_per_daemon": dict(sorted(per_daemon.items())),
        "publish_to_answer": _stats_ms(latencies),
        "answered_twice": answered_twice,
        "stuck_notes": stuck,
        "deadline_misses": sum(st["counters"].get("deadline_miss", 0) for st in stats.values()),
        "dropped": sum(st["counters"].get("dropped", 0) for st in stats.values()),
        "unanswered": len(played_on) - len(answered),
    }
    if t_kill is not None:
        after = [(t, s, p) for t, s, p in played_on if s in moved and t >= t_kill]
        first = min(
            (t for s in moved for t, m in bridges[s][1].got if t > t_kill and len(m) == 3 and m[0] & 0xF0 == 0x90 and m[2] > 0),
            default=None,
        )
        result.update(
            killed=victim,
            how="SIGSTOP" if args.freeze_one else "SIGKILL",
            moved_sessions=len(moved),
            failover_s=None if first is None else round(first - t_kill, 3),
            lost_in_failover=sum(1 for t, s, p in after if (s, p, t) not in answered),
            bridge_failovers=sum(bridges[s][0].counts["failovers"] for s in moved),
        )
    for b, _ in bridges.values():
        b.stop()
    await asyncio.gather(*tasks)
    stats_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await stats_task
    return result


def bench_cluster(args, settings) -> int:
    from cadenza.harness.daemons import DaemonProcess, wait_online
    from cadenza.harness.mosquitto import MosquittoBroker

    logs = Path(args.logs) if args.logs else None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(log=logs / "mosquitto.log" if logs else None).start() if args.broker == "own" else None
    host, port = (broker.host, broker.port) if broker else (settings.mqtt.host, settings.mqtt.port)
    env = {"CADENZA_ENGINE__STATS_INTERVAL_S": "0.5"}
    daemons = [
        DaemonProcess(host, port, f"bench-d{i}", env=env, log=logs / f"bench-d{i}.log" if logs else None) for i in range(args.daemons)
    ]
    try:
        for d in daemons:
            d.start()
        wait_online(host, port, daemons)
        result = asyncio.run(_run(args, host, port, daemons))
    finally:
        for d in daemons:
            d.stop()
        if broker is not None:
            broker.stop()
    if args.json:
        print(json.dumps(result))
        return 0
    lat = result["publish_to_answer"]
    print(f"{result['daemons']} daemons, {result['sessions']} sessions, {result['note_ons']} note-ons through MQTT at {host}:{port}")
    print(f"  sessions per daemon {result['sessions_per_daemon']}")
    print(f"  publish -> answer p50 {lat.get('p50_ms', float('nan')):.3f}  p99 {lat.get('p99_ms', float('nan')):.3f} ms")
    print(
        f"  answered twice {result['answered_twice']}, unanswered {result['unanswered']}, stuck notes {result['stuck_notes']}, "
        f"deadline misses {result['deadline_misses']}, dropped {result['dropped']}"
    )
    if "killed" in result:
        print(
            f"  {result['how']} to {result['killed']} ({result['moved_sessions']} sessions): failover {result['failover_s']} s, "
            f"{result['lost_in_failover']} note-ons lost in it"
        )
    return 0
