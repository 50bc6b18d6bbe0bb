"""Benchmarks as commands: each prints figures and, with ``--json``, one JSON object.

====================  ============================================================================
this module           ``cadenza bench latency`` and ``cadenza bench throughput``: the live path
``mqtt``              ``cadenza bench mqtt``: the headless daemon's round trip through a broker
elsewhere             ``bench velocity`` and ``bench colorize`` in ``cadenza.models.velocity.cli``,
                      ``bench continue`` in ``cadenza.models.phrase.bench``
====================  ============================================================================

Recorded figures, with their command, date, commit and machine: docs/benchmarks.md.

latency: a JACK dummy server (its own, or the running one), a player client and a listener
client in this process, and ``cadenza serve`` in a separate process — the same arrangement a
musician has. The same note pattern is played twice in one run: once player → listener directly
(the JACK loopback baseline) and once player → Cadenza → listener. The added latency is the
difference; the service's own internal latency (input stamped → handed to the port) and
event-loop lag come from its metrics.

throughput: the engine in this process with the causal model, fed at increasing note rates by a
loop-side source across 16 sessions (channels), to find the highest rate that keeps deadline
misses under 1 %.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

from cadenza.cli import add_override
from cadenza.errors import PortError


def register(groups) -> None:
    b = groups["bench"]
    p = b.add_parser("latency", help="added latency of the live path through real JACK ports")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each played pass (default 20)")
    p.add_argument("--rate", type=float, default=12.0, help="note-ons per second in the pattern (default 12, chords included)")
    p.add_argument("--period", type=int, default=64, help="JACK period in frames when starting our own server (default 64 at 48 kHz)")
    p.add_argument("--pin", action="store_true", help="give the service a core of its own (the last one) and run JACK and the player on the others, as on a machine where nothing else competes with it")
    p.add_argument("--busy-poll", action="store_true", help="serve with --busy-poll (engine.busy_poll: the loop never sleeps)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_latency)
    t = b.add_parser("throughput", help="highest sustained note rate with < 1 % deadline misses")
    t.add_argument("--seconds", type=float, default=2.0, help="length of each rate step")
    t.add_argument("--rates", default="200,500,1000,2000,5000,10000,20000", help="note rates to try, comma separated")
    t.add_argument("--busy-poll", action="store_true", default=None, help="run the engine on the busy-polling loop (engine.busy_poll)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_throughput, prepare=lambda args: add_override(args, "engine", "busy_poll", args.busy_poll))
    from cadenza.bench.mqtt import register as register_mqtt

    register_mqtt(b)


# --------------------------------------------------------------------------------------------
# latency


def pattern(seconds: float, rate: float, seed: int = 0) -> list[tuple[float, bytes]]:
    """A realistic flat-velocity performance: melody, chords every bar, pedal changes."""
    rng = np.random.default_rng(seed)
    events: list[tuple[float, bytes]] = []
    t, beat = 0.3, 0.5
    bar = 0
    while t < seconds:
        if bar % 1 == 0:
            events.append((t - 0.02, bytes((0xB0, 64, 0))))
            events.append((t + 0.01, bytes((0xB0, 64, 127))))
        root = int(rng.integers(40, 60))
        for q in (root, root + 4, root + 7, root + 12):  # a chord on the bar line
            events.append((t, bytes((0x90, q, 64))))
            events.append((t + beat * 1.5, bytes((0x80, q, 0))))
        n_melody = max(1, int(rate * 4 * beat) - 4)
        for k in range(n_melody):
            on = t + k * 4 * beat / n_melody + 0.003
            p = int(rng.integers(64, 88))
            events.append((on, bytes((0x90, p, 64))))
            events.append((on + 0.8 * 4 * beat / n_melody, bytes((0x80, p, 0))))
        if rng.random() < 0.3:
            events.append((t + beat, bytes((0xE0, 0, int(rng.integers(0, 128))))))
        t += 4 * beat
        bar += 1
    events.sort(key=lambda e: e[0])
    return events


def _measure(mo, mi, events, *, settle: float = 0.3) -> list[float]:
    """Play ``events`` in real time on ``mo``; per-message latency (s) as heard on ``mi``.

    Sent and received messages are matched first-in first-out per (status, key), because the
    service rewrites note-on velocities.
    """
    from cadenza.stream.ports import InputPoller

    got: list[tuple[float, bytes]] = []
    poller = InputPoller(mi, lambda t, m: got.append((t, m)), name="bench-listen")
    time.sleep(0.2)
    sent: dict[tuple[int, int], deque] = defaultdict(deque)
    t0 = time.monotonic() + 0.1
    for at, msg in events:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ts = time.monotonic()
        mo.send_message(msg)
        sent[(msg[0] & 0xF0, msg[1])].append(ts)
    time.sleep(settle)
    poller.stop()
    lat = []
    for t, m in got:
        q = sent.get((m[0] & 0xF0, m[1]))
        if q:
            lat.append(t - q.popleft())
    return lat


def _clients():
    import rtmidi

    mo = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, "bench-player")
    mi = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, "bench-listener", queue_size_limit=16384)
    mi.ignore_types(sysex=False, timing=False, active_sense=True)
    return mo, mi


def direct_loopback(events) -> list[float]:
    """Player -> listener with nothing between: what the JACK hop alone costs."""
    from cadenza.stream.ports import find_port

    mo, mi = _clients()
    try:
        mi.open_virtual_port("baseline in")
        mo.open_port(find_port(mo.get_ports(), "baseline in"))
        return _measure(mo, mi, events)
    finally:
        mo.delete()
        mi.delete()


def through_service(events, in_port: str = "cadenza in", out_port: str = "cadenza out") -> list[float]:
    """Player -> Cadenza's input ... Cadenza's output -> listener."""
    from cadenza.stream.ports import find_port

    mo, mi = _clients()
    try:
        i_out, i_in = find_port(mo.get_ports(), in_port), find_port(mi.get_ports(), out_port)
        if i_out is None or i_in is None:
            raise PortError(f"bench: ports {in_port!r}/{out_port!r} not found")
        mo.open_port(i_out)
        mi.open_port(i_in)
        return _measure(mo, mi, events)
    finally:
        mo.delete()
        mi.delete()


def _stats_ms(x: list[float]) -> dict:
    a = np.asarray(x) * 1e3
    if len(a) == 0:
        return {"n": 0}
    return {"n": int(len(a)), "p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3), "max_ms": round(float(a.max()), 3)}


def _latency(args, settings) -> int:
    from cadenza.harness.jack import JackServer, jack_running

    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) >= 2
    if args.pin and not pin:
        raise PortError("bench: --pin needs at least 2 CPU cores")
    if pin:  # this process, and the JACK server it starts, stay off the service's core
        os.sched_setaffinity(0, cores[:-1])
    own = None
    if not jack_running():
        own = JackServer(period=args.period).start()
    period_ms = args.period / 48.0 if own else None
    try:
        events = pattern(args.seconds, args.rate)
        baseline = direct_loopback(events)
        service, metrics = run_service(
            args, ["--mode", "colorize"] + (["--busy-poll"] if args.busy_poll else []), {"CADENZA_MIDI__API": "jack"},
            ready=lambda proc: _wait_for_port("cadenza in", proc), play=lambda: through_service(events), error=PortError,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores[-1:])) if pin else None,
        )
    finally:
        if own is not None:
            own.stop()
    b, s = _stats_ms(baseline), _stats_ms(service)
    added = added_ms(b, s)
    c = metrics["counters"]
    result = {
        "jack_period_ms": round(period_ms, 3) if period_ms else None,
        "service_core": cores[-1] if pin else None,
        "busy_poll": bool(args.busy_poll),
        "messages": len(events),
        "note_ons": sum(1 for _, m in events if m[0] == 0x90),
        "baseline_loopback": b,
        "service_path": s,
        "added": added,
        "internal": metrics["latency"].get("internal", {}),
        "model_wait": metrics["latency"].get("model", {}),
        "loop_lag": metrics["latency"].get("loop_lag", {}),
        "deadline_misses": c.get("deadline_miss", 0),
        "dropped": c.get("dropped", 0),
        "lost_in_transit": len(events) - s["n"],
        "service_histograms": metrics["latency"],
    }
    print_paths(args, result, f"{result['note_ons']} notes, {result['messages']} messages, JACK period {result['jack_period_ms']} ms", "baseline_loopback")
    return 0


def run_service(args, serve_args: list[str], env: dict, *, ready, play, error, preexec_fn=None) -> tuple:
    """``cadenza serve SERVE_ARGS`` in its own process (``--config`` passed on): wait until
    ``ready(proc)``, measure with ``play()``, stop it with SIGTERM; return what ``play`` returned
    and the service's final metrics. A service that fails is ``error`` with its last line."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics_path = Path(tmp) / "metrics.json"
        env = dict(os.environ, CADENZA_ENGINE__STATS_INTERVAL_S="0", **env)
        cmd = [sys.executable, "-m", "cadenza"] + (["--config", args.config] if args.config else [])
        cmd += ["serve", *serve_args, "--metrics-json", str(metrics_path)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        try:
            ready(proc)
            measured = play()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        if proc.returncode != 0 or not metrics_path.is_file():
            raise error(f"bench: cadenza serve failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
        return measured, json.loads(metrics_path.read_text())


def added_ms(baseline: dict, service: dict) -> dict:
    """Service percentiles minus baseline percentiles (what the service adds)."""
    return {k: round(service[k] - baseline[k], 3) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms") if k in service and k in baseline}


def print_paths(args, result: dict, header: str, baseline: str) -> None:
    """The result as one JSON object (``--json``), or a header and a line per measured path."""
    if args.json:
        print(json.dumps(result))
        return
    print(header)
    for name in (baseline, "service_path", "added", "internal", "loop_lag"):
        r = result[name]
        print(f"  {name:18s} p50 {r.get('p50_ms', float('nan')):7.3f}  p95 {r.get('p95_ms', float('nan')):7.3f}  p99 {r.get('p99_ms', float('nan')):7.3f}  max {r.get('max_ms', float('nan')):7.3f} ms")
    print(f"  deadline misses {result['deadline_misses']}, dropped {result['dropped']}, lost in transit {result['lost_in_transit']}")


def _wait_for_port(name: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    import rtmidi

    from cadenza.stream.ports import find_port

    probe = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, "bench-probe")
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise PortError(f"bench: cadenza serve exited: {proc.stderr.read().strip().splitlines()[-1:]}")
            if find_port(probe.get_ports(), name) is not None:
                time.sleep(0.3)
                return
            time.sleep(0.1)
        raise PortError(f"bench: port {name!r} did not appear")
    finally:
        probe.delete()


# --------------------------------------------------------------------------------------------
# throughput


from cadenza.stream.sinks import CountingSink  # noqa: E402


async def _run_rate(settings, worker, rate: float, seconds: float) -> dict:
    from cadenza.stream.engine import Engine

    sink = CountingSink()
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"stats_interval_s": 0})})
    engine = Engine(settings, sinks=[sink], velocity_worker=worker)
    loop = asyncio.get_running_loop()
    engine.bind(loop)
    if not worker.alive:
        worker.start(loop)  # the previous rate's engine stopped it on its way out
    task = asyncio.create_task(engine.run())  # the real engine: its tasks, GC policy, shutdown
    await asyncio.sleep(0.05)
    n = int(rate * seconds)
    rng = np.random.default_rng(1)
    pitches = rng.integers(30, 100, n)
    t0 = loop.time()
    tick = 0.002  # deliver in 2 ms slices, as a busy port would
    sent = 0
    while sent < n:
        due = int(min(n, (loop.time() - t0 + tick) * rate))
        while sent < due:
            now = time.monotonic()
            ch = sent % 16
            engine.deliver_now(now, bytes((0x90 | ch, int(pitches[sent]), 64)))
            engine.deliver_now(now, bytes((0x80 | ch, int(pitches[sent]), 0)))
            sent += 1
        await asyncio.sleep(tick)
    await engine.drain(30)
    engine.stop()
    await task
    c = engine.metrics.counters
    elapsed = loop.time() - t0
    return {
        "rate": rate,
        "notes": n,
        "achieved_rate": round(n / elapsed, 1),
        "miss_pct": round(100.0 * c["deadline_miss"] / max(1, c["note_on"]), 3),
        "dropped": c["dropped"],
        "internal": engine.metrics.hist["internal"].summary_ms(),
        "max_batch": worker.stats.max_batch,
    }


