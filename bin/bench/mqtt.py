"""`cadenza bench mqtt`: the headless daemon's round trip through a real broker.

(With ``--daemons N``: several daemons and a failover, in :mod:`cadenza.bench.cluster`.)

A private Mosquitto on loopback (or the configured broker with ``--broker configured``), then
two passes of the same playing, each from one client that plays ``--sessions`` performers at
once (the `bench latency` pattern, a different seed per session):

1. baseline: a plain relay process that republishes every ``SESSION/in`` payload unchanged to
   ``SESSION/out`` — the broker's two hops and an asyncio MQTT client, nothing of ours;
2. service: ``cadenza serve --transport mqtt`` in its own process, the causal model on.

Per message, latency is publish → arrival of the answer (matched first-in first-out per
session, status and key, since note-on velocities are rewritten). ``added`` is the difference of
the two passes; the daemon's own internal latency comes from its metrics.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import time
from collections import defaultdict, deque

from cadenza.errors import BrokerError
from cadenza.stream.mqtt.client import NODELAY


def register(b) -> None:
    p = b.add_parser("mqtt", help="round trip of the headless daemon through an MQTT broker, next to a plain relay")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each pass (default 10)")
    p.add_argument("--sessions", type=int, default=4, help="performers playing at once (default 4)")
    p.add_argument("--rate", type=float, default=12.0, help="note-ons per second per session (default 12)")
    p.add_argument("--broker", choices=["own", "configured"], default="own", help="a private Mosquitto (default) or mqtt.host/port")
    p.add_argument("--busy-poll", action="store_true", help="serve with --busy-poll (engine.busy_poll: the loop never sleeps)")
    p.add_argument("--daemons", type=int, default=0, help="N daemons behind one broker, sessions played through real bridges")
    p.add_argument("--kill-one", action="store_true", help="with --daemons: SIGKILL the busiest daemon halfway (failover figures)")
    p.add_argument("--freeze-one", action="store_true", help="with --daemons: SIGSTOP it instead (a box cut off: failover by keepalive)")
    p.add_argument("--logs", help="with --daemons: write the broker's and the daemons' logs to this folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)


def _relay(host: str, port: int, ready) -> None:
    """The baseline: SESSION/in -> SESSION/out unchanged (runs in its own process)."""
    import aiomqtt

    async def main():
        async with aiomqtt.Client(host, port, socket_options=NODELAY) as c:
            await c.subscribe("cadenza/+/in")
            ready.set()
            async for m in c.messages:
                await c.publish(m.topic.value[: -len("in")] + "out", bytes(m.payload))

    asyncio.run(main())


async def _play(host: str, port: int, sessions: dict[str, list], ready_wait: float = 0.5) -> list[float]:
    import aiomqtt

    from cadenza.messages import split_messages

    sent: dict[tuple, deque] = defaultdict(deque)
    lat: list[float] = []
    async with aiomqtt.Client(host, port, socket_options=NODELAY) as c:
        await c.subscribe("cadenza/+/out")

        async def collect():
            async for m in c.messages:
                now = time.monotonic()
                s = m.topic.value.split("/")[1]
                for msg in split_messages(bytes(m.payload)):
                    q = sent.get((s, msg[0] & 0xF0, msg[1] if len(msg) > 1 else 0))
                    if q:
                        lat.append(now - q.popleft())

        task = asyncio.create_task(collect())
        await asyncio.sleep(ready_wait)
        merged = sorted((t, s, msg) for s, events in sessions.items() for t, msg in events)
        t0 = time.monotonic() + 0.1
        for at, s, msg in merged:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[(s, msg[0] & 0xF0, msg[1])].append(time.monotonic())
            await c.publish(f"cadenza/{s}/in", msg)
        await asyncio.sleep(0.5)
        task.cancel()
    return lat


def _bench(args, settings) -> int:
    if args.daemons:
        from cadenza.bench.cluster import bench_cluster

        return bench_cluster(args, settings)
    from cadenza.bench.latency import _stats_ms, added_ms, pattern, print_paths, run_service
    from cadenza.harness.mosquitto import MosquittoBroker

    broker = MosquittoBroker().start() if args.broker == "own" else None
    host, port = (broker.host, broker.port) if broker else (settings.mqtt.host, settings.mqtt.port)
    sessions = {f"bench{i}": pattern(args.seconds, args.rate, seed=i) for i in range(args.sessions)}
    try:
        ready = multiprocessing.Event()
        relay = multiprocessing.Process(target=_relay, args=(host, port, ready), daemon=True)
        relay.start()
        if not ready.wait(20):
            raise BrokerError(f"bench: the relay could not reach the broker at {host}:{port}")
        try:
            baseline = asyncio.run(_play(host, port, sessions))
        finally:
            relay.terminate()
            relay.join(5)
        service, metrics = run_service(
            args,
            ["--transport", "mqtt"] + (["--busy-poll"] if args.busy_poll else []),
            {"CADENZA_MQTT__HOST": host, "CADENZA_MQTT__PORT": str(port)},
            ready=lambda proc: _wait_online(host, port, proc),
            play=lambda: asyncio.run(_play(host, port, sessions)),
            error=BrokerError,
        )
    finally:
        if broker is not None:
            broker.stop()
    n_msgs = sum(len(e) for e in sessions.values())
    b, s = _stats_ms(baseline), _stats_ms(service)
    added = added_ms(b, s)
    c = metrics["counters"]
    result = {
        "sessions": args.sessions,
        "busy_poll": bool(args.busy_poll),
        "messages": n_msgs,
        "note_ons": sum(1 for e in sessions.values() for _, m in e if m[0] == 0x90),
        "baseline_relay": b,
        "service_path": s,
        "added": added,
        "internal": metrics["latency"].get("internal", {}),
        "loop_lag": metrics["latency"].get("loop_lag", {}),
        "deadline_misses": c.get("deadline_miss", 0),
        "dropped": c.get("dropped", 0),
        "lost_in_transit": n_msgs - s.get("n", 0),
        "service_histograms": metrics["latency"],
    }
    print_paths(
        args,
        result,
        f"{result['sessions']} sessions, {result['note_ons']} notes, {result['messages']} messages through MQTT at {host}:{port}",
        "baseline_relay",
    )
    return 0


def _wait_online(host: str, port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Until the daemon's retained status says online."""
    import aiomqtt

    from cadenza.stream.mqtt.ownership import ONLINE, Status

    async def main():
        async with aiomqtt.Client(host, port) as c:
            await c.subscribe("cadenza/_daemon/+/status")
            end = time.monotonic() + timeout
            async for m in c.messages:
                status = Status.decode(bytes(m.payload))
                if status is not None and status.state == ONLINE:
                    return
                if proc.poll() is not None or time.monotonic() > end:
                    break
            raise BrokerError("bench: the daemon did not come online")

    async def guarded():
        try:
            await asyncio.wait_for(main(), timeout)
        except TimeoutError:
            raise BrokerError(f"bench: the daemon did not come online (exit code {proc.poll()})") from None

    asyncio.run(guarded())
    time.sleep(0.3)
