"""Training of the phrase models (the transformer, or the LSTM baseline) on MAESTRO train and, as
a second style, POP909 train; checkpoints are selected on validation.

Schedule: linear warmup over ``warmup_steps``, then cosine (or linear) decay to ``min_lr`` over a
declared budget of training tokens (``tokens``); without one, over the wall-clock budget
(``minutes``), as the first shipped weights were trained. ``minutes`` always bounds one
invocation, and a token budget that is spent ends it too.

Resumable. Every ``checkpoint_every_s`` seconds, at the end, and on SIGINT/SIGTERM, a checkpoint
(``.cache/phrase/<out stem>.ckpt``, git-ignored) stores the weights, the optimizer state, the
random generators (the data position: which windows come next), the step, token and time counters,
the validation curve and the record of earlier invocations. ``--resume`` continues from it as if
never stopped (tests/models/test_phrase_v2.py checks an interrupted run ends with the weights of
an uninterrupted one). Validation runs every ``eval_every_s`` seconds; the best weights so far are
written to ``out`` with every invocation's command, data, tokens seen and validation curve in the
JSON beside them.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cadenza.models.phrase.data import CACHE_DIR, TokenSplit, fixed_windows, load_split, sample_windows
from cadenza.models.phrase.lstm import LSTMConfig, PhraseLSTM
from cadenza.models.phrase.model import STYLES, WEIGHTS_DIR, PhraseConfig, PhraseModel, load_phrase, with_styles

log = logging.getLogger(__name__)

# What a resumed run takes from its command line; everything else comes from the checkpoint.
RUN_CONTROLS = ("minutes", "threads", "eval_every_s", "checkpoint_every_s", "steps", "device", "resume", "checkpoint")


@dataclass
class TrainOptions:
    minutes: float = 25.0  # wall-clock limit of this invocation (and the schedule when tokens == 0)
    threads: int = 1
    seed: int = 0
    batch: int = 16
    seq_len: int = 512
    lr: float = 2e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 40
    tokens: int = 0  # declared training-token budget the schedule decays over; 0 = over ``minutes``
    schedule: str = "cosine"  # or "linear" (decay to min_lr)
    steps: int = 0  # stop this invocation after N optimizer steps; 0 = no limit
    arch: str = "transformer"  # or "lstm" (the Performance RNN baseline)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    pos: str | None = None  # "absolute" | "rope"; None: rope for a new model, the init's own otherwise
    mlp: str | None = None  # "gelu" | "swiglu"; None: swiglu for a new model, the init's own otherwise
    val_windows: int = 48
    eval_every_s: float = 150.0
    checkpoint_every_s: float = 300.0
    transpose: int = 3  # random transposition of +-N semitones (data augmentation); 0 = off
    init: Path | None = None  # start from these weights (see ``adapt``)
    out: Path = WEIGHTS_DIR / "phrase_v2.safetensors"
    pop909: float = 0.0  # share of each batch drawn from POP909 train with the "pop" style; 0 = MAESTRO only
    pop909_root: Path | None = None
    device: str = "cpu"  # "cuda" / "auto" for a GPU (see docs/gpu.md)
    bf16: bool = False  # bfloat16 autocast for the training forward (GPU)
    compile: bool = False  # torch.compile the training forward (GPU; the first steps compile)
    resume: bool = False  # continue from the checkpoint
    checkpoint: Path | None = None  # default: .cache/phrase/<out stem>.ckpt


@dataclass
class Data:
    train: TokenSplit
    val: np.ndarray  # fixed MAESTRO validation windows (N, seq_len + 1)
    pop_train: TokenSplit | None = None
    pop_val: np.ndarray | None = None
    description: str = field(default="MAESTRO v2.0.0 train")


def transpose_tokens(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift NOTE_ON/NOTE_OFF pitches of each row by ``shift`` semitones (clamped to 0..127)."""
    from cadenza.models.phrase.tokens import NOTE_ON0, SHIFT0

    is_note = (x >= NOTE_ON0) & (x < SHIFT0)
    base = torch.where(x < NOTE_ON0 + 128, NOTE_ON0, NOTE_ON0 + 128)
    pitch = (x - base + shift[:, None]).clamp(0, 127)
    return torch.where(is_note, base + pitch, x)


@torch.no_grad()
def mean_nll(model: PhraseModel | PhraseLSTM, windows: np.ndarray, batch: int = 16, style: int = 0) -> float:
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


def make_optimizer(model: PhraseModel | PhraseLSTM, opt: TrainOptions) -> torch.optim.AdamW:
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


