"""The `cadenza` command's contract: one clear line and a non-zero exit on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def cadenza(*args, env=None, timeout=120):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "cadenza", *args], capture_output=True, text=True, env=e, timeout=timeout)


def test_config_show_round_trips(tmp_path):
    r = cadenza("config", "show", env={"CADENZA_VELOCITY__DEADLINE_MS": "2.5"})
    assert r.returncode == 0 and "deadline_ms = 2.5" in r.stdout
    path = tmp_path / "c.toml"
    path.write_text(r.stdout)
    again = cadenza("--config", str(path), "config", "show")
    assert again.returncode == 0 and again.stdout == r.stdout


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        (["config", "show"], {"CADENZA_VELOCITY__DEADLINE_MS": "abc"}, "velocity.deadline_ms"),
        (["--config", "/nonexistent.toml", "config", "show"], {}, "not found"),
        (["serve", "--strength", "3"], {}, "velocity.strength"),
    ],
)
def test_bad_config_is_one_line(args, env, fragment):
    r = cadenza(*args, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_no_backend_says_how_to_start_one(tmp_path):
    # A server name nobody runs: JACK is not there, and there is no ALSA sequencer here.
    r = cadenza("serve", "--midi-api", "jack", env={"JACK_DEFAULT_SERVER": "cadenza-none-here", "JACK_NO_START_SERVER": "1"})
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "no JACK server running" in last and "jackd" in last


@pytest.mark.jack
def test_unknown_port_lists_the_available_ones(jack_server):
    r = cadenza("serve", "--midi-api", "jack", "--attach-in", "--in", "Keystation 49")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "input port 'Keystation 49' not found; available:" in last


@pytest.mark.jack
def test_ports_lists_jack_ports(jack_server):
    import rtmidi

    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, "keys")
    out.open_virtual_port("keyboard")
    try:
        r = cadenza("ports")
        assert r.returncode == 0
        assert "jack:" in r.stdout and "keys:keyboard" in r.stdout
    finally:
        out.delete()


def test_bench_velocity_reports_both_forms_and_regimes(capsys):
    """The per-note cost bench runs the shipped causal model and prints every figure it promises
    (a smoke test of the command, not a timing assertion)."""
    from cadenza.cli import main

    assert main(["bench", "velocity", "--notes", "40", "--gap-ms", "0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for form in ("numpy", "torch"):
        for regime in ("back_to_back", "live"):
            r = res[f"{form}_{regime}"]
            assert r["features_p50_ms"] > 0 and r["step_p50_ms"] > 0 and r["total_p50_ms"] <= r["total_p99_ms"]
