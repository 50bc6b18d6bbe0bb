"""`cadenza bench device`: every GPU path of the models, measured in one command.

* ``velocity_step``: the live causal step at batch 1 (one performer) and 64 (a busy daemon), per
  round as the worker runs it (inputs in, velocities read back), for the plain torch step
  ("eager") and the static-shape step (``static``: CUDA graphs on a GPU, see
  models/velocity/static.py); on a CPU also the numpy step the CPU worker uses.
* ``phrase_decode``: tokens/s of one-token decode steps after a prompt, with sampling and the
  tokens read back each step as the live path does, and the time to first note (from the end
  of a prefilled phrase until every row has sampled a NOTE_ON), at batch 1 and at N = 8
  candidates (best-of-N), eager cached forward vs the static decoder (models/phrase/static.py).
* ``colorize``: the causal model over the MAESTRO test split (when ``data.root`` holds it, else
  synthetic pieces) as padded batches on the device; per-piece MAE when the files are real.
* ``train``: optimizer steps/s of the velocity and phrase models at their training batch sizes on
  random data, with bf16 autocast + fused AdamW + torch.compile on a GPU, fp32 eager on a CPU.

On a machine without a GPU it says so in one line (stderr) and measures the CPU forms of the
same paths with smaller counts. Figures are for docs/benchmarks.md, not for code comments.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    steps: int  # timed velocity rounds per (batch, form)
    prompt: int  # phrase context before decoding
    tokens: int  # decoded tokens per (batch, form)
    calls: int  # time-to-first-note calls
    pieces: int  # colorize: synthetic pieces (or MAESTRO test files at most)
    train_steps: int  # timed training steps per model
    small_train: bool  # shorter training windows (CPU --quick)


GPU = Counts(steps=2000, prompt=512, tokens=256, calls=30, pieces=10_000, train_steps=50, small_train=False)
CPU = Counts(steps=300, prompt=256, tokens=64, calls=5, pieces=8, train_steps=3, small_train=False)
QUICK = Counts(steps=10, prompt=24, tokens=6, calls=2, pieces=2, train_steps=1, small_train=True)


def register(groups) -> None:
    p = groups["bench"].add_parser("device", help="every GPU path (velocity step, phrase decode, colorize, training) static vs eager")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when present")
    p.add_argument("--quick", action="store_true", help="tiny counts (a smoke test of every path, not a measurement)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)


def _bench(args, settings) -> int:
    import torch

    gpu = torch.cuda.is_available()
    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and gpu) else "cpu"
    if dev == "cpu":
        why = "no GPU present" if not gpu else "--device cpu"
        print(f"cadenza bench device: {why}; measuring the CPU paths" + (" (quick)" if args.quick else ""), file=sys.stderr)
    counts = QUICK if args.quick else GPU if dev == "cuda" else CPU
    if dev == "cpu":  # one thread for torch and numpy's BLAS, as the live CPU worker runs (models/worker.py)
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        threadpool_limits(1, user_api="blas")
    result: dict = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "gpu": dev == "cuda",
        "torch": torch.__version__,
        "quick": bool(args.quick),
    }
    t0 = time.perf_counter()
    result["velocity_step"] = velocity_steps(dev, counts)
    result["phrase_decode"] = phrase_decode(dev, counts)
    result["colorize"] = colorize(dev, counts, settings.data.maestro)
    result["train"] = train_rates(dev, counts)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result) if args.json else format_device(result))
    return 0


def _sync(dev: str) -> None:
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()


def _us(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e6
    return {"n": len(a), "p50_us": round(float(np.percentile(a, 50)), 1), "p99_us": round(float(np.percentile(a, 99)), 1)}


# ---- velocity step ---------------------------------------------------------------------------


def velocity_steps(dev: str, c: Counts) -> dict:
    """µs per batched round, per batch size and form (see module doc)."""
    import torch

    from cadenza.models.velocity.causal import NumpyCausalStep, load_causal
    from cadenza.models.velocity.static import StaticVelocityStep

    model = load_causal(device=dev)
    forms = {"eager": model, "static": StaticVelocityStep(model)}
    if dev == "cpu":
        forms["numpy"] = NumpyCausalStep(model)
    out: dict = {"graphed": forms["static"].graphed, "fallback_reason": forms["static"].fallback_reason}
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        xs = rng.normal(size=(16, batch, model.n_features)).astype(np.float32)
        for name, step in forms.items():
            state = step.initial_state(batch)
            times = []
            for i in range(c.steps + 10):  # the first rounds warm caches up: not timed
                t = time.perf_counter()
                x = xs[i % 16] if name == "numpy" else torch.from_numpy(xs[i % 16]).to(dev)
                v, state = step.step(x, state)
                v = v if name == "numpy" else v.cpu()  # the worker reads velocities back each round
                if i >= 10:
                    times.append(time.perf_counter() - t)
            out[f"batch{batch}_{name}"] = _us(times)
    return out


# ---- phrase decode ---------------------------------------------------------------------------


def phrase_decode(dev: str, c: Counts) -> dict:
    """Decode tokens/s and time to first note, batch 1 and 8, eager vs static."""
    import torch

    from cadenza.models.phrase.bench import synthetic_prompt
    from cadenza.models.phrase.model import load_phrase
    from cadenza.models.phrase.static import StaticDecoder

    model = load_phrase(device=dev)
    prompt = synthetic_prompt(min(c.prompt, model.config.block_size // 2))
    max_len = min(model.config.block_size, len(prompt) + max(c.tokens, 64) + 1)
    out: dict = {"prompt_tokens": len(prompt)}
    for batch in (1, 8):
        eager = _EagerDecoder(model, batch, max_len)
        static = StaticDecoder(model, batch=batch, max_len=max_len)
        out.setdefault("graphed", static.graphed)
        out.setdefault("fallback_reason", static.fallback_reason)
        for name, dec in (("eager", eager), ("static", static)):
            gen = torch.Generator(device=dev).manual_seed(0)
            dec.reset()
            first = dec.prefill(prompt).clone()
            _decode(dec, first, min(8, c.tokens), gen)  # warm-up
            dec.cache.pos = len(prompt)
            _sync(dev)
            t = time.perf_counter()
            _decode(dec, first, c.tokens, gen)
            dt = time.perf_counter() - t
            ttfn = []
            for _ in range(c.calls):
                dec.cache.pos = len(prompt)
                t = time.perf_counter()
                _first_notes(dec, first, gen)
                ttfn.append(time.perf_counter() - t)
            a = np.asarray(ttfn) * 1e3
            out[f"batch{batch}_{name}"] = {
                "tokens_per_s": round(batch * c.tokens / dt, 1),
                "steps_per_s": round(c.tokens / dt, 1),
                "ttfn_ms_p50": round(float(np.percentile(a, 50)), 3),
                "ttfn_ms_p99": round(float(np.percentile(a, 99)), 3),
            }
    return out


class _EagerDecoder:
    """The plain cached forward with the StaticDecoder's interface (prefill/step/reset/cache)."""

    def __init__(self, model, batch: int, max_len: int) -> None:
        self.model, self.batch = model, batch
        self.cache = model.new_cache(batch=batch, max_len=max_len)

    def reset(self) -> None:
        self.cache.reset()

    def prefill(self, tokens: list[int]):
        import torch

        with torch.inference_mode():
            idx = torch.tensor([tokens], device=self.model.wte.weight.device).expand(self.batch, -1)
            return self.model(idx, self.cache, last_only=True)[:, -1]

    def step(self, tokens):
        import torch

        with torch.inference_mode():
            return self.model(tokens.view(self.batch, 1), self.cache, last_only=True)[:, -1]