def _throughput(args, settings) -> int:
    from cadenza.stream.velocity_stage import build_velocity_worker

    rates = [float(r) for r in args.rates.split(",")]

    async def main():
        worker = build_velocity_worker(settings)
        worker.start(asyncio.get_running_loop())
        results = []
        try:
            for r in rates:
                res = await _run_rate(settings, worker, r, args.seconds)
                results.append(res)
                if not args.json:
                    print(f"  {r:8.0f} notes/s: achieved {res['achieved_rate']:8.1f}, misses {res['miss_pct']:6.2f} %, internal p99 {res['internal'].get('p99_ms', float('nan')):.2f} ms, max batch {res['max_batch']}")
                if res["miss_pct"] >= 5 or res["achieved_rate"] < 0.8 * r:
                    break
        finally:
            worker.stop()
        return results

    if not args.json:
        print(f"deadline {settings.velocity.deadline_ms} ms, 16 sessions, causal model on {settings.velocity.device}"
              + (", busy-polling loop" if settings.engine.busy_poll else ""))
    from cadenza.stream.spin import spin_runner

    with spin_runner() if settings.engine.busy_poll else asyncio.Runner() as runner:
        results = runner.run(main())
    ok = [r["rate"] for r in results if r["miss_pct"] < 1.0 and r["achieved_rate"] >= 0.95 * r["rate"]]
    summary = {"deadline_ms": settings.velocity.deadline_ms, "busy_poll": settings.engine.busy_poll, "max_rate_under_1pct_miss": max(ok) if ok else 0, "steps": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"highest sustained rate with < 1 % deadline misses: {summary['max_rate_under_1pct_miss']:.0f} notes/s")
    return 0


