"""Training and evaluation of the U-Net colorizer (models/velocity/unet.py) on MAESTRO v2.

Data: the official train/validation/test split of ``maestro-v2.0.0.csv``. Each split is parsed
once into a compact note cache (``.cache/unet/maestro_<split>.npz``: onset, offset, pitch,
velocity and pedal arrays of all pieces, concatenated), from which training windows are drawn at
random start times (so every epoch sees new sub-frame alignments). Validation each epoch is the
paper's metric (per-piece mean of per-note absolute error) on a fixed, evenly spaced subset of the
validation pieces; the best epoch's weights are kept.

    cadenza train velocity --model unet --minutes 20   # trains, writes models/weights/velocity_unet.*
    cadenza eval velocity --model unet --split test    # evaluates the shipped weights
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cadenza.atomic import atomic_path
from cadenza.midifile import Performance, load_performance
from cadenza.models.velocity.data import maestro_pieces
from cadenza.models.velocity.unet import (
    DEFAULT_WEIGHTS,
    UNet,
    UNetConfig,
    config_dict,
    load_unet,
    masked_loss,
    note_cells,
    piano_roll,
    predict_unet,
)

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "unet"
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Data


def split_files(maestro: Path, split: str) -> list[Path]:
    """Files of one official split (the same reader as the other velocity models use)."""
    return maestro_pieces(maestro, split)


@dataclass
class NoteCache:
    """All pieces of one split, concatenated; piece i owns notes note_start[i]:note_start[i+1]."""

    names: list[str]
    onset: np.ndarray
    offset: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    note_start: np.ndarray
    pedal_t: np.ndarray
    pedal_v: np.ndarray
    pedal_start: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def piece(self, i: int) -> Performance:
        a, b = self.note_start[i], self.note_start[i + 1]
        pa, pb = self.pedal_start[i], self.pedal_start[i + 1]
        return Performance(
            onset=self.onset[a:b].astype(np.float64),
            offset=self.offset[a:b].astype(np.float64),
            pitch=self.pitch[a:b].astype(np.int16),
            velocity=self.velocity[a:b].astype(np.int16),
            channel=np.zeros(b - a, np.int8),
            pedal_t=self.pedal_t[pa:pb].astype(np.float64),
            pedal_v=self.pedal_v[pa:pb].astype(np.int16),
        )


def build_cache(maestro: Path, split: str, cache_dir: Path = DEFAULT_CACHE, progress: bool = True) -> NoteCache:
    """Load the note cache of ``split``, parsing the MIDI files on first use."""
    path = Path(cache_dir) / f"maestro_{split}.v{CACHE_VERSION}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return NoteCache(names=list(z["names"]), **{k: z[k] for k in z.files if k != "names"})
    from tqdm import tqdm

    files = split_files(maestro, split)
    perfs, names = [], []
    for f in tqdm(files, desc=f"parse {split}", disable=not progress, unit="file"):
        perfs.append(load_performance(f))
        names.append(str(f.relative_to(maestro)))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    data = dict(
        onset=cat([p.onset for p in perfs], np.float32),
        offset=cat([p.offset for p in perfs], np.float32),
        pitch=cat([p.pitch for p in perfs], np.uint8),
        velocity=cat([p.velocity for p in perfs], np.uint8),
        note_start=np.concatenate([[0], np.cumsum([len(p) for p in perfs])]).astype(np.int64),
        pedal_t=cat([p.pedal_t for p in perfs], np.float32),
        pedal_v=cat([p.pedal_v for p in perfs], np.uint8),
        pedal_start=np.concatenate([[0], np.cumsum([len(p.pedal_t) for p in perfs])]).astype(np.int64),
    )
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, names=np.asarray(names), **data)
    return NoteCache(names=names, **data)


class WindowSampler:
    """Random 10-s training windows: a piece drawn by its length, a start drawn uniformly."""

    def __init__(self, cache: NoteCache, cfg: UNetConfig, rng: np.random.Generator):
        self.pieces = [cache.piece(i) for i in range(len(cache))]
        self.cfg = cfg
        self.rng = rng
        ends = np.array([p.onset.max(initial=0.0) for p in self.pieces])
        self.span = np.maximum(ends - cfg.window_s + 1.0, 1.0)
        self.p = self.span / self.span.sum()
        # Longest key-press per piece: how far before a window's start a still-held note can begin.
        self.max_dur = np.array([float((p.offset - p.onset).max(initial=0.0)) for p in self.pieces])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        x = np.zeros((n, cfg.in_channels, 88, cfg.frames), np.float32)
        target = np.zeros((n, 88, cfg.frames), np.float32)
        mask = np.zeros((n, 88, cfg.frames), np.float32)
        for j, i in enumerate(self.rng.choice(len(self.pieces), size=n, p=self.p)):
            perf = self.pieces[i]
            t0 = self.rng.uniform(-1.0, self.span[i])
            lo, hi = np.searchsorted(perf.onset, [t0 - self.max_dur[i] - 1e-3, t0 + cfg.window_s])
            on, off, pi, ve = perf.onset[lo:hi], perf.offset[lo:hi], perf.pitch[lo:hi], perf.velocity[lo:hi]
            x[j] = piano_roll(on, off, pi, perf.pedal_t, perf.pedal_v, t0, cfg.frames, cfg.frame_s)[: cfg.in_channels]
            row, col = note_cells(on, pi, t0, cfg.frame_s)
            ok = (col >= 0) & (col < cfg.frames)
            # Notes sharing a cell are trained towards their mean velocity.
            np.add.at(target[j], (row[ok], col[ok]), ve[ok].astype(np.float32))
            np.add.at(mask[j], (row[ok], col[ok]), 1.0)
        target = np.where(mask > 0, target / np.maximum(mask, 1.0), 0.0).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy((mask > 0).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Metrics


def velocity_metrics(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Per-piece mean MAE (the paper's averaging), per-note MAE, MSE, SD of predictions, r."""
    p = np.concatenate(preds).astype(np.float64)
    t = np.concatenate(truths).astype(np.float64)
    piece_mae = [float(np.abs(a - b).mean()) for a, b in zip(preds, truths) if len(a)]
    return {
        "pieces": len(piece_mae),
        "notes": int(len(p)),
        "piece_mean_mae": float(np.mean(piece_mae)),
        "note_mae": float(np.abs(p - t).mean()),
        "mse": float(((p - t) ** 2).mean()),
        "within_12_7": float((np.abs(p - t) <= 12.7).mean()),
        "within_6_4": float((np.abs(p - t) <= 6.4).mean()),
        "sd_pred": float(p.std()),
        "sd_true": float(t.std()),
        "pearson_r": float(np.corrcoef(p, t)[0, 1]) if p.std() > 0 else 0.0,
    }


