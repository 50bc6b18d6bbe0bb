"""Training of the MusicVAE models on POP909 train, selected on POP909 validation.

Every epoch (``epoch_size`` random training windows, transposed by up to +-5 semitones) ends with a
validation pass on a fixed validation subset (teacher-forced and greedy accuracy, NLL, KL); the
best epoch by validation reconstruction NLL is written as the shipped weights (greedy accuracy
would rank a decoder collapsed to "no event" high). A checkpoint with the optimizer state goes to ``.cache/vae/<name>.ckpt`` after every epoch,
so an interrupted or budget-limited run continues where it stopped (``--resume``, the default).
``--init-from CKPT`` starts a new run from another run's checkpoint: its weights (the same
architecture, or that plus the ``bar_skip`` paths, which start at zero so the model is unchanged),
its step count (the beta and sampling schedules go on), a fresh optimizer and the learning rate
schedule counted from that step again.
Each run's command, data, steps and validation curve are appended to the weights' JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .data import load_windows
from .weights import read_meta, save_tensors, weights_path, write_meta


@dataclass
class TrainOptions:
    model: str = "mel_2bar"
    minutes: float = 25.0
    max_steps: int = 0  # 0 = until the time budget is spent
    batch: int = 64
    lr: float = 1e-3
    lr_decay: float = 0.9998  # per step, Magenta style, floor min_lr
    min_lr: float = 1e-5
    epoch_size: int = 8192
    val_size: int = 512
    seed: int = 0
    threads: int = 1
    resume: bool = True
    out: Path | None = None
    init_from: Path | None = None  # a checkpoint to start a new run from (see the module's doc)
    overrides: dict = field(default_factory=dict)  # VAEConfig fields


LOSS_ONLY = ("free_bits", "max_beta", "beta_rate", "sampling_rate")  # may change when a run is resumed
GROWABLE = ("bar_skip",)  # may be switched on by --init-from: the new paths start as the zero map


def ckpt_path(name: str, out: Path | None = None) -> Path:
    return Path(".cache/vae") / f"{Path(out).stem if out else name}.ckpt"


def validate(model, val_x, batch: int = 256) -> dict:
    """Teacher-forced and greedy (own outputs, from the posterior mean) accuracy, NLL, KL."""
    import torch

    from .model import kl_terms

    model.eval()
    tf = gr = nll = kl = 0.0
    n = 0
    with torch.no_grad():
        for i in range(0, len(val_x), batch):
            x = val_x[i : i + batch]
            mu, sigma = model.encode(x)
            lg = model.decoder(mu, x, 0.0)
            tf += (lg.argmax(-1) == x).float().sum().item()
            nll += torch.nn.functional.cross_entropy(lg.transpose(1, 2), x, reduction="sum").item()
            kl += kl_terms(mu, sigma).sum().item()
            gr += (model.decode(mu, temperature=0.0) == x).float().sum().item()
            n += len(x)
    model.train()
    T = val_x.shape[1]
    return {"tf_acc": tf / (n * T), "greedy_acc": gr / (n * T), "nll": nll / n, "kl_bits": kl / n / math.log(2)}


def _check_config(source, old: dict, cfg, growable: tuple) -> None:
    """Refuse a checkpoint of another architecture (one line naming the fields); a checkpoint written
    before a config field existed has that field's default."""
    from .model import VAEConfig

    old_cfg, new_cfg = VAEConfig(**old).to_dict(), cfg.to_dict()
    changed = sorted(k for k in new_cfg if k not in LOSS_ONLY and old_cfg[k] != new_cfg[k] and not (k in growable and not old_cfg[k]))
    if changed:
        raise SystemExit(
            f"error: checkpoint {source} is of another architecture ({', '.join(changed)} differ); "
            "pass --fresh to start over, or -o to train elsewhere"
        )
    if old_cfg != new_cfg:
        print(f"with changed settings: { {k: v for k, v in new_cfg.items() if old_cfg[k] != v} }", file=sys.stderr)


