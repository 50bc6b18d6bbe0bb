"""Training of the velocity models on MAESTRO (train split; selection on validation only).

CPU-friendly by design: one thread by default (the machine is shared), a wall-clock budget with a
cosine learning rate that reaches its floor when the budget runs out, validation (per-piece mean
absolute error, the paper's averaging) after every epoch, and the best epoch kept. Output:
``velocity_<name>.safetensors`` + ``.json`` (config, features, command) + ``.metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cadenza.atomic import atomic_path
from cadenza.errors import CadenzaError
from cadenza.models.velocity.causal import CausalConfig, CausalVelocityModel, predict_causal_many
from cadenza.models.velocity.context import LOOKAHEADS_TRAIN, ContextConfig, ContextVelocityModel, predict_split_context
from cadenza.models.velocity.data import SplitData, load_split, segment_starts
from cadenza.models.velocity.weights import save_weights, weights_path

log = logging.getLogger(__name__)


def _feature_stats(data: SplitData, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = rng.choice(len(data.onset), size=min(200_000, len(data.onset)), replace=False)
    x = data.features[np.sort(idx)].astype(np.float32)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-3] = 1.0
    return torch.from_numpy(mean), torch.from_numpy(std)


def _batch(data: SplitData, starts: np.ndarray, length: int):
    idx = starts[:, None] + np.arange(length)[None, :]
    x = torch.from_numpy(data.features[idx].astype(np.float32))
    y = torch.from_numpy(data.velocity[idx].astype(np.float32))
    return idx, x, y


def predict_split_causal(model: CausalVelocityModel, data: SplitData, batch: int = 16) -> list[np.ndarray]:
    """Whole pieces of a preprocessed split through the GRU, as padded batches."""
    return predict_causal_many(model, [data.features[data.piece(k)] for k in range(data.n_pieces)], batch)


def piece_mae(data: SplitData, preds: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(p - data.velocity[data.piece(k)]).mean() for k, p in enumerate(preds)]))


def train_velocity(
    model_name: str,
    maestro: Path,
    *,
    epochs: int = 100,
    minutes: float = 20.0,
    threads: int = 1,
    seed: int = 0,
    batch: int = 32,
    seq_len: int = 256,
    lr: float = 2e-3,
    limit: int | None = None,
    out: Path | None = None,
    init: Path | None = None,
    hidden: int = 256,
    epoch_notes: int = 2_000_000,
    freeze: bool = False,
) -> dict:
    """Train ``causal`` or ``context``; returns the metrics written beside the weights."""
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train = load_split(maestro, "train", limit=limit)
    val = load_split(maestro, "validation", limit=None if limit is None else max(4, limit // 4))
    mean, std = _feature_stats(train, rng)
    if model_name == "causal":
        model = CausalVelocityModel(CausalConfig(hidden=hidden))
    else:
        model = ContextVelocityModel(ContextConfig(hidden=hidden))
    model.feat_mean.copy_(mean)
    model.feat_std.copy_(std)
    if freeze and init is None:
        raise CadenzaError("--freeze-backbone needs --init (weights to take the backbone from)")
    if init is not None:  # e.g. the context model's backbone from the trained causal model
        from cadenza.models.velocity.weights import load_weights

        state, _ = load_weights(init)
        if model_name == "context" and "head.0.weight" in state:
            # Start the readout's output layer as the causal head (its extra inputs weighted 0),
            # so training begins at the causal model's accuracy instead of at constant 64.
            w = torch.zeros_like(model.out[0].weight)
            hw = state.pop("head.0.weight")
            w[:, : hw.shape[1]] = hw
            state.update(
                {
                    "out.0.weight": w,
                    "out.0.bias": state.pop("head.0.bias"),
                    "out.2.weight": state.pop("head.2.weight"),
                    "out.2.bias": state.pop("head.2.bias"),
                }
            )
        missing = model.load_state_dict(state, strict=False)
        log.info("initialised from %s (missing: %s)", init, missing.missing_keys)
    if freeze:  # train the readout only, on top of a backbone taken from --init (much cheaper)
        for p in list(model.inp.parameters()) + list(model.gru.parameters()):
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    # An "epoch" is a fixed number of sampled notes, so validation comes every few minutes.
    steps_per_epoch = max(1, epoch_notes // (batch * seq_len))
    total_steps = epochs * steps_per_epoch
    budget = minutes * 60.0
    t0 = time.monotonic()
    best = (math.inf, -1)
    history = []
    out = Path(out) if out else weights_path(model_name)
    step = 0
    for epoch in range(epochs):
        model.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", unit="step", leave=False)
        run_loss = 0.0
        for i in bar:
            frac = max(step / total_steps, (time.monotonic() - t0) / budget)
            if frac >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
            starts = segment_starts(train, rng, batch, seq_len)
            idx, x, y = _batch(train, starts, seq_len)
            if model_name == "causal":
                pred, _ = model(x)
            elif freeze:
                with torch.no_grad():
                    h, e = model.backbone(x)
                s = torch.from_numpy(rng.choice(LOOKAHEADS_TRAIN, size=batch).astype(np.float32))
                pred = model.readout(
                    h,
                    e,
                    torch.from_numpy(train.onset[idx]),
                    torch.from_numpy(train.offset[idx]),
                    torch.from_numpy(train.pitch[idx].astype(np.float32)),
                    s,
                )
            else:
                s = torch.from_numpy(rng.choice(LOOKAHEADS_TRAIN, size=batch).astype(np.float32))
                on = torch.from_numpy(train.onset[idx])
                off = torch.from_numpy(train.offset[idx])
                pitch = torch.from_numpy(train.pitch[idx].astype(np.float32))
                pred = model(x, on, off, pitch, s)
            loss = (pred - y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            run_loss = 0.98 * run_loss + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(l1=f"{run_loss:.2f}")
        bar.close()
        if model_name == "causal":
            preds = predict_split_causal(model, val)
            val_mae = piece_mae(val, preds)
            extra = {}
        else:
            secs = [1.0, math.inf]
            extra = {f"val_mae_la{s}": piece_mae(val, p) for s, p in zip(secs, predict_split_context(model, val, secs))}
            val_mae = extra["val_mae_lainf"]
        elapsed = time.monotonic() - t0
        history.append({"epoch": epoch + 1, "step": step, "train_l1": run_loss, "val_piece_mae": val_mae, "minutes": elapsed / 60, **extra})
        print(
            f"epoch {epoch + 1}: train L1 {run_loss:.2f}  validation per-piece MAE {val_mae:.3f}  {extra}  ({elapsed / 60:.1f} min)",
            flush=True,
        )
        if val_mae < best[0]:
            best = (val_mae, epoch + 1)
            meta = {
                "training": {
                    "command": " ".join(["cadenza"] + sys.argv[1:]),
                    "seed": seed,
                    "epoch": epoch + 1,
                    "step": step,
                    "batch": batch,
                    "seq_len": seq_len,
                    "lr": lr,
                    "data": "MAESTRO v2.0.0 train",
                }
            }
            save_weights(model, out, asdict(model.cfg), meta)
        if (time.monotonic() - t0) >= budget:
            break
    metrics = {"model": model_name, "best_epoch": best[1], "val_piece_mae": best[0], "history": history}
    with atomic_path(out.with_suffix("").with_suffix(".metrics.json")) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