def _sample(logits, gen):
    import torch

    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)[:, 0]  # (B,)


def _decode(dec, logits, n: int, gen) -> None:
    for _ in range(n):
        tok = _sample(logits, gen)
        tok.cpu()  # the live path reads each token (to schedule its event) before the next step
        logits = dec.step(tok)


def _first_notes(dec, logits, gen, limit: int = 64) -> None:
    """Decode until every row has sampled a NOTE_ON (or ``limit`` steps)."""
    from cadenza.models.phrase import tokens as tk

    seen = np.zeros(dec.batch, bool)
    for _ in range(limit):
        tok = _sample(logits, gen)
        t = tok.cpu().numpy()
        seen |= (t >= tk.NOTE_ON0) & (t < tk.NOTE_ON0 + 128)
        if seen.all():
            return
        logits = dec.step(tok)


# ---- colorize --------------------------------------------------------------------------------


def colorize(dev: str, c: Counts, maestro) -> dict:
    """The causal model over whole pieces as padded batches on ``dev``."""
    import torch

    from cadenza.midifile import MidiFile
    from cadenza.models.velocity.causal import load_causal, padded, padded_batches
    from cadenza.models.velocity.features import causal_features, synthetic_performance

    if (maestro / "maestro-v2.0.0.csv").is_file():
        from cadenza.models.velocity.data import maestro_pieces

        source = "MAESTRO test"
        perfs = [MidiFile.load(f).performance for f in maestro_pieces(maestro, "test")[: c.pieces]]
    else:
        source = "synthetic"
        perfs = [synthetic_performance(3000, seed=s) for s in range(min(c.pieces, 64))]
    t = time.perf_counter()
    feats = [causal_features(p).astype(np.float32) for p in perfs]
    features_s = time.perf_counter() - t
    model = load_causal(device=dev)
    preds: list[np.ndarray] = [np.zeros(0)] * len(feats)
    _sync(dev)
    t = time.perf_counter()
    with torch.inference_mode():
        for ks in padded_batches([len(f) for f in feats], 64 if dev == "cuda" else 16):
            v, _ = model(padded(feats, ks).to(dev))
            v = v.clamp(1.0, 127.0).cpu().numpy()
            for r, k in enumerate(ks):
                preds[k] = v[r, : len(feats[k])]
    model_s = time.perf_counter() - t
    notes = sum(len(f) for f in feats)
    res = {
        "source": source,
        "pieces": len(perfs),
        "notes": notes,
        "features_s": round(features_s, 2),
        "model_s": round(model_s, 3),
        "model_notes_per_s": round(notes / model_s),
    }
    if source != "synthetic":
        res["piece_mae"] = round(float(np.mean([np.abs(p - q.velocity).mean() for p, q in zip(preds, perfs) if len(q)])), 3)
    return res


