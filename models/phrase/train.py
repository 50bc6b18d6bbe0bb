"""Training of the phrase model on MAESTRO train (and, as a second style, POP909 train), selected
on MAESTRO validation, within a time budget.

The schedule is a function of elapsed wall-clock time, not of a step count, so a run given N
minutes warms up, decays its learning rate (cosine) and ends on time however fast the machine is.
Validation loss on a fixed set of windows is measured every ``eval_every_s`` seconds and at the
end; the best checkpoint is what gets saved, with its config and training record beside it.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cadenza.models.phrase.model import DEFAULT_WEIGHTS, STYLES, PhraseConfig, PhraseModel, load_phrase, with_styles
from cadenza.models.phrase.data import fixed_windows, load_split, sample_windows

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    minutes: float = 25.0
    threads: int = 1
    seed: int = 0
    batch: int = 16
    seq_len: int = 512
    lr: float = 2e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 40
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    val_windows: int = 48
    eval_every_s: float = 150.0
    transpose: int = 3  # random transposition of +-N semitones (data augmentation); 0 = off
    init: Path | None = None  # continue from these weights (same config; style vectors are added)
    out: Path = DEFAULT_WEIGHTS
    pop909: float = 0.0  # share of each batch drawn from POP909 train with the "pop" style; 0 = MAESTRO only
    pop909_root: Path | None = None
    device: str = "cpu"  # "cuda" / "auto" for a GPU (see docs/gpu.md)
    bf16: bool = False  # bfloat16 autocast for the training forward (GPU)
    compile: bool = False  # torch.compile the training forward (GPU; the first steps compile)


def transpose_tokens(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift NOTE_ON/NOTE_OFF pitches of each row by ``shift`` semitones (clamped to 0..127)."""
    from cadenza.models.phrase.tokens import NOTE_ON0, SHIFT0

    is_note = (x >= NOTE_ON0) & (x < SHIFT0)
    base = torch.where(x < NOTE_ON0 + 128, NOTE_ON0, NOTE_ON0 + 128)
    pitch = (x - base + shift[:, None]).clamp(0, 127)
    return torch.where(is_note, base + pitch, x)


