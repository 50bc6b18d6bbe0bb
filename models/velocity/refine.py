"""The offline refiner: a small bidirectional GRU on top of the full-context model, files only.

The context model's readout sees, for each note, a causal summary of the past and a band of
neighbours (32 notes back, 64 forward). Offline the whole piece is known, so a second pass can
carry information along the piece in both directions: the refiner reads, per note, the context
model's offline velocity, the hidden layer of its readout and the note's own features, runs a
bidirectional GRU over the piece and adds a correction to the velocity. It starts at zero (the
last layer is zero-initialised), so training begins at the context model's accuracy.

The refiner is trained on one particular set of context weights (frozen while it trains); its
JSON records their SHA-256 and it is only used with those weights. It is not used for lookahead,
where a backward pass over the piece would see beyond the horizon.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cadenza.models.velocity.features import N_FEATURES
from cadenza.models.velocity.weights import build_model, load_weights, weights_path

log = logging.getLogger(__name__)


@dataclass
class RefinerConfig:
    n_features: int = N_FEATURES
    context_head: int = 128  # width of the context model's readout hidden layer
    width: int = 128
    hidden: int = 96  # per direction


class OfflineRefiner(nn.Module):
    def __init__(self, cfg: RefinerConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else RefinerConfig()  # a fresh config per model: a shared default would be shared state
        self.cfg = cfg
        self.register_buffer("feat_mean", torch.zeros(cfg.n_features))
        self.register_buffer("feat_std", torch.ones(cfg.n_features))
        self.inp = nn.Linear(1 + cfg.context_head + cfg.n_features, cfg.width)
        self.gru = nn.GRU(cfg.width, cfg.hidden, batch_first=True, bidirectional=True)
        self.out = nn.Sequential(nn.Linear(2 * cfg.hidden + cfg.width, 64), nn.GELU(), nn.Linear(64, 1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, vz: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """vz (B, T, 1 + head): the context model's (velocity - 64) / 32 and readout hidden layer;
        x (B, T, F) raw note features; ``lengths`` (B,) for padded batches (the backward
        direction must start at each piece's own last note). -> velocities (B, T), unclamped."""
        a = torch.relu(self.inp(torch.cat([vz, (x - self.feat_mean) / self.feat_std], -1)))
        if lengths is None:
            g, _ = self.gru(a)
        else:
            packed = pack_padded_sequence(a, lengths.cpu(), batch_first=True, enforce_sorted=False)
            g, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=a.shape[1])
        return 64.0 + 32.0 * (vz[..., 0] + self.out(torch.cat([g, a], -1)).squeeze(-1))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_refiner(context_path: Path | None = None, path: Path | None = None, device: str = "cpu") -> OfflineRefiner | None:
    """The shipped (or given) refiner if it was trained on these context weights, else None
    (with a warning: offline then runs on the context model alone)."""
    path = Path(path) if path else weights_path("offline")
    if not path.is_file():
        return None
    state, doc = load_weights(path)
    context_path = Path(context_path) if context_path else weights_path("context")
    if doc.get("context_sha256") != file_sha256(context_path):
        log.warning("%s was trained on other context weights than %s; offline runs without it", path.name, context_path.name)
        return None
    return build_model("offline refiner", OfflineRefiner, RefinerConfig, state, doc, device)


def refine_many(refiner: OfflineRefiner, vz: list[torch.Tensor], x: list[np.ndarray]) -> list[torch.Tensor]:
    """Refined velocities (unclamped) of several whole pieces, as one packed batch.
    ``vz[k]`` (n_k, 1 + head) from the context readout, ``x[k]`` (n_k, F) their features."""
    lengths = torch.tensor([len(v) for v in vz])
    n = int(lengths.max())
    a = torch.zeros(len(vz), n, vz[0].shape[1])
    b = torch.zeros(len(vz), n, x[0].shape[1])
    for r, (v, f) in enumerate(zip(vz, x)):
        a[r, : len(v)] = v
        b[r, : len(f)] = torch.as_tensor(np.asarray(f, np.float32))
    y = refiner(a, b, lengths if len(vz) > 1 else None)
    return [y[r, : int(lengths[r])] for r in range(len(vz))]


def context_inputs(model, data, batch: int = 16) -> np.ndarray:
    """(N, 1 + head) float16 for every note of a split: the frozen context model's offline
    (velocity - 64) / 32, unclamped, and its readout hidden layer — what the refiner reads."""
    import math

    from cadenza.models.velocity.context import readout_groups

    out = np.zeros((len(data.onset), 1 + model.cfg.head), np.float16)
    pieces = [data.piece(k) for k in range(data.n_pieces)]
    with torch.inference_mode():
        for group in readout_groups(
            model,
            [data.features[s] for s in pieces],
            [data.onset[s] for s in pieces],
            [data.offset[s] for s in pieces],
            [data.pitch[s] for s in pieces],
            batch,
        ):
            for k, read in group:
                out[pieces[k]] = read(math.inf, hidden=True).numpy()
    return out


def cached_context_inputs(model, context_path: Path, data, split: str) -> np.ndarray:
    """:func:`context_inputs`, kept in the cache folder under the context weights' hash."""
    from cadenza.atomic import atomic_path
    from cadenza.models.velocity.data import default_cache_dir

    path = default_cache_dir() / f"offline-inputs-{split}-{file_sha256(context_path)[:16]}.npy"
    if path.is_file():
        z = np.load(path, mmap_mode="r")
        if z.shape == (len(data.onset), 1 + model.cfg.head):
            return z
    log.info("running the context model over MAESTRO %s (once; cached in %s)", split, path)
    z = context_inputs(model, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, z)
    return np.load(path, mmap_mode="r")