# ---- training step rate ----------------------------------------------------------------------


def train_rates(dev: str, c: Counts) -> dict:
    """Optimizer steps/s of both models at their training batch sizes (random data)."""
    import torch

    from cadenza.models.phrase.model import PhraseConfig, PhraseModel
    from cadenza.models.phrase.tokens import VOCAB_SIZE
    from cadenza.models.phrase.train import TrainOptions, make_optimizer, train_step
    from cadenza.models.velocity.causal import CausalVelocityModel

    gpu = dev == "cuda"
    out: dict = {"fused_adamw": gpu}

    # velocity: the defaults of train_velocity (batch 32 windows of 256 notes)
    vb, vt = (4, 32) if c.small_train else (32, 256)

    def velocity(fast: bool):
        vel = CausalVelocityModel().to(dev)
        x = torch.randn(vb, vt, vel.n_features, device=dev)
        y = torch.rand(vb, vt, device=dev) * 126 + 1
        opt = torch.optim.AdamW(vel.parameters(), lr=2e-3, weight_decay=1e-4, fused=gpu)
        fwd = torch.compile(vel) if fast else vel

        def step() -> None:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=fast):
                pred, _ = fwd(x)
            loss = (pred.float() - y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vel.parameters(), 1.0)
            opt.step()

        return step

    # phrase: the defaults of `cadenza train phrase` (batch 16 windows of 512 tokens, width 128)
    o = TrainOptions()
    pb, pt = (2, 64) if c.small_train else (o.batch, o.seq_len)

    def phrase(fast: bool):
        ph = PhraseModel(PhraseConfig(block_size=pt, n_layer=o.n_layer, n_head=o.n_head, n_embd=o.n_embd)).to(dev)
        toks = torch.randint(0, VOCAB_SIZE, (pb, pt + 1), device=dev)
        opt = make_optimizer(ph, o)
        fwd = torch.compile(ph) if fast else ph
        return lambda: train_step(fwd, opt, toks, None, bf16=fast)

    for name, make, shape in (("velocity", velocity, (vb, vt)), ("phrase", phrase, (pb, pt))):
        out[name] = _fast_or_plain(make, gpu, dev, c.train_steps) | {"batch": shape[0], "seq_len": shape[1]}
    return out


