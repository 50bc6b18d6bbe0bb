"""The engine's metrics for Prometheus: a collector over the live :class:`Metrics`, served over HTTP.

Nothing is copied on the hot path: the collector reads the counters, gauges and histograms when
Prometheus scrapes, from the server's thread. The engine asks for GIL handovers every 0.25 ms
while it runs (``Engine.run``), so a scrape delays the event loop by at most that much at a time.

Names: every counter is ``cadenza_<name>_total``, every gauge ``cadenza_<name>``, every latency
histogram ``cadenza_<name>_seconds`` with the buckets of :data:`BUCKETS_S`, and ``cadenza_info``
carries the version, mode, device and role as labels.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from importlib import metadata
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from cadenza.config.settings import MetricsSettings
from cadenza.errors import ConfigError
from cadenza.stream.metrics import _EDGES as FINE_EDGES
from cadenza.stream.metrics import Metrics

log = logging.getLogger(__name__)

# Bucket upper bounds (seconds) as Prometheus sees them: 0.1 ms to 10 s, dense where the
# engine's latencies live (well under a millisecond to a few). Each is counted from the fine
# log buckets of `LatencyHistogram` (about 2 % wide) whose upper edge is at or below it, so a
# bucket never counts a value above its bound; values within 2 % under a bound land in the next.
BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_FINE_INDEX = np.searchsorted(FINE_EDGES, np.array(BUCKETS_S) * (1 + 1e-9), side="right") - 1

# Present from the start, so that rate() works before the first drop or miss: the counters the
# periodic stats line always prints. Others appear when first counted (or declared with inc(name, 0)).
ALWAYS_COUNTERS = ("in", "out", "note_on", "deadline_miss", "dropped")

POLL_S = 0.05  # how often the server thread looks for a shutdown: what closing it can take


def metric_name(name: str) -> str:
    """``cadenza_`` + the engine's name, with anything Prometheus does not allow as ``_``."""
    return "cadenza_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


class EngineCollector:
    """A ``prometheus_client`` collector reading a live :class:`Metrics` at each scrape."""

    def __init__(self, metrics: Metrics, info: Mapping[str, str] | None = None) -> None:
        self.metrics = metrics
        self.info = {"version": _version(), **{k: str(v) for k, v in (info or {}).items()}}

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        info = InfoMetricFamily("cadenza", "Cadenza's version and what this process runs")
        info.add_metric([], self.info)
        yield info
        # list() of a dict's items runs in C under the GIL: the loop cannot add a key meanwhile.
        counters = dict.fromkeys(ALWAYS_COUNTERS, 0) | dict(list(m.counters.items()))
        for name, value in sorted(counters.items()):
            yield CounterMetricFamily(metric_name(name), f"engine counter {name}", value=value)
        for name, value in sorted(list(m.gauges.items())):
            yield GaugeMetricFamily(metric_name(name), f"engine gauge {name}", value=float(value))
        for name, hist in sorted(list(m.hist.items())):
            # The count is read from the buckets themselves, so +Inf and _count agree even when
            # the loop records a value during the scrape.
            cumulative = np.cumsum(hist.counts)
            buckets = [(repr(le), int(cumulative[i])) for le, i in zip(BUCKETS_S, _FINE_INDEX)]
            buckets.append(("+Inf", int(cumulative[-1])))
            yield HistogramMetricFamily(
                metric_name(name) + "_seconds", f"engine latency {name} in seconds", buckets=buckets, sum_value=hist.total
            )


def _version() -> str:
    try:
        return metadata.version("cadenza")
    except metadata.PackageNotFoundError:
        return "unknown"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per scrape would drown the log
        pass


class PrometheusExporter:
    """The collector in a private registry (several exporters may live in one process), served
    over HTTP from a daemon thread once :meth:`start` is called. ``close()`` is safe twice."""

    def __init__(self, metrics: Metrics, *, info: Mapping[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(metrics, info))
        # What every Prometheus user expects beside the application's own: CPU, memory, open
        # files, Python version, garbage collections (a collection is a pause on the loop).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.url: str | None = None
        self._server: ThreadingWSGIServer | None = None
        self._thread = None

    def start(self, host: str, port: int) -> None:
        """Listen on host:port (0 = any free port); ConfigError in one line if that fails."""
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("PrometheusServer", (ThreadingWSGIServer,), {"address_family": family})
            server = make_server(host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason, fix = "in use", "set metrics.prometheus_port to a free port"
            else:  # not an address of this machine, or a name that does not resolve
                reason, fix = exc.strerror or str(exc), "check metrics.prometheus_host"
            raise ConfigError(f"cannot serve metrics on {host}:{port} ({reason}): {fix}") from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(POLL_S,), name="prometheus", daemon=True)
        self._thread.start()
        bound = server.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"
        log.info("metrics: Prometheus endpoint on %s", self.url)

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_address[1]

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # waits for the thread's loop: up to POLL_S
        server.server_close()
        self._thread.join()
        self.url = None

    def __enter__(self) -> PrometheusExporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prometheus_exporter(settings: MetricsSettings, metrics: Metrics, *, info: Mapping[str, str] | None = None) -> PrometheusExporter:
    """The exporter for ``settings``, already listening, for a ``with`` block; when
    ``settings.prometheus_port`` is unset it listens nowhere and ``url`` is None."""
    exporter = PrometheusExporter(metrics, info=info)
    if settings.prometheus_port is not None:
        exporter.start(settings.prometheus_host, settings.prometheus_port)
    return exporter
