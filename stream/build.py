"""One way to assemble the engine: the stages a mode needs, started, wired, and stopped again.

``serve``, the MQTT daemon, the demo and the benches all build their engine here::

    async with build_engine(settings, "both", [port]) as engine:
        await engine.run()

=========  ===================================================================
mode       stages
=========  ===================================================================
colorize   velocity worker (the causal model, per note, with a deadline)
continue   phrase stage (answers when the performer stops)
both       velocity worker and phrase stage
lookahead  full-context stage; everything leaves ``velocity.lookahead_s`` late
vary       MusicVAE stage: the performer's loop, varied, from the next loop line on
thru       none: messages pass through the engine's buffers and ledger only
=========  ===================================================================

Each stage is one model shared by every session (source) the engine serves; a session's state
over it is made at the session's first message (see ``stream/session.py``).

The caller opens and closes its sinks (ports, audio, transports); what this builds, it stops on
the way out, failed starts included (stopping twice is safe, and ``Engine.run`` stops the
stages too, so that notes are released before the stages go).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from cadenza.config.settings import Settings
from cadenza.errors import ConfigError
from cadenza.stream.engine import Engine
from cadenza.stream.sinks import AnySink

if TYPE_CHECKING:
    from cadenza.models.phrase.live import LivePhrase
    from cadenza.stream.phrase import PhraseStage
    from cadenza.stream.vary import VaryStage

MODES = ("colorize", "continue", "both", "lookahead", "vary", "thru")


@contextlib.asynccontextmanager
async def build_engine(
    settings: Settings,
    mode: str,
    sinks: list[AnySink],
    *,
    realtime: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
    make_live: Callable[[], LivePhrase] | None = None,
) -> AsyncIterator[Engine]:
    """The engine for ``mode`` with its stages started, bound to ``loop`` (default: the running one).

    ``realtime=False`` lets the output scheduler run as fast as the input comes (files, the
    demo's ``--fast``); ``make_live`` replaces the phrase model the settings name (benches pass
    one already loaded).
    """
    from cadenza.stream.lookahead import build_lookahead
    from cadenza.stream.phrase import PhraseStage, build_phrase_stage
    from cadenza.stream.vary import build_vary_stage
    from cadenza.stream.velocity_stage import build_velocity_worker

    if mode not in MODES:
        raise ConfigError(f"unknown engine mode {mode!r}; one of {', '.join(MODES)}")
    loop = loop or asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as started:
        worker = lookahead = None
        if mode in ("colorize", "both"):
            worker = build_velocity_worker(settings)
            started.callback(worker.stop)
            await asyncio.to_thread(worker.start, loop)
        if mode == "lookahead":
            lookahead = build_lookahead(settings)
            started.callback(lookahead.stop)
            await asyncio.to_thread(lookahead.start, loop)

        def phrase_stage(e: Engine) -> PhraseStage:
            if make_live is None:
                return build_phrase_stage(e, settings)
            return PhraseStage(e, settings.phrase, settings.controls, make_live=make_live)

        def vary_stage(e: Engine) -> VaryStage:
            return build_vary_stage(e, settings)

        engine = Engine(
            settings,
            sinks=sinks,
            velocity_worker=worker,
            lookahead=lookahead,
            phrase_factory=phrase_stage if mode in ("continue", "both") else None,
            vary_factory=vary_stage if mode == "vary" else None,
            realtime=realtime,
        )
        engine.bind(loop)
        if engine.phrase_stage is not None:
            started.callback(engine.phrase_stage.close)
            await engine.phrase_stage.start()
        if engine.vary_stage is not None:
            started.callback(engine.vary_stage.close)
            await engine.vary_stage.start()
        yield engine
