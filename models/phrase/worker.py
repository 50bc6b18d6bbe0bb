"""The phrase model in the model runtime: a ``LivePhrase`` fed as the performer plays, answering
token by token.

Every note the performer plays is fed as it happens (so the KV cache is current and nothing is
left to prefill when the call ends); an answer streams back to the loop event by event, ahead of
playback, until it is complete or its cancel event is set. The interaction policy around it
(when a call ends, barge-in, scheduling) is ``cadenza.stream.phrase.PhraseStage``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypedDict

from cadenza.models.runtime import DEFAULT_BACKOFF, Backoff, ModelStage, Post


class ResponseParams(TypedDict):
    start_t: float
    seconds: float
    temperature: float
    top_k: int
    top_p: float
    seed: int | None


class LivePhraseModel(Protocol):
    """What the phrase stage drives (``cadenza.models.phrase.live.LivePhrase``)."""

    def warm_up(self) -> int: ...
    def reset(self) -> None: ...
    def feed(self, t: float, msg: bytes) -> None: ...
    def respond(
        self, *, start_t: float, seconds: float, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
    ) -> Iterator[tuple[float, bytes]]: ...


@dataclass(frozen=True)
class Feed:
    t: float
    data: bytes


@dataclass
class Respond:
    gen_id: int
    cancel: threading.Event
    params: ResponseParams
    on_event: Callable[[int, float, bytes], None]
    on_done: Callable[[int], None]
    finished: bool = False  # set on the model thread once on_done is posted


@dataclass(frozen=True)
class Sync:
    future: asyncio.Future[None]


PhraseJob = Feed | Respond | Sync


class PhraseWorker:
    """The phrase model in the model runtime: every performer note is fed to a ``LivePhrase``
    as it happens, and answers stream back to the loop event by event."""

    def __init__(
        self, make_live: Callable[[], LivePhraseModel], loop: asyncio.AbstractEventLoop, *, backoff: Backoff = DEFAULT_BACKOFF
    ) -> None:
        self._make_live = make_live
        self._loop = loop
        self.live: LivePhraseModel | None = None
        self.stage: ModelStage[PhraseJob] = ModelStage(self, name="phrase", backoff=backoff)

    def start(self) -> None:
        """Load the model and warm it up (blocking; call via ``asyncio.to_thread``)."""
        self.stage.start(self._loop)

    def stop(self) -> None:
        self.stage.stop()

    def kill(self) -> None:
        """Fault drill: the model raises where it runs; the runtime restarts it."""
        self.stage.kill()

    @property
    def alive(self) -> bool:
        return self.stage.alive

    @property
    def error(self) -> str | None:
        return self.stage.last_error

    def feed(self, t: float, data: bytes) -> None:
        self.stage.submit(Feed(t, data))

    def respond(
        self,
        gen_id: int,
        cancel: threading.Event,
        params: ResponseParams,
        on_event: Callable[[int, float, bytes], None],
        on_done: Callable[[int], None],
    ) -> None:
        self.stage.submit(Respond(gen_id, cancel, params, on_event, on_done))

    async def caught_up(self) -> None:
        """Wait until everything fed so far has been through the model (for file playback,
        which feeds faster than real time; live input never gets ahead of it)."""
        fut = self._loop.create_future()
        self.stage.submit(Sync(fut))
        await fut

    # ---- the runtime's handler --------------------------------------------------------------

    def load(self) -> None:
        self.live = self._make_live()
        self.live.warm_up()

    def reset(self) -> None:
        assert self.live is not None
        self.live.reset()

    def run(self, jobs: list[PhraseJob], post: Post) -> int:
        live = self.live
        assert live is not None
        for job in jobs:
            if isinstance(job, Feed):
                live.feed(job.t, job.data)
            elif isinstance(job, Sync):
                post(_settle, job.future)
            else:
                gen = live.respond(**job.params)
                try:
                    for t, msg in gen:
                        if job.cancel.is_set():
                            break
                        post(job.on_event, job.gen_id, t, msg)
                finally:
                    gen.close()
                job.finished = True
                post(job.on_done, job.gen_id)
        return len(jobs)

    def fallback(self, jobs: list[PhraseJob]) -> int:
        """A feed is dropped (the context restarts empty anyway); an answer that cannot come is
        over at once; a sync is settled."""
        n = 0
        for job in jobs:
            if isinstance(job, Sync):
                _settle(job.future)
            elif isinstance(job, Respond) and not job.finished:
                n += 1
                job.finished = True
                job.on_done(job.gen_id)
        return n


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
