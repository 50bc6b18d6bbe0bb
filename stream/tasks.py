"""The engine's background tasks: statistics, loop lag, keep-warm ticks, model supervision.

Each is a coroutine over the engine that ``Engine.run`` starts as a named task of its TaskGroup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from cadenza.models.runtime import Event, ModelStage

if TYPE_CHECKING:
    from cadenza.stream.engine import Engine

log = logging.getLogger("cadenza.stream.engine")


# With busy polling: the scratch inference's period. A step's code and weights go cold within a
# few milliseconds on a shared machine even while the thread spins; `cadenza bench velocity`
# (rows live vs live_warm) and `cadenza bench latency --busy-poll` measure it.
BUSY_KEEP_WARM_MS = 0.5
SUPERVISE_S = 0.02  # how often the model stages' statistics reach the metrics


def model_stages(engine: Engine) -> list[ModelStage]:
    """Every model stage the engine runs (velocity, phrase, lookahead), in the model runtime."""
    stages: list[ModelStage] = []
    if engine.velocity_worker is not None:
        stages.append(engine.velocity_worker.stage)
    if engine.phrase_stage is not None and engine.phrase_stage.worker is not None:
        stages.append(engine.phrase_stage.worker.stage)
    if engine.lookahead is not None:
        stages.append(engine.lookahead.stage)
    if engine.vary_stage is not None and engine.vary_stage.stage is not None:
        stages.append(engine.vary_stage.stage)
    return stages


async def stats(engine: Engine) -> None:
    interval = engine.settings.engine.stats_interval_s
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        log.info("stats %s", engine.metrics.line())


async def loop_lag(engine: Engine) -> None:
    loop = engine.loop
    while True:
        t0 = loop.time()
        await asyncio.sleep(0.01)
        engine.metrics.observe("loop_lag", max(0.0, loop.time() - t0 - 0.01))


async def keep_warm(engine: Engine) -> None:
    """Inline CPU velocity model: a scratch inference whenever the pump has been idle for
    ``velocity.keep_warm_ms`` (see ``VelocityBatcher.keep_warm``). A busy-polling loop burns
    its core anyway, so there it is on by default, every ``BUSY_KEEP_WARM_MS``."""
    worker = engine.velocity_worker
    interval = engine.settings.velocity.keep_warm_ms / 1000.0
    if interval <= 0 and engine.settings.engine.busy_poll:
        interval = BUSY_KEEP_WARM_MS / 1000.0
    if worker is None or not worker.inline or interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        if time.monotonic() - engine.last_pump >= interval and not engine.backlog:
            worker.keep_warm()


async def watchdog(engine: Engine) -> None:
    """Supervision of the model stages. Each restarts itself after a crash (the runtime's
    backoff timer) and answers requests with their fallback meanwhile; here the engine
    releases what is sounding when the velocity model crashes (its notes' state is gone)
    and publishes every stage's statistics."""

    def velocity_event(event: Event, stage: ModelStage) -> None:
        if event == "crash":
            log.warning("velocity model down: releasing notes; it restarts by itself")
            engine.panic("worker crash")
        else:
            engine.metrics.inc("worker_restarts")

    worker = engine.velocity_worker
    undo = worker.stage.listen(velocity_event) if worker is not None else None
    try:
        while True:
            for stage in model_stages(engine):
                stage.publish(engine.metrics)
            await asyncio.sleep(SUPERVISE_S)
    finally:
        if undo is not None:
            undo()
