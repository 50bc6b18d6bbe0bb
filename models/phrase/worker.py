"""The phrase model in the model runtime: a ``LivePhrase`` per session, fed as its performer plays,
answering token by token.

Every note a performer plays is fed as it happens (so the session's KV cache is current and
nothing is left to prefill when its call ends); an answer streams back to the loop event by
event, ahead of playback, until it is complete or its cancel event is set. The interaction policy
around it (when a call ends, barge-in, scheduling) is ``cadenza.stream.phrase``.

One model, one thread, a context per session. Each context is a batch-1 KV cache, so the phrase
model batches per session only: feeds run one after another, and the answers of several sessions
in flight are interleaved a few events at a time (one session's long answer does not hold up
another's first note). A session's own feeds wait while its answer is generated, as they always
did: the answer is generated from the context as it was when the call ended.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypedDict

from cadenza.models.runtime import DEFAULT_BACKOFF, Backoff, ModelStage, Post

SLICE = 4  # answer events generated per turn of an answer in flight


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
    def new_context(self) -> LivePhraseModel: ...
    def reset(self) -> None: ...
    def feed(self, t: float, msg: bytes) -> None: ...
    def respond(
        self, *, start_t: float, seconds: float, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
    ) -> Iterator[tuple[float, bytes]]: ...


@dataclass(frozen=True)
class Feed:
    source: int
    t: float
    data: bytes


@dataclass
class Respond:
    source: int
    gen_id: int
    cancel: threading.Event
    params: ResponseParams
    on_event: Callable[[int, float, bytes], None]
    on_done: Callable[[int], None]
    finished: bool = False  # set on the model thread once on_done is posted
    events: Iterator[tuple[float, bytes]] | None = None  # the answer being generated (model thread)


@dataclass(frozen=True)
class Sync:
    future: asyncio.Future[None]


@dataclass(frozen=True)
class Forget:
    source: int


class _Step:
    """Queued by the handler itself: the answers in flight have more to generate."""


STEP = _Step()

PhraseJob = Feed | Respond | Sync | Forget | _Step


class PhraseWorker:
    """The phrase model in the model runtime: every performer note is fed to its session's
    ``LivePhrase`` as it happens, and answers stream back to the loop event by event.

    ``make_live()`` loads the model with its first context; every other session's context is
    ``new_context()`` of it (the same weights), made on the model thread at its first job.
    """

    def __init__(
        self, make_live: Callable[[], LivePhraseModel], loop: asyncio.AbstractEventLoop, *, backoff: Backoff = DEFAULT_BACKOFF
    ) -> None:
        self._make_live = make_live
        self._loop = loop
        self._first: LivePhraseModel | None = None  # loaded and warmed up; other contexts are made from it
        self._contexts: dict[int, LivePhraseModel] = {}  # per source
        self._spare: LivePhraseModel | None = None  # empty, for the next new session
        self._answers: dict[int, Respond] = {}  # in flight, per source
        self._deferred: dict[int, list[Feed]] = {}  # fed while its session's answer was generated
        self._syncs: list[Sync] = []
        self._stepping = False  # a STEP is queued
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

    def feed(self, source: int, t: float, data: bytes) -> None:
        self.stage.submit(Feed(source, t, data))

    def respond(
        self,
        source: int,
        gen_id: int,
        cancel: threading.Event,
        params: ResponseParams,
        on_event: Callable[[int, float, bytes], None],
        on_done: Callable[[int], None],
    ) -> None:
        self.stage.submit(Respond(source, gen_id, cancel, params, on_event, on_done))

    def forget(self, source: int) -> None:
        """The session has ended: its context goes (kept, emptied, for the next new session)."""
        self.stage.submit(Forget(source))

    async def caught_up(self) -> None:
        """Wait until everything fed so far has been through the model (for file playback,
        which feeds faster than real time; live input never gets ahead of it)."""
        fut = self._loop.create_future()
        self.stage.submit(Sync(fut))
        await fut

    # ---- the runtime's handler --------------------------------------------------------------

    def load(self) -> None:
        self._first = self._spare = self._make_live()
        self._first.warm_up()

    def reset(self) -> None:
        """Every context empty, no answer in flight (a start, or a restart after a crash: the
        stage cut the answers then)."""
        for live in self._contexts.values():
            live.reset()
        for job in self._answers.values():
            if job.events is not None:
                job.events.close()
        self._answers.clear()
        self._deferred.clear()
        self._stepping = False
        syncs, self._syncs = self._syncs, []
        for job in syncs:
            _settle(job.future)

    def _context(self, source: int) -> LivePhraseModel:
        live = self._contexts.get(source)
        if live is None:
            live, self._spare = self._spare or self._first.new_context(), None
            self._contexts[source] = live
        return live

    def run(self, jobs: list[PhraseJob], post: Post) -> int:
        n = 0
        for job in jobs:
            if isinstance(job, _Step):
                self._stepping = False
                continue
            n += 1
            if isinstance(job, Feed):
                if job.source in self._answers:
                    self._deferred.setdefault(job.source, []).append(job)
                else:
                    self._context(job.source).feed(job.t, job.data)
            elif isinstance(job, Sync):
                if any(self._deferred.values()):
                    self._syncs.append(job)
                else:
                    post(_settle, job.future)
            elif isinstance(job, Forget):
                self._end(job.source, post)
                live = self._contexts.pop(job.source, None)
                if live is not None and self._spare is None:
                    live.reset()
                    self._spare = live
            else:
                self._end(job.source, post)  # a cut-short answer of the same session, still closing
                job.events = self._context(job.source).respond(**job.params)
                self._answers[job.source] = job
        self._step(post)
        return n

    def _step(self, post: Post) -> None:
        """A few events of each answer in flight, then a turn for whatever else is queued."""
        for source, job in list(self._answers.items()):
            for _ in range(SLICE):
                event = None if job.cancel.is_set() else next(job.events, None)
                if event is None:
                    self._end(source, post)
                    break
                post(job.on_event, job.gen_id, *event)
        if self._answers and not self._stepping:
            self._stepping = True
            self.stage.later(STEP)

    def _end(self, source: int, post: Post) -> None:
        """The session's answer is over (complete, cancelled, or replaced): close it, then feed
        what its performer played meanwhile."""
        job = self._answers.pop(source, None)
        if job is None:
            return
        job.events.close()
        job.finished = True
        post(job.on_done, job.gen_id)
        live = self._contexts[source]
        for feed in self._deferred.pop(source, ()):
            live.feed(feed.t, feed.data)
        if self._syncs and not any(self._deferred.values()):
            syncs, self._syncs = self._syncs, []
            for sync in syncs:
                post(_settle, sync.future)

    def fallback(self, jobs: list[PhraseJob]) -> int:
        """A feed is dropped (the context restarts empty anyway); an answer that cannot come is
        over at once (those in flight too, when their next turn is among the jobs); a sync is
        settled."""
        n = 0
        answers = [job for job in jobs if isinstance(job, Respond)]
        if any(isinstance(job, _Step) for job in jobs):
            answers += list(self._answers.values())
        syncs, self._syncs = self._syncs, []  # (the model thread is not serving now)
        for job in syncs + jobs:
            if isinstance(job, Sync):
                _settle(job.future)
        for job in answers:
            if not job.finished:
                n += 1
                job.finished = True
                job.on_done(job.gen_id)
        return n


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