# ---- the model -------------------------------------------------------------------------------


def new_model(opt: TrainOptions) -> PhraseModel | PhraseLSTM:
    styles = len(STYLES) if opt.pop909 > 0 else 0
    if opt.arch == "lstm":
        return PhraseLSTM(LSTMConfig(block_size=opt.seq_len, n_layer=opt.n_layer, n_embd=opt.n_embd, n_styles=styles))
    return PhraseModel(
        PhraseConfig(
            block_size=opt.seq_len,
            n_layer=opt.n_layer,
            n_head=opt.n_head,
            n_embd=opt.n_embd,
            n_styles=styles,
            pos=opt.pos or "rope",
            mlp=opt.mlp or "swiglu",
        )
    )


def adapt(model: PhraseModel, *, pos: str | None, n_layer: int) -> PhraseModel:
    """The same network with rotary positions (``pos="rope"``: the learned position table is
    dropped) and/or ``n_layer`` blocks (new blocks start as identities: their output projections
    are zero), so a larger model starts from what a smaller one learned."""
    cfg = model.config
    new_cfg = PhraseConfig(**{**asdict(cfg), "pos": pos or cfg.pos, "n_layer": max(n_layer, cfg.n_layer)})
    if new_cfg == cfg:
        return model
    if cfg.pos == "rope" and new_cfg.pos == "absolute":
        raise ValueError("cannot turn rotary positions back into learned ones")
    new = PhraseModel(new_cfg)
    state = {k: v for k, v in model.state_dict().items() if not (k == "wpe.weight" and new.wpe is None)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for block in new.h[cfg.n_layer :]:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return new


def _initial_model(opt: TrainOptions) -> tuple[PhraseModel | PhraseLSTM, list[dict]]:
    """A new model, or the ``init`` weights adapted as asked, with the record of their training."""
    if not opt.init:
        return new_model(opt), []
    model = load_phrase(opt.init)
    if isinstance(model, PhraseModel):
        model = adapt(model, pos=opt.pos, n_layer=opt.n_layer)
        if opt.pop909 > 0:
            model = with_styles(model, len(STYLES))
    try:
        prior = json.loads(Path(opt.init).with_suffix(".json").read_text()).get("training", {}).get("runs", [])
    except (OSError, ValueError):
        prior = []
    return model.train(), prior


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoint_path(opt: TrainOptions) -> Path:
    return Path(opt.checkpoint) if opt.checkpoint else CACHE_DIR / f"{Path(opt.out).stem}.ckpt"


def _options_dict(opt: TrainOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opt).items()}


def _options_from(saved: dict, now: TrainOptions) -> TrainOptions:
    """The checkpoint's options, with this invocation's run controls (and a new token budget,
    when one is given)."""
    paths = {"init", "out", "pop909_root", "checkpoint"}
    known = {f.name for f in fields(TrainOptions)}
    merged = {k: (Path(v) if k in paths and v is not None else v) for k, v in saved.items() if k in known}
    merged.update({k: getattr(now, k) for k in RUN_CONTROLS})
    if now.tokens:
        merged["tokens"] = now.tokens
    return TrainOptions(**merged)


def _save_checkpoint(path: Path, state: dict) -> None:
    from cadenza.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".ckpt") as tmp:
        torch.save(state, tmp)


# ---- the loop --------------------------------------------------------------------------------


def load_data(maestro_root: Path, opt: TrainOptions, *, progress: bool = True) -> Data:
    train_split = load_split(maestro_root, "train", progress=progress)
    val = fixed_windows(load_split(maestro_root, "validation", progress=progress), opt.seq_len + 1, opt.val_windows, seed=1234)
    if opt.pop909 <= 0:
        return Data(train_split, val)
    from cadenza.models.phrase.data import load_pop909

    pop_train = load_pop909(opt.pop909_root, "train", progress=progress)
    pop_val = fixed_windows(load_pop909(opt.pop909_root, "validation", progress=progress), opt.seq_len + 1, opt.val_windows, seed=1234)
    return Data(
        train_split, val, pop_train, pop_val, f"MAESTRO v2.0.0 train + POP909 songs 001-809 ({opt.pop909:.0%} of each batch, pop style)"
    )


def train(maestro_root: Path, opt: TrainOptions, *, progress: bool = True) -> dict:
    if opt.resume:  # the data options (seq_len, pop909) are the checkpoint's
        ckpt_opts = torch.load(checkpoint_path(opt), map_location="cpu", weights_only=True)["options"]
        opt = _options_from(ckpt_opts, opt)
    return fit(opt, load_data(maestro_root, opt, progress=progress), progress=progress)


