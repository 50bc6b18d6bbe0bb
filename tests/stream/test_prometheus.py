"""The Prometheus endpoint: scraped over HTTP and parsed as Prometheus would."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cadenza.config.settings import MetricsSettings, Settings, load_settings, to_toml
from cadenza.errors import ConfigError
from cadenza.stream.metrics import Metrics
from cadenza.stream.prometheus import BUCKETS_S, prometheus_exporter

from .conftest import running_service


def scrape(url: str) -> dict:
    """name -> family, from the text the endpoint serves."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(family, suffix: str = "", **labels) -> float:
    (value,) = [s.value for s in family.samples if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]
    return value


def histogram(family) -> tuple[list[tuple[float, float]], float, float]:
    """(le, cumulative count) in exposition order, _count, _sum."""
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    return buckets, sample(family, "_count"), sample(family, "_sum")


def busy_metrics() -> Metrics:
    m = Metrics()
    m.inc("in", 5)
    m.inc("dropped_session", 2)
    m.gauge("sessions", 3)
    for seconds in (0.0002, 0.0002, 0.0012, 0.004, 0.2, 30.0):  # the last one beyond the finest bucket
        m.observe("internal", seconds)
    return m


def test_a_scrape_parses_and_follows_the_live_metrics():
    m = busy_metrics()
    with prometheus_exporter(MetricsSettings(prometheus_port=0), m, info={"mode": "colorize", "role": "serve"}) as exporter:
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        families = scrape(exporter.url)

        assert families["cadenza_in"].type == "counter" and sample(families["cadenza_in"], "_total") == 5
        assert sample(families["cadenza_dropped_session"], "_total") == 2
        assert sample(families["cadenza_deadline_miss"], "_total") == 0  # always there, before the first miss
        assert families["cadenza_sessions"].type == "gauge" and sample(families["cadenza_sessions"]) == 3
        info = families["cadenza_info"].samples[0]
        assert info.labels["mode"] == "colorize" and info.labels["role"] == "serve" and info.labels["version"]
        assert "process_cpu_seconds" in families  # the standard process metrics beside ours

        lat = families["cadenza_internal_seconds"]
        assert lat.type == "histogram"
        buckets, count, total = histogram(lat)
        assert [le for le, _ in buckets] == [*BUCKETS_S, float("inf")]
        counts = [c for _, c in buckets]
        assert counts == sorted(counts)  # cumulative
        assert count == counts[-1] == m.hist["internal"].n == 6
        assert total == pytest.approx(m.hist["internal"].total)
        by_le = dict(buckets)
        assert (by_le[0.0001], by_le[0.00025], by_le[0.0015], by_le[0.005], by_le[0.25], by_le[10.0]) == (0, 2, 3, 4, 5, 5)

        # Nothing was copied at start: the next scrape sees what the engine counted since.
        m.inc("in", 2)
        m.inc("ownership_changes")
        m.gauge("sessions", 1)
        m.observe("internal", 0.0002)
        m.observe("loop_lag", 0.001)
        families = scrape(exporter.url)
        assert sample(families["cadenza_in"], "_total") == 7
        assert sample(families["cadenza_ownership_changes"], "_total") == 1
        assert sample(families["cadenza_sessions"]) == 1
        buckets, count, _ = histogram(families["cadenza_internal_seconds"])
        assert count == 7 and dict(buckets)[0.00025] == 3
        assert histogram(families["cadenza_loop_lag_seconds"])[1] == 1


def test_scrapes_while_the_engine_counts_stay_consistent():
    """The loop keeps counting (and adding names) while the server thread reads."""
    m = Metrics()
    stop, counting = threading.Event(), threading.Event()

    def engine():
        i = 0
        while not stop.is_set():
            m.observe("internal", 1e-4 * (1 + i % 50))
            m.inc(f"counter_{i % 500}")
            m.gauge(f"gauge_{i % 300}", i)
            i += 1
            counting.set()

    worker = threading.Thread(target=engine)
    with prometheus_exporter(MetricsSettings(prometheus_port=0), m) as exporter:
        worker.start()
        try:
            assert counting.wait(10)  # the histogram exists from the first observation on
            for _ in range(20):
                buckets, count, _ = histogram(scrape(exporter.url)["cadenza_internal_seconds"])
                counts = [c for _, c in buckets]
                assert counts == sorted(counts) and count == counts[-1]
        finally:
            stop.set()
            worker.join()


def test_closing_frees_the_port():
    with prometheus_exporter(MetricsSettings(prometheus_port=0), Metrics()) as exporter:
        url, port = exporter.url, exporter.port
        scrape(url)
    assert exporter.url is None and not any(t.name == "prometheus" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    exporter.close()  # safe twice
    with prometheus_exporter(MetricsSettings(prometheus_port=port), Metrics()) as again:
        assert again.port == port and "cadenza_in" in scrape(again.url)


def test_off_by_default():
    settings = Settings()
    assert settings.metrics.prometheus_port is None
    with prometheus_exporter(settings.metrics, Metrics()) as exporter:
        assert exporter.url is None and exporter.port is None
        assert not any(t.name == "prometheus" for t in threading.enumerate())


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as exc:
            prometheus_exporter(MetricsSettings(prometheus_port=port), Metrics())
    msg = str(exc.value)
    assert f"127.0.0.1:{port} (in use)" in msg and "metrics.prometheus_port" in msg and "\n" not in msg


def test_an_address_not_of_this_machine_is_one_line():
    with pytest.raises(ConfigError) as exc:  # TEST-NET-1: nobody's address, refused without asking DNS
        prometheus_exporter(MetricsSettings(prometheus_port=0, prometheus_host="192.0.2.1"), Metrics())
    msg = str(exc.value)
    assert msg.startswith("cannot serve metrics on 192.0.2.1:0") and "metrics.prometheus_host" in msg and "\n" not in msg


def test_settings_from_toml_env_and_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[metrics]\nprometheus_port = 9464\nprometheus_host = "0.0.0.0"\n')
    s = load_settings(path)
    assert (s.metrics.prometheus_port, s.metrics.prometheus_host) == (9464, "0.0.0.0")
    path.write_text(to_toml(s))
    assert load_settings(path) == s
    monkeypatch.setenv("CADENZA_METRICS__PROMETHEUS_PORT", "9465")
    assert load_settings().metrics.prometheus_port == 9465
    with pytest.raises(ConfigError, match="metrics.prometheus_port"):
        load_settings(overrides={"metrics": {"prometheus_port": 70000}})


@pytest.mark.jack
def test_serve_exposes_its_metrics(jack_server):
    with socket.socket() as probe:  # a port free a moment ago; serve takes it again at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    with running_service("colorize", metrics={"prometheus_port": port}) as (svc, player, listener):
        player.send((0x90, 60, 80), (0x80, 60, 0))
        assert listener.wait_for(lambda msgs: len(msgs) >= 2)
        families = scrape(url)
        assert sample(families["cadenza_in"], "_total") >= 2
        assert histogram(families["cadenza_internal_seconds"])[1] >= 1
        info = families["cadenza_info"].samples[0].labels
        assert (info["mode"], info["role"]) == ("colorize", "serve")
        svc.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
