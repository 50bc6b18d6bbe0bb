"""The causal velocity model in the model runtime: futures in, the batcher's answers out.

Requests from every session go through one :class:`~cadenza.models.runtime.ModelStage`, so each
session's events are applied in order; :class:`~cadenza.models.velocity.batching.VelocityBatcher`
answers a drained burst, batched across sessions. It never waits for a batch to fill: latency
first. Inline (the CPU default) the engine's pump calls :meth:`VelocityWorker.flush` right after it
has read a burst; in a thread (GPU) the answers are posted back to the loop. A crash answers every
waiting note-on by cancelling its future (the engine then sends the fallback velocity and counts a
miss) and the runtime restarts the model with fresh session state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cadenza.models.runtime import (
    DEFAULT_BACKOFF,
    Backoff,
    ModelStage,
    Post,
    SessionKey,
    StageStats,
)
from cadenza.models.velocity.batching import (
    Featurizer,
    Kind,
    VelocityBatcher,
    VelocityStep,
)

VelocityJob = tuple[Kind, SessionKey, float, int, "asyncio.Future[float] | None"]


class VelocityModel:
    """The runtime handler: loads the step, owns the batcher, answers note-on futures."""

    def __init__(
        self,
        load_model: Callable[[], VelocityStep],
        make_features: Callable[[], Featurizer],
        *,
        max_batch: int,
        threads: int,
        inline: bool,
        stats: StageStats,
    ) -> None:
        self._load_model = load_model
        self._make_features = make_features
        self.max_batch = max_batch
        self.threads = threads
        self.inline = inline
        self.stats = stats
        self.batcher: VelocityBatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._blas_limit: object | None = None
        self._prepare_scheduled = False

    def load(self) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(self.threads)
        # numpy's OpenBLAS splits even a (4 x 256) @ (256 x 768) product over its threads, and
        # waking a pool thread on a busy core costs a chord milliseconds. One thread, kept for the
        # life of the process (the limit is process-wide).
        self._blas_limit = threadpool_limits(self.threads, user_api="blas")
        self.batcher = VelocityBatcher(
            self._load_model(), self._make_features, max_batch=self.max_batch, prepare_ahead=self.inline, stats=self.stats
        )
        self.batcher.warm_up()

    def reset(self) -> None:
        assert self.batcher is not None
        self.batcher.reset_all()

    def run(self, jobs: list[VelocityJob], post: Post) -> int:
        assert self.batcher is not None
        values = self.batcher.apply([(kind, s, t, arg) for kind, s, t, arg, _ in jobs])
        futures = [fut for kind, _, _, _, fut in jobs if kind == "on"]
        post(_resolve_all, futures, values)
        if self.batcher.to_prepare and not self._prepare_scheduled and self.loop is not None:
            # inline: after the pump has sent these notes (it does so before it yields to the loop)
            self._prepare_scheduled = True
            self.loop.call_soon(self._prepare_next)
        return len(futures)

    def fallback(self, jobs: list[VelocityJob]) -> int:
        n = 0
        for kind, _, _, _, fut in jobs:
            if kind == "on":
                n += 1
                if fut is not None and not fut.done():
                    fut.cancel()
        return n

    def _prepare_next(self) -> None:
        self._prepare_scheduled = False
        if self.batcher is not None:
            self.batcher.prepare_next()


class VelocityWorker:
    """Runs ``model.step`` for note-on requests; keeps per-session features and recurrent state.

    ``load_model()`` returns a :class:`VelocityStep` (the numpy step on CPU, the torch or
    static-shape step on a GPU); ``make_features()`` a fresh per-session :class:`Featurizer`.
    With ``inline=True`` nothing runs until the owner calls :meth:`flush` on the loop thread.
    """

    def __init__(
        self,
        *,
        load_model: Callable[[], VelocityStep],
        make_features: Callable[[], Featurizer],
        max_batch: int = 64,
        threads: int = 1,
        inline: bool = False,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.inline = inline
        stats = StageStats()
        self.model = VelocityModel(load_model, make_features, max_batch=max_batch, threads=threads, inline=inline, stats=stats)
        self.stage: ModelStage[VelocityJob] = ModelStage(
            self.model, name="velocity", inline=inline, max_drain=4 * max_batch, backoff=backoff, stats=stats
        )

    @property
    def stats(self) -> StageStats:
        return self.stage.stats

    @property
    def batcher(self) -> VelocityBatcher | None:
        return self.model.batcher

    @property
    def alive(self) -> bool:
        return self.stage.alive

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load and warm up the model (blocking: before serving, or via ``asyncio.to_thread``)."""
        self.model.loop = loop if self.inline else None
        self.stage.start(loop)

    def stop(self) -> None:
        self.stage.stop()

    def kill(self) -> None:
        """Make the model raise where it runs (fault drill); the runtime restarts it."""
        self.stage.kill()

    # ---- requests (loop thread, never block) --------------------------------------------------

    def note_on(self, session: SessionKey, t: float, pitch: int) -> asyncio.Future[float] | None:
        """A future for this note's velocity; None while the model is down (counted as a fallback)."""
        if not self.stage.alive:
            self.stage.submit(("on", session, t, pitch, None))  # the runtime counts the fallback
            return None
        fut: asyncio.Future[float] = self.stage.loop.create_future()
        # No deadline on the job: a late note must still advance its session's state. The engine
        # waits for the answer only until the note's deadline and sends the fallback after that.
        self.stage.submit(("on", session, t, pitch, fut))
        return fut

    def note_off(self, session: SessionKey, t: float, pitch: int) -> None:
        self.stage.submit(("off", session, t, pitch, None))

    def pedal(self, session: SessionKey, t: float, value: int) -> None:
        self.stage.submit(("pedal", session, t, value, None))

    def forget(self, session: SessionKey) -> None:
        """Drop a session's features and state (it ended)."""
        self.stage.submit(("reset", session, 0.0, 0, None))

    def queue_depth(self) -> int:
        return self.stage.queue_depth()

    def flush(self) -> None:
        """Inline: answer everything asked since the last flush, now (the pump calls this)."""
        self.stage.flush()

    def keep_warm(self) -> None:
        """Inline numpy step, while idle: a scratch inference (see ``VelocityBatcher.keep_warm``)."""
        if self.inline and self.stage.alive and self.model.batcher is not None:
            self.model.batcher.keep_warm()


def _resolve_all(futures: list[asyncio.Future[float]], values: list[float]) -> None:
    for fut, v in zip(futures, values):
        if not fut.done():
            fut.set_result(v)
