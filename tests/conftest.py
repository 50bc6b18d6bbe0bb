"""Shared fixtures: real components, started and stopped by the tests themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cadenza.config.settings import load_settings


@pytest.fixture(scope="session")
def settings():
    return load_settings()


@pytest.fixture(scope="session")
def maestro_root(settings) -> Path:
    root = settings.data.maestro
    if not (root / "maestro-v2.0.0.csv").is_file():
        pytest.skip(f"MAESTRO not found at {root} (set CADENZA_DATA__ROOT)")
    return root


@pytest.fixture()
def jack_server(tmp_path):
    """A private JACK server with the dummy driver (48 kHz, 64 frames)."""
    if shutil.which("jackd") is None:
        pytest.fail("jackd not installed: the JACK tests need it (apt-get install jackd2)")
    from cadenza.harness.jack import JackServer

    # A longer period than the benchmarks use: these tests check behaviour, and on a loaded
    # 2-core machine a 1.3 ms cycle in a non-realtime process misses deadlines.
    with JackServer(period=256, log=tmp_path / "jackd.log") as server:
        yield server