@torch.no_grad()
def mean_nll(model: PhraseModel, windows: np.ndarray, batch: int = 16, style: int = 0) -> float:
    """Mean next-token NLL (nats) over fixed windows (N, T+1)."""
    model.eval()
    total, count = 0.0, 0
    dev = model.wte.weight.device
    for i in range(0, len(windows), batch):
        x = torch.from_numpy(windows[i : i + batch]).to(dev)
        logits = model(x[:, :-1], style=style)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def make_optimizer(model: PhraseModel, opt: TrainOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused (one kernel for all tensors) on a GPU."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(0.9, 0.95), fused=model.wte.weight.device.type == "cuda")


def train_step(forward, optim: torch.optim.Optimizer, x: torch.Tensor, style: torch.Tensor | None, *, bf16: bool = False) -> torch.Tensor:
    """One optimizer step on windows ``x`` (B, T+1) (next-token loss); ``forward`` is the model
    or its compiled form. Returns the loss (a tensor: reading it waits for the device)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(x[:, :-1], style=style)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optim.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    return loss


def train(maestro_root: Path, opt: TrainOptions, *, progress: bool = True) -> dict:
    torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)
    device = torch.device(opt.device if opt.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(opt.seed)
    train_split = load_split(maestro_root, "train", progress=progress)
    val_split = load_split(maestro_root, "validation", progress=progress)
    val = fixed_windows(val_split, opt.seq_len + 1, opt.val_windows, seed=1234)
    pop_train = pop_val = None
    n_pop = 0
    if opt.pop909 > 0:
        from cadenza.models.phrase.data import load_pop909

        pop_train = load_pop909(opt.pop909_root, "train", progress=progress)
        pop_val = fixed_windows(load_pop909(opt.pop909_root, "validation", progress=progress), opt.seq_len + 1, opt.val_windows, seed=1234)
        n_pop = max(1, round(opt.batch * opt.pop909))

    if opt.init:
        model = load_phrase(opt.init)
        if opt.pop909 > 0:
            model = with_styles(model, len(STYLES))
        cfg = model.config
        model.train()
    else:
        cfg = PhraseConfig(block_size=opt.seq_len, n_layer=opt.n_layer, n_head=opt.n_head, n_embd=opt.n_embd, n_styles=len(STYLES) if opt.pop909 > 0 else 0)
        model = PhraseModel(cfg)
    model.to(device)
    optim = make_optimizer(model, opt)
    forward = torch.compile(model) if opt.compile else model  # shares the parameters; evaluation and saving use ``model``
    log.info("phrase model: %d parameters, %d train tokens, %d validation windows", model.num_params(), len(train_split.tokens), len(val))

    budget = opt.minutes * 60.0
    best = {"val_nll": mean_nll(model, val), "step": 0, "tokens": 0, "elapsed_s": 0.0}
    if pop_val is not None:
        best["val_nll_pop"] = mean_nll(model, pop_val, style=STYLES.index("pop"))
    best["select"] = _selection(best, opt)
    log.info("initial validation NLL %.4f%s", best["val_nll"], f" (POP909 {best['val_nll_pop']:.4f})" if pop_val is not None else "")
    history = [dict(best)]
    t0 = time.monotonic()
    last_eval = t0
    step = tokens = 0
    from tqdm import tqdm

    bar = tqdm(total=int(budget), unit="s", desc="train phrase", disable=not progress, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}")
    ema = None
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= budget:
            break
        lr = _lr(step, elapsed / budget, opt)
        for g in optim.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(sample_windows(train_split, opt.seq_len + 1, opt.batch - n_pop, rng))
        style = torch.zeros(opt.batch, dtype=torch.long)
        if n_pop:
            x = torch.cat([x, torch.from_numpy(sample_windows(pop_train, opt.seq_len + 1, n_pop, rng))])
            style[opt.batch - n_pop :] = STYLES.index("pop")
        if opt.transpose:
            x = transpose_tokens(x, torch.from_numpy(rng.integers(-opt.transpose, opt.transpose + 1, opt.batch)))
        x, style = x.to(device, non_blocking=True), style.to(device, non_blocking=True)
        loss = train_step(forward, optim, x, style if cfg.n_styles else None, bf16=opt.bf16)
        step += 1
        tokens += x[:, 1:].numel()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        now = time.monotonic()
        bar.n = min(int(now - t0), int(budget))
        bar.set_postfix_str(f"step {step} loss {ema:.3f} best val {best['val_nll']:.3f} lr {lr:.1e}", refresh=True)
        if now - last_eval >= opt.eval_every_s or now - t0 >= budget:
            last_eval = now
            v = mean_nll(model, val)
            rec = {"val_nll": v, "step": step, "tokens": tokens, "elapsed_s": round(now - t0, 1), "train_loss_ema": round(ema, 4)}
            if pop_val is not None:
                rec["val_nll_pop"] = mean_nll(model, pop_val, style=STYLES.index("pop"))
            rec["select"] = _selection(rec, opt)
            history.append(rec)
            log.info("step %d: train %.4f validation %.4f%s", step, ema, v, f" POP909 {rec['val_nll_pop']:.4f}" if pop_val is not None else "")
            if rec["select"] < best["select"]:
                best = rec
                _save(model, opt, best, history)
    bar.close()
    if best["step"] == 0 and not opt.init:
        _save(model, opt, {**best, "note": "no improvement over initialization"}, history)
    elif best["step"] == 0:
        log.warning("no improvement over the initial weights; %s left unchanged", opt.out)
    log.info("best validation NLL %.4f at step %d (%d tokens); saved %s", best["val_nll"], best["step"], best["tokens"], opt.out)
    return {"best": best, "history": history, "params": model.num_params(), "steps": step, "tokens": tokens}


def _selection(rec: dict, opt: TrainOptions) -> float:
    """What checkpoints are selected on: MAESTRO validation NLL, or with POP909 in the mix, the
    two validation NLLs weighted as the batches are."""
    if "val_nll_pop" not in rec:
        return rec["val_nll"]
    return (1 - opt.pop909) * rec["val_nll"] + opt.pop909 * rec["val_nll_pop"]


def _lr(step: int, frac: float, opt: TrainOptions) -> float:
    if step < opt.warmup_steps:  # also when continuing: the optimizer state starts fresh
        return opt.lr * (step + 1) / opt.warmup_steps
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def _save(model: PhraseModel, opt: TrainOptions, best: dict, history: list[dict]) -> None:
    prior = []
    if opt.init:  # keep the record of the runs this one continues
        import json

        try:
            meta = json.loads(Path(opt.init).with_suffix(".json").read_text())
            prior = meta.get("training", {}).get("runs", [])
        except (OSError, ValueError):
            prior = []
    run = {
        "command": "cadenza " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "cadenza" in sys.argv[0] else " ".join(map(shlex.quote, sys.argv)),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opt.__dict__.items()},
        "data": "MAESTRO v2.0.0 train" + (f" + POP909 songs 001-809 ({opt.pop909:.0%} of each batch, pop style)" if opt.pop909 > 0 else "")
                + ("; selected on validation (MAESTRO and POP909 weighted as the batches)" if opt.pop909 > 0 else "; selected on validation"),
        "best": best,
        "history": history,
        "torch": torch.__version__,
    }
    model.save(opt.out, extra={"training": {"params": model.num_params(), "val_nll": best["val_nll"], "runs": prior + [run]}})