def train(root: Path, opt: TrainOptions, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from .model import PRESETS, MusicVAE, beta_at, n_params, sampling_prob

    torch.set_num_threads(opt.threads)
    cfg = replace(PRESETS[opt.model], **opt.overrides)
    out = opt.out or weights_path(opt.model)
    train_w = load_windows(root, "train", cfg.n_bars)
    val_w = load_windows(root, "validation", cfg.n_bars)
    vrng = np.random.default_rng(1234)
    vidx = np.sort(vrng.choice(len(val_w), min(opt.val_size, len(val_w)), replace=False))
    val_x = torch.from_numpy(val_w.encode(vidx))

    ck = ckpt_path(opt.model, opt.out)
    src, saved = None, None
    if opt.resume and ck.is_file():
        if opt.init_from:
            raise SystemExit(f"error: {ck} exists; drop --init-from to resume it, or pass --fresh to replace it")
        src = ck
    elif opt.init_from:
        if not Path(opt.init_from).is_file():
            raise SystemExit(f"error: --init-from {opt.init_from}: no such checkpoint")
        src = Path(opt.init_from)
    if src is not None:
        saved = torch.load(src, weights_only=True)
        # the loss settings go on as the checkpoint had them unless --set changes them
        cfg = replace(cfg, **{k: saved["config"][k] for k in LOSS_ONLY if k in saved["config"] and k not in opt.overrides})
        _check_config(src, saved["config"], cfg, growable=GROWABLE if src != ck else ())

    torch.manual_seed(opt.seed)
    model = MusicVAE(cfg)
    optim = torch.optim.Adam(model.parameters(), lr=opt.lr)
    state = {"step": 0, "epoch": 0, "history": [], "best": None, "rng": None, "seconds": 0.0}
    if src == ck:
        model.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        state = saved["state"]
        print(f"resuming {opt.model} at step {state['step']} (epoch {state['epoch']})", file=sys.stderr)
    elif src is not None:
        missing, unexpected = model.load_state_dict(saved["model"], strict=False)
        if unexpected or any(".skip" not in k for k in missing):
            raise SystemExit(f"error: {src}: its tensors do not fit this model ({(unexpected or missing)[0]})")
        old = saved["state"]
        state.update(step=old["step"], epoch=old["epoch"], history=list(old["history"]), runs=list(old.get("runs", [])))
        state["lr_origin"] = old["step"]
        print(f"starting {opt.model} from {src} at step {state['step']} (new paths: {len(missing)} tensors)", file=sys.stderr)
    rng = np.random.default_rng(opt.seed + 7919 * state["epoch"])
    gen = torch.Generator().manual_seed(opt.seed + state["step"])
    start_step = state["step"]
    runs = state.setdefault("runs", [])
    if not runs and state["history"]:  # a checkpoint from before runs were recorded in it
        runs.append(
            {
                "command": "(earlier run, config " + json.dumps(saved["config"]) + ")",
                "steps": [0, state["step"]],
                "curve": list(state["history"]),
            }
        )
    runs.append(
        {
            "command": "cadenza " + " ".join(sys.argv[1:]),
            "config": cfg.to_dict(),
            "data": f"POP909 train songs 001-809, MELODY+BRIDGE, {len(train_w)} unique {cfg.n_bars}-bar windows (hop 1 bar, "
            f">= {max(3, cfg.n_bars)} notes, transposed +-5 at random); validation: {len(vidx)} of {len(val_w)} "
            f"windows of songs 810-859",
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opt.__dict__.items()},
            "threads": opt.threads,
            "steps": [start_step, start_step],
            "curve": [],
        }
    )
    t0 = time.monotonic()
    deadline = t0 + opt.minutes * 60
    steps_per_epoch = max(1, opt.epoch_size // opt.batch)
    stop = False
    model.train()
    while not stop:
        idx = rng.integers(0, len(train_w), steps_per_epoch * opt.batch)
        bar = tqdm(range(steps_per_epoch), desc=f"{opt.model} epoch {state['epoch'] + 1}", disable=not progress, leave=False)
        run = {"loss": 0.0, "acc": 0.0, "kl": 0.0, "n": 0}
        for j in bar:
            step = state["step"]
            x = torch.from_numpy(train_w.encode(idx[j * opt.batch : (j + 1) * opt.batch], rng))
            sp, beta = sampling_prob(step, cfg.sampling_rate), beta_at(step, cfg)
            for g in optim.param_groups:
                g["lr"] = max(opt.min_lr, opt.lr * opt.lr_decay ** (step - state.get("lr_origin", 0)))
            o = model(x, sp, beta, generator=gen)
            optim.zero_grad()
            o["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            state["step"] += 1
            run["loss"] += o["loss"].item()
            run["acc"] += o["acc"].item()
            run["kl"] += o["kl"].item()
            run["n"] += 1
            if j % 10 == 0:
                bar.set_postfix(
                    loss=f"{run['loss'] / run['n']:.2f}",
                    acc=f"{run['acc'] / run['n']:.3f}",
                    kl=f"{run['kl'] / run['n']:.1f}",
                    p_own=f"{sp:.2f}",
                    beta=f"{beta:.3f}",
                )
            if time.monotonic() > deadline or (opt.max_steps and state["step"] >= opt.max_steps):
                stop = True
                break
        bar.close()
        state["epoch"] += 1
        state["seconds"] += time.monotonic() - t0
        t0 = time.monotonic()
        v = validate(model, val_x)
        n = max(1, run["n"])
        rec = {
            "epoch": state["epoch"],
            "step": state["step"],
            "train_loss": round(run["loss"] / n, 3),
            "train_tf_acc": round(run["acc"] / n, 4),
            "p_own": round(sampling_prob(state["step"], cfg.sampling_rate), 3),
            "beta": round(beta_at(state["step"], cfg), 4),
            **{k: round(x, 4) for k, x in v.items()},
        }
        state["history"].append(rec)
        runs[-1]["steps"][1] = state["step"]
        runs[-1]["curve"].append(rec)
        runs[-1]["examples_seen_total"] = state["step"] * opt.batch
        runs[-1]["train_seconds_total"] = round(state["seconds"], 1)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        if state["best"] is None or v["nll"] < state["best"]["nll"]:  # the VAE's reconstruction term; robust to
            # a decoder collapsed to "no event", which greedy accuracy would rank high
            state["best"] = rec
            save_tensors(out, model.state_dict())
            meta = read_meta(out)
            meta.update(
                {
                    "config": cfg.to_dict(),
                    "params": n_params(model),
                    "best": rec,
                    "representation": "16th-note events: 0 no event, 1 note-off, 2.. note-on MIDI 36..95",
                }
            )
            write_meta(out, meta)
        meta = read_meta(out)
        meta["runs"] = runs
        write_meta(out, meta)
        ck.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"config": cfg.to_dict(), "model": model.state_dict(), "optim": optim.state_dict(), "state": state}, ck.with_suffix(".tmp")
        )
        ck.with_suffix(".tmp").replace(ck)
    return {"best": state["best"], "steps": state["step"], "params": n_params(model), "out": str(out)}
