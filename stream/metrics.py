"""Counters and latency histograms, preallocated, cheap enough for the real-time path.

Histograms use fixed log-spaced buckets from 1 µs to 10 s (about 2 % wide), so recording is one
logarithm and an increment (no numpy call on the hot path), and percentiles are read from the
buckets.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

_EDGES = np.logspace(-6, 1, 801)  # seconds
_PER_DECADE = (len(_EDGES) - 1) / 7.0


def bucket(seconds: float) -> int:
    """Index i with _EDGES[i-1] < seconds <= _EDGES[i] (what ``searchsorted`` gives), by arithmetic."""
    if seconds <= _EDGES[0]:
        return 0
    i = math.ceil((math.log10(seconds) + 6.0) * _PER_DECADE - 1e-9)
    return len(_EDGES) if i > len(_EDGES) else i


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = np.zeros(len(_EDGES) + 1, np.int64)
        self.n = 0
        self.max = 0.0
        self.total = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bucket(seconds)] += 1
        self.n += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def percentile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-th percentile (seconds); nan when empty."""
        if self.n == 0:
            return math.nan
        rank = q / 100.0 * self.n
        i = int(np.searchsorted(np.cumsum(self.counts), max(rank, 1)))
        return float(_EDGES[min(i, len(_EDGES) - 1)]) if i < len(_EDGES) else self.max

    def summary_ms(self) -> dict:
        if self.n == 0:
            return {"n": 0}
        return {
            "n": self.n,
            "p50_ms": round(self.percentile(50) * 1e3, 3),
            "p95_ms": round(self.percentile(95) * 1e3, 3),
            "p99_ms": round(self.percentile(99) * 1e3, 3),
            "max_ms": round(self.max * 1e3, 3),
            "mean_ms": round(self.total / self.n * 1e3, 3),
        }


class Metrics:
    """Everything the engine counts; ``snapshot()`` is what the stats log and benches print."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.hist: dict[str, LatencyHistogram] = {}
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, name: str, seconds: float) -> None:
        h = self.hist.get(name)
        if h is None:
            h = self.hist[name] = LatencyHistogram()
        h.record(seconds)

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict:
        return {
            "counters": dict(self.counters),
            "latency": {k: v.summary_ms() for k, v in self.hist.items()},
            "gauges": dict(self.gauges),
        }

    def line(self) -> str:
        """One line for the periodic log."""
        c = self.counters
        parts = [f"in={c['in']}", f"out={c['out']}", f"notes={c['note_on']}", f"misses={c['deadline_miss']}", f"drops={c['dropped']}"]
        for name in ("internal", "model"):
            h = self.hist.get(name)
            if h and h.n:
                parts.append(f"{name} p50={h.percentile(50) * 1e3:.2f}ms p99={h.percentile(99) * 1e3:.2f}ms")
        h = self.hist.get("loop_lag")
        if h and h.n:
            parts.append(f"lag p99={h.percentile(99) * 1e3:.2f}ms")
        for k, v in sorted(self.gauges.items()):
            parts.append(f"{k}={v:g}")
        return " ".join(parts)
