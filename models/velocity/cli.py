"""Commands for the velocity models: train, eval, colorize, bench colorize."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = ("causal", "context", "offline", "unet")


def register(groups: dict) -> None:
    p = groups["train"].add_parser("velocity", help="train a velocity model on MAESTRO (train split, selected on validation)")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="causal",
        help="causal = live GRU; context = lookahead/offline; offline = the bidirectional refiner on the context model (files); unet = the paper's baseline",
    )
    p.add_argument("--epochs", type=int, default=100, help="upper bound; --minutes usually ends training first")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget; the learning rate anneals to it")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared: 1 by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="notes per training segment")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3; unet 3e-3)")
    p.add_argument("--hidden", type=int, default=256, help="GRU width")
    p.add_argument("--epoch-notes", type=int, default=2_000_000, help="notes per epoch (validation after each)")
    p.add_argument("--init", type=Path, help="start from these weights (e.g. the causal model for --model context)")
    p.add_argument("--freeze-backbone", action="store_true", help="context: keep the --init backbone fixed, train the readout only")
    p.add_argument("--limit", type=int, help="use only the first N training pieces (smoke tests)")
    p.add_argument("-o", "--out", type=Path, help="weights file (default: models/weights/velocity_<model>.safetensors)")
    u = p.add_argument_group("unet only (the paper's baseline)")
    u.add_argument("--steps-per-epoch", type=int, default=200, help="batches between validations")
    u.add_argument("--val-pieces", type=int, default=24, help="validation pieces scored after each epoch")
    u.add_argument("--in-channels", type=int, choices=(1, 2, 3), default=3, help="1 = onset roll (the paper), 2 = + held keys, 3 = + pedal")
    u.add_argument("--loss", choices=("l1", "bce"), default="l1")
    u.add_argument("--base", type=int, default=8, help="channels of the first U-Net level")
    p.set_defaults(func=run_train)

    p = groups["eval"].add_parser("velocity", help="evaluate velocity models on flat-velocity MAESTRO performances")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--model", choices=MODELS + ("all",), default="all")
    p.add_argument("--limit", type=int, help="only the first N pieces of the split")
    p.add_argument("--no-sweep", action="store_true", help="skip the lookahead sweep")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_eval)

    p = groups["root"].add_parser("colorize", help="give flat-velocity MIDI files human velocities (note-on velocities only)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="MIDI files or directories")
    p.add_argument("-o", "--out", type=Path, required=True, help="output file, or directory when several inputs or a directory are given")
    p.add_argument("--mode", choices=("causal", "lookahead", "offline"), default="offline")
    p.add_argument(
        "--lookahead", type=float, help="seconds of future the model may see in --mode lookahead (default: velocity.lookahead_s or 1)"
    )
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="piano roll coloured by velocity (single input only)")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes for many files (default: 2 when there are more than 4 files and 2 CPUs)"
    )
    p.set_defaults(func=run_colorize)

    p = groups["bench"].add_parser("colorize", help="time colorizing the MAESTRO test split on this machine")
    p.add_argument("--limit", type=int, help="only the first N test pieces")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_bench)

    p = groups["bench"].add_parser("velocity", help="per-note cost of the causal model at batch 1 on one core (features + step)")
    p.add_argument("--notes", type=int, default=2000, help="note-ons timed per regime (default 2000)")
    p.add_argument("--gap-ms", type=float, default=5.0, help="idle time between notes in the 'live' regime (default 5 ms)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_bench_step)


def run_train(args: argparse.Namespace, settings) -> int:
    if args.model == "unet":
        import sys

        from cadenza.models.velocity.train_unet import train_unet

        m = train_unet(
            maestro=settings.data.maestro,
            minutes=args.minutes,
            threads=args.threads,
            seed=args.seed,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch=args.batch,
            lr=args.lr or 3e-3,
            base=args.base,
            in_channels=args.in_channels,
            loss=args.loss,
            val_pieces=args.val_pieces,
            command=" ".join(["cadenza", *sys.argv[1:]]),
            **({"out_dir": args.out.parent} if args.out else {}),
        )
        print(json.dumps({k: v for k, v in m.items() if not isinstance(v, list)}, default=str))
        return 0
    if args.model == "offline":
        from cadenza.models.velocity.refine import train_refiner

        m = train_refiner(
            settings.data.maestro,
            minutes=args.minutes,
            threads=args.threads,
            seed=args.seed,
            batch=args.batch,
            seq_len=args.seq_len,
            lr=args.lr or 2e-3,
            epoch_notes=args.epoch_notes,
            limit=args.limit,
            out=args.out,
            context=settings.velocity.context_weights,
        )
        print(
            f"best validation per-piece MAE {m['val_piece_mae']:.3f} (epoch {m['best_epoch']}; "
            f"context model alone {m['val_piece_mae_context_alone']:.3f})"
        )
        return 0
    from cadenza.models.velocity.train import train_velocity

    m = train_velocity(
        args.model,
        settings.data.maestro,
        epochs=args.epochs,
        minutes=args.minutes,
        threads=args.threads,
        seed=args.seed,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr or 2e-3,
        limit=args.limit,
        out=args.out,
        init=args.init,
        hidden=args.hidden,
        epoch_notes=args.epoch_notes,
        freeze=args.freeze_backbone,
    )
    print(f"best validation per-piece MAE {m['val_piece_mae']:.3f} (epoch {m['best_epoch']})")
    return 0


def run_eval(args: argparse.Namespace, settings) -> int:
    from cadenza.models.velocity.evaluate import evaluate, format_table

    res = evaluate(settings.data.maestro, args.split, args.model, limit=args.limit, sweep=not args.no_sweep)
    print(json.dumps(res) if args.json else format_table(res))
    return 0


def run_colorize(args: argparse.Namespace, settings) -> int:
    from cadenza.models.velocity.colorize import colorize_cli

    return colorize_cli(args, settings)


def run_bench(args: argparse.Namespace, settings) -> int:
    from cadenza.models.velocity.colorize import bench_colorize

    return bench_colorize(args, settings)


def run_bench_step(args: argparse.Namespace, settings) -> int:
    """Time what one live note-on costs the causal model, as the engine calls it: incremental
    features, then one batch-1 step, on one core. Two regimes: notes back to back (warm caches),
    and notes with an idle gap between them (what a player's notes look like to the CPU). The
    torch form of the same step is timed beside the numpy form the CPU worker runs, and the numpy
    form once more with the engine's keep-warm ticks (``velocity.keep_warm_ms``) in the gaps."""
    import asyncio
    import time

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from cadenza.models.velocity.causal import NumpyCausalStep, load_causal
    from cadenza.models.velocity.features import LiveVelocityFeatures, replay_events, synthetic_performance
    from cadenza.models.velocity.worker import VelocityWorker

    torch.set_num_threads(1)
    model = load_causal(settings.velocity.weights)
    forms = {"numpy": NumpyCausalStep(model), "torch": model}
    events = replay_events(synthetic_performance(args.notes, seed=5))
    keep_warm_ms = settings.velocity.keep_warm_ms or 1.0  # the live_warm row shows the option even when it is off
    res: dict = {"notes": args.notes, "gap_ms": args.gap_ms, "keep_warm_ms": keep_warm_ms}
    loop = asyncio.new_event_loop()
    warmer = VelocityWorker(load_model=lambda: forms["numpy"], make_features=LiveVelocityFeatures, inline=True)
    warmer.start(loop)
    tick = keep_warm_ms / 1000.0
    regimes = {"numpy": ("back_to_back", "live", "live_warm"), "torch": ("back_to_back", "live")}

    def idle(gap: float, warm: bool) -> None:
        if not (warm and tick > 0):
            time.sleep(gap)
            return
        end = time.perf_counter() + gap
        while (left := end - time.perf_counter()) > 0:
            time.sleep(min(tick, left))
            if end - time.perf_counter() > 0:
                warmer.keep_warm()

    with threadpool_limits(1, user_api="blas"), torch.inference_mode():
        for form, step in forms.items():
            for regime in regimes[form]:
                gap = 0.0 if regime == "back_to_back" else args.gap_ms / 1000.0
                feats, state = LiveVelocityFeatures(), step.initial_state(1)
                tf, ts = [], []
                for t, kind, val, _ in events:
                    if kind == "off":
                        feats.note_off(t, val)
                        continue
                    if kind == "pedal":
                        feats.pedal(t, val)
                        continue
                    t0 = time.perf_counter()
                    x = feats.note_on(t, val)[None]
                    t1 = time.perf_counter()
                    v, state = step.step(x if form == "numpy" else torch.from_numpy(x), state)
                    float(v[0])
                    t2 = time.perf_counter()
                    tf.append(t1 - t0)
                    ts.append(t2 - t1)
                    if gap:
                        idle(gap, regime == "live_warm")
                f, st = np.array(tf) * 1e3, np.array(ts) * 1e3
                tot = f + st
                res[f"{form}_{regime}"] = {
                    k: round(float(v), 4)
                    for k, v in (
                        ("features_p50_ms", np.median(f)),
                        ("step_p50_ms", np.median(st)),
                        ("total_p50_ms", np.median(tot)),
                        ("total_p99_ms", np.percentile(tot, 99)),
                    )
                }
    warmer.stop()
    loop.close()
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"causal velocity model, batch 1, one core, {args.notes} note-ons per row (live: {args.gap_ms:g} ms idle between notes; "
            f"live_warm: keep-warm every {keep_warm_ms:g} ms in the gaps)"
        )
        print(f"  {'':22s} {'features p50':>13s} {'step p50':>9s} {'total p50':>10s} {'total p99':>10s}  (ms)")
        for key in ("numpy_back_to_back", "numpy_live", "numpy_live_warm", "torch_back_to_back", "torch_live"):
            r = res[key]
            print(f"  {key:22s} {r['features_p50_ms']:13.3f} {r['step_p50_ms']:9.3f} {r['total_p50_ms']:10.3f} {r['total_p99_ms']:10.3f}")
    return 0