def fit(opt: TrainOptions, data: Data, *, progress: bool = True) -> dict:
    """Train (or resume) on ``data`` until the time, step or token budget is spent or a signal
    arrives; returns the summary of the whole training so far."""
    torch.set_num_threads(opt.threads)
    device = torch.device(opt.device if opt.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    ckpt_file = checkpoint_path(opt)
    ckpt = None
    if opt.resume:
        if not ckpt_file.is_file():
            from cadenza.errors import ConfigError

            raise ConfigError(f"no checkpoint to resume: {ckpt_file}")
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        opt = _options_from(ckpt["options"], opt)
        kind = (LSTMConfig, PhraseLSTM) if ckpt["config"].get("arch") == "lstm" else (PhraseConfig, PhraseModel)
        model = kind[1](kind[0](**ckpt["config"]))
        model.load_state_dict(ckpt["model"], strict=False)
        prior = ckpt["runs"]
    else:
        torch.manual_seed(opt.seed)
        model, prior = _initial_model(opt)
    model.to(device).train()
    optim = make_optimizer(model, opt)
    rng = np.random.default_rng(opt.seed)
    n_pop = max(1, round(opt.batch * opt.pop909)) if data.pop_train is not None else 0
    pop = STYLES.index("pop")
    if ckpt is not None:
        optim.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["numpy_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        step, tokens, elapsed0, best, history = ckpt["step"], ckpt["tokens"], ckpt["elapsed_s"], ckpt["best"], ckpt["history"]
    else:
        step = tokens = 0
        elapsed0 = 0.0
        best = _evaluate(model, data, opt, step=0, tokens=0, elapsed=0.0)
        history = [best]
    forward = torch.compile(model) if opt.compile else model  # shares the parameters; evaluation and saving use ``model``
    log.info(
        "phrase %s: %d parameters, %d train tokens, %d validation windows; %s at step %d, %d tokens",
        opt.arch,
        model.num_params(),
        len(data.train.tokens),
        len(data.val),
        "resuming" if ckpt else "starting",
        step,
        tokens,
    )
    run = {
        "command": _command(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": data.description + "; selected on validation" + (" (MAESTRO and POP909 weighted as the batches)" if n_pop else ""),
        "options": _options_dict(opt),
        "step_start": step,
        "tokens_start": tokens,
        "history": [],
        "torch": str(torch.__version__),  # a plain str: checkpoints load with weights_only=True
    }
    stop = _StopFlag()
    t0 = last_eval = last_ckpt = time.monotonic()
    ema = None
    reason = "minutes"

    def state_now(elapsed: float) -> dict:
        run.update(step_end=step, tokens_end=tokens, stopped=reason)
        return {
            "model": model.state_dict(),
            "config": asdict(model.config),
            "optimizer": optim.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "best": best,
            "history": history,
            "options": _options_dict(opt),
            "runs": prior + [run],
        }

    with stop:
        while True:
            now = time.monotonic()
            elapsed = elapsed0 + now - t0
            if stop.set:
                reason = f"signal {stop.set}"
            elif now - t0 >= opt.minutes * 60.0:
                reason = "minutes"
            elif opt.tokens and tokens >= opt.tokens:
                reason = "tokens"
            elif opt.steps and step - run["step_start"] >= opt.steps:
                reason = "steps"
            else:
                reason = ""
            due_eval = reason or now - last_eval >= opt.eval_every_s
            if due_eval and step > history[-1]["step"]:
                last_eval = now
                rec = _evaluate(model, data, opt, step=step, tokens=tokens, elapsed=elapsed, ema=ema)
                history.append(rec)
                run["history"].append(rec)
                if rec["select"] < best["select"]:
                    best = rec
                    _save_best(model, opt, best, prior + [run])
            if reason or now - last_ckpt >= opt.checkpoint_every_s:
                last_ckpt = now
                _save_checkpoint(ckpt_file, state_now(elapsed))
            if reason:
                break
            frac = tokens / opt.tokens if opt.tokens else elapsed / (opt.minutes * 60.0)
            lr = _lr(step, frac, opt)
            for g in optim.param_groups:
                g["lr"] = lr
            x, style = _batch(data, opt, rng, n_pop, pop)
            loss = train_step(forward, optim, x.to(device), style.to(device) if model.config.n_styles else None, bf16=opt.bf16)
            step += 1
            tokens += x[:, 1:].numel()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if progress and step % 20 == 0:
                log.info("step %d tokens %d loss %.4f lr %.2e", step, tokens, ema, lr)
    _save_record(opt, best, prior + [run], model.num_params())
    log.info(
        "stopped (%s); best validation NLL %.4f at step %d (%d tokens) -> %s; checkpoint %s",
        reason,
        best["val_nll"],
        best["step"],
        best["tokens"],
        opt.out,
        ckpt_file,
    )
    return {
        "best": best,
        "history": history,
        "params": model.num_params(),
        "steps": step,
        "tokens": tokens,
        "stopped": reason,
        "checkpoint": str(ckpt_file),
    }


def _batch(data: Data, opt: TrainOptions, rng: np.random.Generator, n_pop: int, pop: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(sample_windows(data.train, opt.seq_len + 1, opt.batch - n_pop, rng))
    style = torch.zeros(opt.batch, dtype=torch.long)
    if n_pop:
        x = torch.cat([x, torch.from_numpy(sample_windows(data.pop_train, opt.seq_len + 1, n_pop, rng))])
        style[opt.batch - n_pop :] = pop
    if opt.transpose:
        x = transpose_tokens(x, torch.from_numpy(rng.integers(-opt.transpose, opt.transpose + 1, opt.batch)))
    return x, style


def _evaluate(model, data: Data, opt: TrainOptions, *, step: int, tokens: int, elapsed: float, ema: float | None = None) -> dict:
    rec = {"val_nll": mean_nll(model, data.val), "step": step, "tokens": tokens, "elapsed_s": round(elapsed, 1)}
    if ema is not None:
        rec["train_loss_ema"] = round(ema, 4)
    if data.pop_val is not None:
        rec["val_nll_pop"] = mean_nll(model, data.pop_val, style=STYLES.index("pop"))
    rec["select"] = _selection(rec, opt)
    log.info(
        "step %d (%d tokens): train %s validation %.4f%s",
        step,
        tokens,
        f"{ema:.4f}" if ema is not None else "-",
        rec["val_nll"],
        f" POP909 {rec['val_nll_pop']:.4f} select {rec['select']:.4f}" if "val_nll_pop" in rec else "",
    )
    return rec


def _selection(rec: dict, opt: TrainOptions) -> float:
    """What checkpoints are selected on: MAESTRO validation NLL, or with POP909 in the mix, the
    two validation NLLs weighted as the batches are."""
    if "val_nll_pop" not in rec:
        return rec["val_nll"]
    return (1 - opt.pop909) * rec["val_nll"] + opt.pop909 * rec["val_nll_pop"]


def _lr(step: int, frac: float, opt: TrainOptions) -> float:
    if step < opt.warmup_steps:  # counted over the whole training: a resumed run does not warm up again
        return opt.lr * (step + 1) / opt.warmup_steps
    frac = min(max(frac, 0.0), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if opt.schedule == "cosine" else 1.0 - frac
    return opt.min_lr + (opt.lr - opt.min_lr) * decay


def _command() -> str:
    argv = sys.argv
    named = argv and ("cadenza" in argv[0] or argv[0].endswith("__main__.py"))  # the console script or python -m cadenza
    return "cadenza " + " ".join(shlex.quote(a) for a in argv[1:]) if named else " ".join(map(shlex.quote, argv))


def _training_record(best: dict, runs: list[dict], params: int) -> dict:
    return {"training": {"params": params, "val_nll": best["val_nll"], "select": best["select"], "best": best, "runs": runs}}


def _save_best(model, opt: TrainOptions, best: dict, runs: list[dict]) -> None:
    model.save(opt.out, extra=_training_record(best, runs, model.num_params()))


def _save_record(opt: TrainOptions, best: dict, runs: list[dict], params: int) -> None:
    """Bring the JSON beside the best weights up to date with every run (also one that found no
    better weights); nothing is written when no weights were ever saved."""
    from cadenza.atomic import atomic_path

    cfg_path = Path(opt.out).with_suffix(".json")
    if not cfg_path.is_file():
        return
    meta = json.loads(cfg_path.read_text())
    if meta.get("training", {}).get("best", {}).get("step") != best["step"]:
        return  # these weights are not this training's (an older file at the same path)
    meta.update(_training_record(best, runs, params))
    with atomic_path(cfg_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop reads between steps, so a stop writes the final
    checkpoint instead of losing the work since the last one (main thread only)."""

    def __init__(self) -> None:
        self.set = ""
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.set = signal.Signals(signum).name

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