def _eval_pieces(model: UNet, perfs: list[Performance]) -> dict:
    model.eval()
    preds = [predict_unet(model, perf.with_velocity(np.full(len(perf), 64))) for perf in perfs]
    return velocity_metrics(preds, [perf.velocity for perf in perfs])


def eval_unet_on_split(
    maestro: Path, split: str, limit: int | None = None, *, model: UNet | None = None, weights: Path | None = None, progress: bool = True
) -> dict:
    """Metrics of the U-Net on a MAESTRO split, read from the MIDI files with every velocity set to 64.

    ``limit`` takes the first N pieces of the split (csv order). ``model`` defaults to
    ``load_unet(weights)`` (the shipped weights when ``weights`` is None).
    """
    from tqdm import tqdm

    model = model if model is not None else load_unet(weights)
    files = split_files(maestro, split)[:limit]
    preds, truths = [], []
    for f in tqdm(files, desc=f"U-Net on {split}", disable=not progress, unit="piece"):
        perf = load_performance(f)
        preds.append(predict_unet(model, perf.with_velocity(np.full(len(perf), 64))))
        truths.append(perf.velocity)
    return {"split": split, **velocity_metrics(preds, truths)}


# --------------------------------------------------------------------------------------------
# Training


def train_unet(
    *,
    maestro: Path,
    out_dir: Path = DEFAULT_WEIGHTS.parent,
    minutes: float = 20.0,
    threads: int = 1,
    seed: int = 0,
    epochs: int = 1000,
    steps_per_epoch: int = 200,
    batch: int = 32,
    lr: float = 3e-3,
    base: int = 8,
    attn_heads: int = 4,
    in_channels: int = 3,
    loss: str = "l1",
    val_pieces: int = 24,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train the U-Net on MAESTRO train, select on validation; write weights, config and metrics.

    Stops after ``epochs`` epochs of ``steps_per_epoch`` batches or after ``minutes`` of wall
    clock, whichever comes first; the learning rate follows a cosine over that budget. Writes
    ``out_dir/velocity_unet.safetensors`` (best validation epoch), ``velocity_unet.json``
    (config + training command) and ``velocity_unet.metrics.json``; returns the metrics dict
    (``best_val``: validation metrics on the subset, ``val_full``: on the whole validation split).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = UNetConfig(base=base, attn_heads=attn_heads, in_channels=in_channels, loss=loss)
    train = build_cache(maestro, "train", cache_dir, progress)
    val = build_cache(maestro, "validation", cache_dir, progress)
    val_idx = np.linspace(0, len(val) - 1, min(val_pieces, len(val))).round().astype(int)
    val_perfs = [val.piece(int(i)) for i in val_idx]
    sampler = WindowSampler(train, cfg, rng)

    model = UNet(cfg).to(memory_format=torch.channels_last)  # channels-last convolutions are faster on a CPU
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    budget_s = minutes * 60.0
    total_steps = epochs * steps_per_epoch
    warmup = min(200, total_steps // 10 + 1)
    out_dir = Path(out_dir)
    weights_path = out_dir / "velocity_unet.safetensors"
    t_start = time.monotonic()
    best, history, step = None, [], 0
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"U-Net: {n_params / 1e6:.2f} M parameters, {len(train)} train pieces, {len(val_perfs)} validation pieces, {minutes:g} min",
        file=sys.stderr,
    )

    for epoch in range(1, epochs + 1):
        model.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", disable=not progress, leave=False)
        run_loss = 0.0
        for _ in bar:
            progress_frac = max(step / total_steps, (time.monotonic() - t_start) / budget_s)
            if progress_frac >= 1.0:
                break
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * progress_frac))
            for g in opt.param_groups:
                g["lr"] = lr * max(scale, 0.02)
            x, target, mask = sampler.batch(batch)
            loss_t = masked_loss(model(x.to(memory_format=torch.channels_last)), target, mask, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            run_loss = 0.98 * run_loss + 0.02 * loss_t.item() if step > 1 else loss_t.item()
            bar.set_postfix(loss=f"{run_loss:.4f}")
        bar.close()
        m = _eval_pieces(model, val_perfs)
        elapsed = time.monotonic() - t_start
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "minutes": elapsed / 60,
                "train_loss": run_loss,
                "val_piece_mae": m["piece_mean_mae"],
                "val_sd_pred": m["sd_pred"],
            }
        )
        improved = best is None or m["piece_mean_mae"] < best["piece_mean_mae"]
        print(
            f"epoch {epoch:3d}  step {step:6d}  {elapsed / 60:5.1f} min  loss {run_loss:.4f}  val per-piece MAE {m['piece_mean_mae']:.3f}  SD {m['sd_pred']:.1f}{'  *' if improved else ''}",
            file=sys.stderr,
        )
        if improved:
            best = {**m, "epoch": epoch, "step": step}
            _write_outputs(out_dir, model, cfg, command, save_file)
        if (time.monotonic() - t_start) >= budget_s:
            break

    best_model = load_unet(weights_path)
    full = eval_unet_on_split(maestro, "validation", model=best_model, progress=progress)
    metrics = {
        "model": "unet",
        "parameters": n_params,
        "steps": step,
        "epochs": len(history),
        "train_minutes": (time.monotonic() - t_start) / 60,
        "threads": threads,
        "seed": seed,
        "best_val_subset": best,
        "val_full": full,
        "history": history,
    }
    with atomic_path(out_dir / "velocity_unet.metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def _write_outputs(out_dir: Path, model: UNet, cfg: UNetConfig, command: str | None, save_file) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "velocity_unet.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {"model": "unet", "config": config_dict(cfg), "trained_with": command or "cadenza.models.velocity.train_unet.train_unet"}
    with atomic_path(out_dir / "velocity_unet.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
