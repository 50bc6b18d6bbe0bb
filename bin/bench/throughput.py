"""`cadenza bench throughput`: the engine in this process with the causal model, fed at
increasing note rates by a loop-side source across 16 sessions (channels), to find the highest
rate that keeps deadline misses under 1 %.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from cadenza.cli import add_override
from cadenza.messages import note_off, note_on
from cadenza.stream.build import build_engine
from cadenza.stream.sinks import CountingSink


def register(b) -> None:
    t = b.add_parser("throughput", help="highest sustained note rate with < 1 %% deadline misses")
    t.add_argument("--seconds", type=float, default=2.0, help="length of each rate step")
    t.add_argument("--rates", default="200,500,1000,2000,5000,10000,20000", help="note rates to try, comma separated")
    t.add_argument("--busy-poll", action="store_true", default=None, help="run the engine on the busy-polling loop (engine.busy_poll)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_throughput, prepare=lambda args: add_override(args, "engine", "busy_poll", args.busy_poll))


async def _run_rate(settings, rate: float, seconds: float) -> dict:
    sink = CountingSink()
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"stats_interval_s": 0})})
    loop = asyncio.get_running_loop()
    async with build_engine(settings, "colorize", [sink], loop=loop) as engine:
        task = asyncio.create_task(engine.run())  # the real engine: its tasks, GC policy, shutdown
        await asyncio.sleep(0.05)
        return await _feed(engine, task, loop, rate, seconds)


async def _feed(engine, task: asyncio.Task, loop: asyncio.AbstractEventLoop, rate: float, seconds: float) -> dict:
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
            engine.deliver_now(now, note_on(ch, int(pitches[sent]), 64))
            engine.deliver_now(now, note_off(ch, int(pitches[sent])))
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
        "max_batch": engine.velocity.worker.stats.max_batch,
    }


def _throughput(args, settings) -> int:
    rates = [float(r) for r in args.rates.split(",")]

    async def main():
        results = []
        for r in rates:  # a fresh engine and model worker per rate: no step inherits another's backlog
            res = await _run_rate(settings, r, args.seconds)
            results.append(res)
            if not args.json:
                print(
                    f"  {r:8.0f} notes/s: achieved {res['achieved_rate']:8.1f}, misses {res['miss_pct']:6.2f} %, internal p99 {res['internal'].get('p99_ms', float('nan')):.2f} ms, max batch {res['max_batch']}"
                )
            if res["miss_pct"] >= 5 or res["achieved_rate"] < 0.8 * r:
                break
        return results

    if not args.json:
        print(
            f"deadline {settings.velocity.deadline_ms} ms, 16 sessions, causal model on {settings.velocity.device}"
            + (", busy-polling loop" if settings.engine.busy_poll else "")
        )
    from cadenza.stream.spin import spin_runner

    with spin_runner() if settings.engine.busy_poll else asyncio.Runner() as runner:
        results = runner.run(main())
    ok = [r["rate"] for r in results if r["miss_pct"] < 1.0 and r["achieved_rate"] >= 0.95 * r["rate"]]
    summary = {
        "deadline_ms": settings.velocity.deadline_ms,
        "busy_poll": settings.engine.busy_poll,
        "max_rate_under_1pct_miss": max(ok) if ok else 0,
        "steps": results,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"highest sustained rate with < 1 % deadline misses: {summary['max_rate_under_1pct_miss']:.0f} notes/s")
    return 0
