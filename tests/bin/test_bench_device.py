"""`cadenza bench device`: on a machine without a GPU it says so and still runs every path (the
CPU forms), with figures for each in its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_device_quick_without_gpu_runs_every_path(tmp_path):
    # No GPU visible (also on a GPU machine) and no data: the synthetic colorize path.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CADENZA_DATA__ROOT=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "cadenza", "bench", "device", "--json", "--quick"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "no GPU present" in r.stderr
    out = json.loads(r.stdout)
    assert out["gpu"] is False and out["device"] == "cpu" and out["quick"] is True
    v = out["velocity_step"]
    assert v["graphed"] is False
    for batch in (1, 64):
        for form in ("eager", "static", "numpy"):
            s = v[f"batch{batch}_{form}"]
            assert s["n"] > 0 and 0 < s["p50_us"] <= s["p99_us"]
    p = out["phrase_decode"]
    assert p["graphed"] is False and p["prompt_tokens"] > 0
    for batch in (1, 8):
        for form in ("eager", "static"):
            s = p[f"batch{batch}_{form}"]
            assert s["tokens_per_s"] > 0 and 0 < s["ttfn_ms_p50"] <= s["ttfn_ms_p99"]
            assert abs(s["tokens_per_s"] - batch * s["steps_per_s"]) <= 0.01 * s["tokens_per_s"] + 0.2
    c = out["colorize"]
    assert c["source"] == "synthetic" and c["pieces"] > 0 and c["notes"] > 0 and c["model_notes_per_s"] > 0
    t = out["train"]
    assert t["fused_adamw"] is False
    for name in ("velocity", "phrase"):
        assert t[name]["steps"] >= 1 and t[name]["steps_per_s"] > 0
        assert t[name]["bf16"] is False and t[name]["compiled"] is False and "fast_error" not in t[name]


def test_bench_device_table_names_each_path(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CADENZA_DATA__ROOT=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "cadenza", "bench", "device", "--quick"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    for fragment in (
        "velocity step",
        "batch64_static",
        "phrase decode",
        "batch8_static",
        "colorize synthetic",
        "train phrase",
        "train velocity",
    ):
        assert fragment in r.stdout, r.stdout