def _fast_or_plain(make, fast: bool, dev: str, n: int) -> dict:
    """Steps/s with bf16 autocast + torch.compile (``fast``; compiling happens in the untimed
    warm-up), or fp32 eager. If the fast form fails (a compiler toolchain or a bf16 kernel
    missing), the reason is recorded and fp32 eager is measured instead."""
    if fast:
        try:
            return _rate(make(True), dev, n, warm=3) | {"bf16": True, "compiled": True}
        except Exception as exc:  # noqa: BLE001  one missing piece must not stop the other figures
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            return _rate(make(False), dev, n, warm=1) | {"bf16": False, "compiled": False, "fast_error": reason}
    return _rate(make(False), dev, n, warm=1) | {"bf16": False, "compiled": False}


def _rate(step, dev: str, n: int, *, warm: int) -> dict:
    t = time.perf_counter()
    for _ in range(warm):
        step()
    _sync(dev)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        step()
    _sync(dev)
    dt = time.perf_counter() - t
    return {"steps": n, "steps_per_s": round(n / dt, 2), "warmup_s": round(warm_s, 1)}


# ---- report ----------------------------------------------------------------------------------


def format_device(r: dict) -> str:
    lines = [f"device {r['device']} (torch {r['torch']}){'  [quick: not a measurement]' if r['quick'] else ''}"]
    v = r["velocity_step"]
    lines.append(f"velocity step (µs per round, input in, velocities read back){'' if v['graphed'] else '  static: no CUDA graph'}")
    for k, s in v.items():
        if k.startswith("batch"):
            lines.append(f"  {k:18s} p50 {s['p50_us']:9.1f}  p99 {s['p99_us']:9.1f}")
    p = r["phrase_decode"]
    lines.append(f"phrase decode after {p['prompt_tokens']} prompt tokens{'' if p['graphed'] else '  (static: no CUDA graph)'}")
    for k, s in p.items():
        if k.startswith("batch"):
            lines.append(
                f"  {k:18s} {s['tokens_per_s']:9.1f} tokens/s  first note p50 {s['ttfn_ms_p50']:8.2f} ms  p99 {s['ttfn_ms_p99']:8.2f} ms"
            )
    c = r["colorize"]
    mae = f", per-piece MAE {c['piece_mae']}" if "piece_mae" in c else ""
    lines.append(
        f"colorize {c['source']}: {c['pieces']} pieces, {c['notes']} notes: model {c['model_s']:.2f} s "
        f"({c['model_notes_per_s']} notes/s), features {c['features_s']:.1f} s on the CPU{mae}"
    )
    t = r["train"]
    for name in ("velocity", "phrase"):
        s = t[name]
        mode = ("bf16 autocast, compiled" if s["bf16"] else "fp32 eager") + (", fused AdamW" if t["fused_adamw"] else "")
        failed = f"; bf16/compile failed: {s['fast_error']}" if "fast_error" in s else ""
        lines.append(
            f"train {name:8s} batch {s['batch']} x {s['seq_len']}: {s['steps_per_s']:.2f} steps/s ({mode}; warm-up {s['warmup_s']} s{failed})"
        )
    lines.append(f"total {r['total_s']} s")
    return "\n".join(lines)
