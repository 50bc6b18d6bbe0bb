"""`cadenza bench vae`: encode + greedy decode latency at batch 1 on one core, and prior samples per
second batched (64 at a time, temperature 1), for each shipped model."""

from __future__ import annotations

import time

import numpy as np


def bench(models, repeats: int = 50, batch: int = 64) -> dict:
    import torch

    from .weights import load_model

    torch.set_num_threads(1)
    out = {}
    rng = np.random.default_rng(0)
    for name in models:
        try:
            model, _, _ = load_model(name)
        except Exception as exc:  # a model not trained yet is reported, not fatal
            out[name] = {"error": str(exc)}
            continue
        T = model.cfg.steps
        x = torch.from_numpy(rng.integers(0, model.cfg.vocab, (1, T)))
        times = []
        with torch.inference_mode():
            for i in range(repeats + 3):
                t0 = time.perf_counter()
                mu, _ = model.encode(x)
                model.decode(mu, 0.0)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            z = torch.randn(batch, model.cfg.z_dim)
            model.decode(z, 1.0)
            t0 = time.perf_counter()
            k = 0
            while time.perf_counter() - t0 < 2.0 or k < 2:
                model.decode(z, 1.0)
                k += 1
            sps = k * batch / (time.perf_counter() - t0)
        ms = np.array(times) * 1e3
        out[name] = {
            "steps": T,
            "encode_decode_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "encode_decode_ms_p99": round(float(np.percentile(ms, 99)), 2),
            "batch": batch,
            "samples_per_s": round(sps, 1),
            "threads": 1,
        }
    return out


def format_bench(r: dict) -> str:
    lines = ["MusicVAE on one CPU core: encode + greedy decode at batch 1, prior samples per second at batch 64"]
    for name, v in r.items():
        if "error" in v:
            lines.append(f"  {name:<15} {v['error']}")
        else:
            lines.append(
                f"  {name:<15} {v['steps']:>4} steps  p50 {v['encode_decode_ms_p50']:7.2f} ms  p99 {v['encode_decode_ms_p99']:7.2f} ms"
                f"  {v['samples_per_s']:8.1f} samples/s"
            )
    return "\n".join(lines)
