"""The model runtime: the one place that owns a model off (or beside) the event loop.

Every model stage (causal velocity, phrase continuation, lookahead velocity, and whatever comes
next, e.g. a MusicVAE "vary" stage) is a :class:`Handler` run by a :class:`ModelStage`. The stage
does what each of them needs and what none of them should write again:

* **start**: the handler's blocking ``load()`` (weights, warm-up), meant for ``asyncio.to_thread``;
* **submit** a job, optionally with a deadline (``time.monotonic()``, the loop's clock): a job
  still queued when its deadline has passed gets its fallback instead of a late model call;
* **post back**: the handler answers through ``post(fn, *args)``, which is
  ``loop.call_soon_threadsafe`` in a thread and a plain call inline;
* **inline mode**: no thread; the owner calls :meth:`ModelStage.flush` on the loop right after
  it has queued a burst. On a CPU the numpy velocity step holds the GIL for nearly all its time,
  so a thread buys no parallelism there, only two hand-offs per note (``cadenza bench latency``
  compares the two); a thread is what a GPU needs, and it batches all sessions' requests;
* **one failure policy**: whatever the handler raises (``kill()`` raises :class:`StageKilled`
  for fault drills) marks the stage down. Every job not answered gets its fallback at once, on
  the loop, and so does every job submitted while it is down (counted as ``fallbacks``). The
  stage restarts itself with a fresh handler state after a capped exponential backoff
  (:class:`Backoff`: at once, then 50 ms doubling up to 2 s), a timer on the loop; listeners
  hear "crash" and "restart";
* **the same statistics** for all stages (:class:`StageStats`), which the engine publishes.

A new stage plugs in without thread code. A VAE stage, for instance, is a handler whose jobs are
``Encode(bars, future)`` / ``Decode(z, future)``: ``run`` calls the model and posts
``future.set_result``, ``fallback`` cancels the futures it gets::

    stage = ModelStage(VaeHandler(load=...), name="vae")
    await asyncio.to_thread(stage.start, loop)
    stage.submit(Encode(bars, fut), deadline=next_bar_line)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

log = logging.getLogger(__name__)

SessionKey = tuple[int, int]
"""One session: (source, MIDI channel). Source 0 is the local ports; MQTT peers get their own."""

J = TypeVar("J")
Post = Callable[..., None]
Event = Literal["crash", "restart"]


class StageKilled(RuntimeError):
    """Raised inside the model thread (or the inline call) by ``kill()``: the fault drill."""


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else as given."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class MetricsSink(Protocol):
    """Where a stage's statistics go (``cadenza.stream.metrics.Metrics``)."""

    def inc(self, name: str, n: int = 1) -> None: ...
    def gauge(self, name: str, value: float) -> None: ...
    def observe(self, name: str, seconds: float) -> None: ...


class Handler(Protocol[J]):
    """What a model stage provides; the runtime calls it, never two calls at once."""

    def load(self) -> None:
        """Load the weights and warm up (blocking; once, on the first start)."""

    def reset(self) -> None:
        """Fresh per-session state: on every start, and after a crash before serving again."""

    def run(self, jobs: list[J], post: Post) -> int:
        """Apply a drained burst in order; answer through ``post`` (on the model thread, or on
        the loop inline); return how many requests it answered. May raise: the stage then goes
        down, ``fallback`` gets the burst, and the stage restarts."""

    def fallback(self, jobs: list[J]) -> int:
        """Answer these jobs without the model, now, on the loop; return how many of them were
        requests still unanswered (counted as fallbacks). After a crash it gets the whole burst,
        so it must leave alone what ``run`` already answered."""


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th restart in a row. With ``at_once`` the first is immediate (a one-off
    fault costs no downtime beyond the failed requests), then ``first``, ``2 * first``, ... up to
    ``cap``: a model that keeps failing is retried ever less often instead of in a hot loop. A
    stage that served ``healthy_s`` since its last restart counts from n = 1 again."""

    first: float = 0.05
    cap: float = 2.0
    at_once: bool = True
    healthy_s: float = 10.0

    def delay(self, n: int) -> float:
        if self.at_once:
            if n <= 1:
                return 0.0
            n -= 1
        return min(self.cap, self.first * 2.0 ** max(0, n - 1))


DEFAULT_BACKOFF = Backoff()


@dataclass
class StageStats:
    """Written by the stage's own thread (or inline, by the loop); read by the engine."""

    requests: int = 0
    batches: int = 0
    max_batch: int = 0
    crashes: int = 0
    restarts: int = 0
    fallbacks: int = 0
    prepared: int = 0  # velocity: notes whose hidden side was computed ahead (see VelocityBatcher)
    # model time per batch, seconds; the engine moves them into its histogram ``model_<stage>``.
    # A deque: append and popleft are safe across the two threads, and it stays bounded when
    # nobody publishes (a bench, a test).
    model_s: deque = field(default_factory=lambda: deque(maxlen=4096))

    def record_batch(self, requests: int, seconds: float) -> None:
        self.requests += requests
        self.batches += 1
        self.max_batch = max(self.max_batch, requests)
        self.model_s.append(seconds)

    COUNTERS = ("requests", "batches", "crashes", "restarts", "fallbacks")