# --------------------------------------------------------------------------------------------
# time to first note through the live engine (plugged into `cadenza bench continue`)


def engine_ttfn(model, settings, *, calls: int = 50) -> dict:
    """Phrase end detected -> first answer note-on handed to the sink, through the engine.

    Each call plays a short phrase into a real-time engine in continue mode (the phrase model is
    fed as the notes arrive, as live), ends the call, waits for the first answer note, then
    barges in so the next call starts from a quiet engine.
    """
    from cadenza.models.phrase.live import LivePhrase
    from cadenza.stream.phrase import PhraseStage
    from cadenza.stream.engine import Engine

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        sink = CountingSink()
        engine = Engine(settings, sinks=[sink])
        engine.bind(loop)
        cr = PhraseStage(engine, settings.phrase, settings.controls, make_live=lambda: LivePhrase(model))
        engine.phrase = cr
        await cr.start()
        run = asyncio.create_task(engine.run(cr.run))
        hist = engine.metrics
        rng = np.random.default_rng(0)
        try:
            for k in range(calls):
                for p in rng.integers(55, 80, 8):
                    engine.deliver_now(time.monotonic(), bytes((0x90, int(p), 80)))
                    await asyncio.sleep(0.03)
                    engine.deliver_now(time.monotonic(), bytes((0x80, int(p), 0)))
                    await asyncio.sleep(0.01)
                await engine.drain()
                await cr.worker.caught_up()  # live input never runs ahead of the model either
                cr.end_call(loop.time())
                end = loop.time() + 10
                while ("ttfn" not in hist.hist or hist.hist["ttfn"].n <= k) and loop.time() < end:
                    await asyncio.sleep(0.001)
                cr.cancel_response(release=True)
                await asyncio.sleep(0.02)
        finally:
            engine.stop()
            await run
        return hist.hist["ttfn"]
    h = asyncio.run(main())
    return {"ttfn_ms_p50": round(h.percentile(50) * 1e3, 2), "ttfn_ms_p99": round(h.percentile(99) * 1e3, 2), "ttfn_calls": h.n}
