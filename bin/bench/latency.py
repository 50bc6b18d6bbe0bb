"""`cadenza bench latency`: added latency of the live path through real JACK ports.

A JACK dummy server (its own, or the running one), a player client and a listener client in this
process, and ``cadenza serve`` in a separate process — the same arrangement a musician has. The
same note pattern is played twice in one run: once player → listener directly (the JACK loopback
baseline) and once player → Cadenza → listener. The added latency is the difference; the
service's own internal latency (input stamped → handed to the port) and event-loop lag come from
its metrics. The helpers here (pattern, run_service, print_paths) serve `bench mqtt` too.
"""

from __future__ import annotations

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

from cadenza.errors import PortError
from cadenza.messages import control, note_off, note_on, pitch_bend


def register(b) -> None:
    p = b.add_parser("latency", help="added latency of the live path through real JACK ports")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each played pass (default 20)")
    p.add_argument("--rate", type=float, default=12.0, help="note-ons per second in the pattern (default 12, chords included)")
    p.add_argument("--period", type=int, default=64, help="JACK period in frames when starting our own server (default 64 at 48 kHz)")
    p.add_argument(
        "--pin",
        action="store_true",
        help="give the service a core of its own (the last one) and run JACK and the player on the others, as on a machine where nothing else competes with it",
    )
    p.add_argument("--busy-poll", action="store_true", help="serve with --busy-poll (engine.busy_poll: the loop never sleeps)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_latency)


def pattern(seconds: float, rate: float, seed: int = 0) -> list[tuple[float, bytes]]:
    """A realistic flat-velocity performance: melody, chords every bar, pedal changes."""
    rng = np.random.default_rng(seed)
    events: list[tuple[float, bytes]] = []
    t, beat = 0.3, 0.5
    bar = 0
    while t < seconds:
        if bar % 1 == 0:
            events.append((t - 0.02, control(0, 64, 0)))
            events.append((t + 0.01, control(0, 64, 127)))
        root = int(rng.integers(40, 60))
        for q in (root, root + 4, root + 7, root + 12):  # a chord on the bar line
            events.append((t, note_on(0, q, 64)))
            events.append((t + beat * 1.5, note_off(0, q)))
        n_melody = max(1, int(rate * 4 * beat) - 4)
        for k in range(n_melody):
            on = t + k * 4 * beat / n_melody + 0.003
            p = int(rng.integers(64, 88))
            events.append((on, note_on(0, p, 64)))
            events.append((on + 0.8 * 4 * beat / n_melody, note_off(0, p)))
        if rng.random() < 0.3:
            events.append((t + beat, pitch_bend(0, int(rng.integers(0, 128)) << 7)))
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
    return {
        "n": int(len(a)),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
    }


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
            args,
            ["--mode", "colorize"] + (["--busy-poll"] if args.busy_poll else []),
            {"CADENZA_MIDI__API": "jack"},
            ready=lambda proc: _wait_for_port("cadenza in", proc),
            play=lambda: through_service(events),
            error=PortError,
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
    print_paths(
        args,
        result,
        f"{result['note_ons']} notes, {result['messages']} messages, JACK period {result['jack_period_ms']} ms",
        "baseline_loopback",
    )
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
        print(
            f"  {name:18s} p50 {r.get('p50_ms', float('nan')):7.3f}  p95 {r.get('p95_ms', float('nan')):7.3f}  p99 {r.get('p99_ms', float('nan')):7.3f}  max {r.get('max_ms', float('nan')):7.3f} ms"
        )
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