class _Kill:
    """Queue marker: raise StageKilled when reached."""


class _Stop:
    """Queue marker: the thread ends."""


_KILL, _STOP = _Kill(), _Stop()


class ModelStage(Generic[J]):
    """One model, its jobs, its thread (or none, inline), its supervision. See the module doc."""

    def __init__(
        self,
        handler: Handler[J],
        *,
        name: str,
        inline: bool = False,
        max_drain: int = 256,
        backoff: Backoff = DEFAULT_BACKOFF,
        stats: StageStats | None = None,
    ) -> None:
        self.handler = handler
        self.name = name
        self.inline = inline
        self.max_drain = max_drain
        self.backoff = backoff
        self.stats = stats if stats is not None else StageStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded = False
        self._alive = False
        self._stopped = True
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list = []  # inline: (job, deadline) since the last flush()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[Event, ModelStage], None]] = []
        self._restart_timer: asyncio.TimerHandle | None = None
        self._failures = 0  # crashes in a row (see Backoff)
        self._started_at = 0.0
        self.last_error: str | None = None
        self.restart_delay: float | None = None  # the backoff before the restart now pending
        self._published: dict[str, int] = {}  # counters already in the metrics (see publish)

    # ---- lifecycle (loop thread; start() may run in asyncio.to_thread) --------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, f"{self.name} stage used before start()"
        return self._loop

    @property
    def alive(self) -> bool:
        """Serving now. A flag, not ``Thread.is_alive()``: read for every request."""
        return self._alive

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load and warm up the model once (blocking), then serve with fresh state."""
        self._loop = loop
        if not self._loaded:
            self.handler.load()
            self._loaded = True
        self._stopped = False
        self._serve()

    def stop(self) -> None:
        """Stop serving; what is still queued gets its fallback. Safe to call twice."""
        self._stopped = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put((_STOP, None))
            thread.join(5.0)
        self._alive = False
        self._fallback(self._take_queued())

    def kill(self) -> None:
        """Fault drill: the model raises :class:`StageKilled` where it runs, as if it had failed."""
        if not self._alive:
            return
        self._put(_KILL, None)
        if self.inline:
            self.flush()

    def listen(self, fn: Callable[[Event, ModelStage], None]) -> Callable[[], None]:
        """Call ``fn(event, stage)`` on the loop at each crash and restart; returns the undo."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def publish(self, metrics: MetricsSink) -> None:
        """The statistics into the engine's metrics (on the loop): ``<name>_requests`` ... as
        counters, ``<name>_queue`` and ``<name>_max_batch`` as gauges, model time per batch as
        the histogram ``model_<name>``."""
        st, name = self.stats, self.name
        for what in StageStats.COUNTERS:
            key, value = f"{name}_{what}", getattr(st, what)
            if value != self._published.get(key, 0):
                metrics.inc(key, value - self._published.get(key, 0))
                self._published[key] = value
        metrics.gauge(f"{name}_queue", self.queue_depth())
        metrics.gauge(f"{name}_max_batch", st.max_batch)
        while st.model_s:
            metrics.observe(f"model_{name}", st.model_s.popleft())

    def _serve(self) -> None:
        self.handler.reset()
        self._queue = queue.SimpleQueue()
        self._pending = []
        self._started_at = time.monotonic()
        self._alive = True
        if not self.inline:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-model", daemon=True)
            self._thread.start()

    # ---- jobs (loop thread, never block) ----------------------------------------------------

    def submit(self, job: J, deadline: float | None = None) -> bool:
        """Queue a job (``deadline``: ``time.monotonic()`` after which it is not worth running).
        While the stage is down the job gets its fallback at once; returns False then."""
        if not self._alive:
            self._fallback([job])
            return False
        self._put(job, deadline)
        return True

    def later(self, job: J) -> None:
        """For the handler itself, from ``run``: queue follow-up work behind what is waiting, so
        that other jobs get their turn (an inline stage runs it at the next flush)."""
        self._put(job, None)

    def _put(self, job: object, deadline: float | None) -> None:
        if self.inline:
            self._pending.append((job, deadline))
        else:
            self._queue.put((job, deadline))

    def queue_depth(self) -> int:
        return len(self._pending) if self.inline else self._queue.qsize()

    def flush(self) -> None:
        """Inline: run everything submitted since the last flush, now (a no-op for a thread)."""
        if not self._pending:
            return
        items, self._pending = self._pending, []
        try:
            self._run_batch(items, _call_now)
        except Exception as exc:  # noqa: BLE001 -- whatever the model raised: the one failure policy
            self._down(exc, items)

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        post = self.loop.call_soon_threadsafe
        me = threading.current_thread()
        while True:
            items = [self._queue.get()]
            while len(items) < self.max_drain:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = next((i for i, (job, _) in enumerate(items) if job is _STOP), None)
            if stop is not None:
                items = items[:stop]
            try:
                self._run_batch(items, post)
            except Exception as exc:  # noqa: BLE001 -- the model failed: go down, the loop answers and restarts
                self._alive = False
                post(self._down, exc, items, me)
                return
            if stop is not None:
                return

    def _run_batch(self, items: list, post: Post) -> None:
        jobs: list = []
        late: list = []
        now = time.monotonic()
        for job, deadline in items:
            if job is _KILL:
                raise StageKilled(f"{self.name} model killed on request")
            if deadline is not None and now > deadline:
                late.append(job)
            else:
                jobs.append(job)
        if late:  # past their deadline while queued: fallback, not a model call nobody can use
            post(self._fallback, late)
        if jobs:
            t0 = time.perf_counter()
            n = self.handler.run(jobs, post)
            if n:
                self.stats.record_batch(n, time.perf_counter() - t0)

    # ---- failure policy (loop thread) ---------------------------------------------------------

    def _down(self, exc: Exception, items: list, thread: threading.Thread | None = None) -> None:
        if thread is not None and thread is not self._thread:
            return  # a thread from before a stop(): nothing of it is served any more
        self._alive = False
        self._thread = None
        self.stats.crashes += 1
        self.last_error = str(exc)
        self._failures = 1 if time.monotonic() - self._started_at >= self.backoff.healthy_s else self._failures + 1
        delay = self.restart_delay = self.backoff.delay(self._failures)
        log.error(
            "%s model crashed (%s): requests fall back; restarting %s", self.name, exc, f"in {delay * 1e3:.0f} ms" if delay else "now"
        )
        self._notify("crash")  # first: a listener cuts what the failed jobs had started
        self._fallback([job for job, _ in items if job is not _KILL and job is not _STOP] + self._take_queued())
        if not self._stopped:
            self._restart_timer = self.loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        self._restart_timer = None
        self.restart_delay = None
        if self._stopped:
            return
        self.stats.restarts += 1
        self._serve()
        log.warning("%s model restarted", self.name)
        self._notify("restart")

    def _take_queued(self) -> list:
        items, self._pending = self._pending, []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [job for job, _ in items if job is not _KILL and job is not _STOP]

    def _fallback(self, jobs: list) -> None:
        if jobs:
            self.stats.fallbacks += self.handler.fallback(jobs)

    def _notify(self, event: Event) -> None:
        for fn in list(self._listeners):
            fn(event, self)


def _call_now(fn: Callable[..., object], *args: object) -> None:
    fn(*args)