def train_refiner(
    maestro: Path,
    *,
    minutes: float = 20.0,
    threads: int = 1,
    seed: int = 0,
    batch: int = 16,
    seq_len: int = 512,
    lr: float = 2e-3,
    epoch_notes: int = 2_000_000,
    limit: int | None = None,
    out: Path | None = None,
    context: Path | None = None,
) -> dict:
    """Train the refiner on MAESTRO train over the frozen context model; best epoch by validation
    per-piece MAE. Writes ``velocity_offline.safetensors`` + ``.json`` (with the context weights'
    hash) + ``.metrics.json``."""
    import json
    import math
    import sys
    import time
    from dataclasses import asdict

    from tqdm import tqdm

    from cadenza.atomic import atomic_path
    from cadenza.models.velocity.context import load_context
    from cadenza.models.velocity.data import load_split, segment_starts
    from cadenza.models.velocity.weights import save_weights

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    context = Path(context) if context else weights_path("context")
    ctx = load_context(context)
    train = load_split(maestro, "train", limit=limit)
    val = load_split(maestro, "validation", limit=None if limit is None else max(4, limit // 4))
    tag = "" if limit is None else f"-{limit}"
    z_train = cached_context_inputs(ctx, context, train, "train" + tag)
    z_val = cached_context_inputs(ctx, context, val, "validation" + tag)
    model = OfflineRefiner(RefinerConfig(n_features=ctx.cfg.n_features, context_head=ctx.cfg.head))
    x = train.features[:: max(1, len(train.onset) // 200_000)].astype(np.float32)
    model.feat_mean.copy_(torch.from_numpy(x.mean(0)))
    model.feat_std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-3)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    vel_val = [val.velocity[val.piece(k)].astype(np.float64) for k in range(val.n_pieces)]

    def validate() -> tuple[float, float]:
        model.eval()
        vz = [torch.from_numpy(z_val[val.piece(k)].astype(np.float32)) for k in range(val.n_pieces)]
        feats = [val.features[val.piece(k)] for k in range(val.n_pieces)]
        refined, base = [], []
        with torch.inference_mode():
            for lo in range(0, val.n_pieces, 16):
                refined += [y.clamp(1, 127).numpy() for y in refine_many(model, vz[lo : lo + 16], feats[lo : lo + 16])]
        for k, y in enumerate(vel_val):
            base.append(np.abs(np.clip(64.0 + 32.0 * vz[k][:, 0].numpy(), 1, 127) - y).mean())
        model.train()
        return float(np.mean([np.abs(r - y).mean() for r, y in zip(refined, vel_val)])), float(np.mean(base))

    val_mae, base_mae = validate()
    print(f"context model alone: validation per-piece MAE {base_mae:.3f}", flush=True)
    seq_len = min(seq_len, int(np.diff(train.starts).max()))
    steps_per_epoch = max(1, epoch_notes // (batch * seq_len))
    budget, t0, step = minutes * 60.0, time.monotonic(), 0
    best, history = (base_mae, 0), []
    out = Path(out) if out else weights_path("offline")
    for epoch in range(1000):
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", unit="step", leave=False)
        run_loss = 0.0
        for i in bar:
            frac = (time.monotonic() - t0) / budget
            if frac >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            idx = segment_starts(train, rng, batch, seq_len)[:, None] + np.arange(seq_len)
            vz = torch.from_numpy(np.asarray(z_train[idx.ravel()], np.float32).reshape(batch, seq_len, -1))
            xb = torch.from_numpy(train.features[idx].astype(np.float32))
            y = torch.from_numpy(train.velocity[idx].astype(np.float32))
            loss = (model(vz, xb) - y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            run_loss = 0.98 * run_loss + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(l1=f"{run_loss:.2f}")
        bar.close()
        val_mae, _ = validate()
        elapsed = time.monotonic() - t0
        history.append({"epoch": epoch + 1, "step": step, "train_l1": run_loss, "val_piece_mae": val_mae, "minutes": elapsed / 60})
        print(
            f"epoch {epoch + 1}: train L1 {run_loss:.2f}  validation per-piece MAE {val_mae:.3f} "
            f"(context alone {base_mae:.3f})  ({elapsed / 60:.1f} min)",
            flush=True,
        )
        if val_mae < best[0]:
            best = (val_mae, epoch + 1)
            meta = {
                "context_sha256": file_sha256(context),
                "training": {
                    "command": " ".join(["cadenza"] + sys.argv[1:]),
                    "seed": seed,
                    "epoch": epoch + 1,
                    "step": step,
                    "batch": batch,
                    "seq_len": seq_len,
                    "lr": lr,
                    "data": "MAESTRO v2.0.0 train",
                    "context_weights": context.name,
                },
            }
            save_weights(model, out, asdict(model.cfg), meta)
        if elapsed >= budget:
            break
    metrics = {
        "model": "offline",
        "best_epoch": best[1],
        "val_piece_mae": best[0],
        "val_piece_mae_context_alone": base_mae,
        "history": history,
    }
    with atomic_path(out.with_suffix("").with_suffix(".metrics.json")) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
