"""Time to first note through the live engine (plugged into `cadenza bench continue`)."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cadenza.messages import note_off, note_on
from cadenza.stream.build import build_engine
from cadenza.stream.sinks import CountingSink


def engine_ttfn(model, settings, *, calls: int = 50) -> dict:
    """Phrase end detected -> first answer note-on handed to the sink, through the engine.

    Each call plays a short phrase into a real-time engine in continue mode (the phrase model is
    fed as the notes arrive, as live), ends the call, waits for the first answer note, then
    barges in so the next call starts from a quiet engine.
    """
    from cadenza.models.phrase.answer import options_from
    from cadenza.models.phrase.live import LivePhrase

    answer = options_from(settings.phrase)  # best-of-N as configured: its first horizon is part of the latency

    async def main():
        loop = asyncio.get_running_loop()
        async with build_engine(
            settings, "continue", [CountingSink()], loop=loop, make_live=lambda: LivePhrase(model, answer=answer, paced=True)
        ) as engine:
            return await _calls(engine, loop, calls)

    h = asyncio.run(main())
    return {"ttfn_ms_p50": round(h.percentile(50) * 1e3, 2), "ttfn_ms_p99": round(h.percentile(99) * 1e3, 2), "ttfn_calls": h.n}


async def _calls(engine, loop: asyncio.AbstractEventLoop, calls: int):
    cr = engine.phrase
    hist = engine.metrics
    run = asyncio.create_task(engine.run())
    rng = np.random.default_rng(0)
    try:
        for k in range(calls):
            for p in rng.integers(55, 80, 8):
                engine.deliver_now(time.monotonic(), note_on(0, int(p), 80))
                await asyncio.sleep(0.03)
                engine.deliver_now(time.monotonic(), note_off(0, int(p)))
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
