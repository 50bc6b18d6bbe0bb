"""Commands of MusicVAE: `vae sample|interpolate|vary|reconstruct|attribute`, `train vae`, `eval vae`, `bench vae`.

Parsing only; the work lives in train, evaluate, files and bench. Heavy imports (torch) happen
inside the handlers so `cadenza --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS = ("mel_2bar", "mel_16bar", "mel_16bar_flat")
ATTRIBUTES = ("density", "interval", "register", "syncopation")


def _model_flag(p, default="mel_2bar") -> None:
    p.add_argument("--model", default=default, choices=MODELS, help=f"which VAE (default {default})")
    p.add_argument("--weights", type=Path, help="other weights (.safetensors) for that model")


def register(groups) -> None:
    vae = groups["root"].add_parser("vae", help="MusicVAE: sample, interpolate, vary, reconstruct and steer melodies")
    sub = vae.add_subparsers(dest="vae_what", metavar="WHAT", required=True)

    p = sub.add_parser("sample", help="write N melodies sampled from the latent prior")
    _model_flag(p)
    p.add_argument("-n", type=int, default=4, help="how many (default 4)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--temperature", type=float, default=0.5, help="decoder sampling temperature (default 0.5; 0 = greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bpm", type=float, default=120.0)
    p.set_defaults(func=_files, op="sample")

    p = sub.add_parser("interpolate", help="N melodies on the latent path from A to B (both ends included)")
    p.add_argument("a", type=Path, metavar="A.mid")
    p.add_argument("b", type=Path, metavar="B.mid")
    _model_flag(p)
    p.add_argument("-n", type=int, default=5)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--bpm", type=float, default=None, help="tempo of the output (default: A's)")
    p.set_defaults(func=_files, op="interpolate")

    p = sub.add_parser("vary", help="N variations of a melody: its latent code plus noise")
    p.add_argument("input", type=Path, metavar="IN.mid")
    _model_flag(p)
    p.add_argument("--amount", type=float, default=0.5, help="noise scale in prior standard deviations (default 0.5)")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bpm", type=float, default=None)
    p.set_defaults(func=_files, op="vary")

    p = sub.add_parser("reconstruct", help="encode and decode melodies (posterior mean, greedy); a folder in, a folder out")
    p.add_argument("inputs", type=Path, nargs="+", metavar="IN.mid|DIR")
    _model_flag(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.mid|OUT_DIR")
    p.add_argument("--bpm", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_files, op="reconstruct")

    p = sub.add_parser("attribute", help="move a melody along an attribute vector")
    p.add_argument("input", type=Path, metavar="IN.mid")
    _model_flag(p)
    p.add_argument("--attribute", required=True, choices=ATTRIBUTES)
    p.add_argument("--amount", type=float, default=1.0, help="multiples of the attribute vector (negative = less)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.mid")
    p.add_argument("--bpm", type=float, default=None)
    p.set_defaults(func=_files, op="attribute")

    p = sub.add_parser("vectors", help="compute a model's attribute vectors from POP909 train into its shipped weights")
    _model_flag(p)
    p.set_defaults(func=_vectors)

    p = groups["train"].add_parser("vae", help="train a MusicVAE on POP909 train (resumable)")
    p.add_argument("--model", default="mel_2bar", choices=MODELS)
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of this run (default 25)")
    p.add_argument("--max-steps", type=int, default=0, help="stop at this total step (default: budget only)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (2-bar), 32 (16-bar)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--lr-decay", type=float, default=0.9998, help="learning rate = lr * decay ** step, floor 1e-5 (default 0.9998, per step)"
    )
    p.add_argument("--epoch-size", type=int, default=None, help="training windows per epoch (default 8192 2-bar, 2048 16-bar)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--fresh", action="store_true", help="ignore the checkpoint under .cache/vae and start afresh")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override, e.g. z_dim=256")
    p.add_argument("-o", "--out", type=Path, help="where to write the weights (default: the shipped ones)")
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="CKPT",
        help="start from another run's checkpoint (its weights and step; new optimizer and lr schedule), "
        "e.g. to add the bar_skip paths to a trained 16-bar model with --set bar_skip=true",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)

    p = groups["eval"].add_parser("vae", help="reconstruction, prior, interpolation and attribute metrics on POP909")
    _model_flag(p)
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--limit", type=int, default=1000, help="windows scored (evenly spaced over the split; default 1000)")
    p.add_argument("--samples", type=int, default=500, help="prior samples (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", action="store_true", help="also store the result as the weights' `eval_<split>` metrics")
    p.set_defaults(func=_eval)

    p = groups["bench"].add_parser("vae", help="encode+decode latency at batch 1 on one core, and batched throughput")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)


def _parse_sets(items) -> dict:
    from cadenza.errors import ConfigError

    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _train(args, settings) -> int:
    from .train import TrainOptions, train

    big = args.model != "mel_2bar"
    opt = TrainOptions(
        model=args.model,
        minutes=args.minutes,
        max_steps=args.max_steps,
        batch=args.batch or (32 if big else 64),
        lr=args.lr,
        lr_decay=args.lr_decay,
        epoch_size=args.epoch_size or (2048 if big else 8192),
        seed=args.seed,
        threads=args.threads,
        resume=not args.fresh,
        out=args.out,
        init_from=args.init_from,
        overrides=_parse_sets(args.set),
    )
    r = train(settings.data.pop909, opt, progress=not args.no_progress)
    b = r["best"]
    print(
        f"{args.model}: {r['params']:,} parameters, {r['steps']} steps; best validation greedy accuracy "
        f"{b['greedy_acc']:.4f} (teacher-forced {b['tf_acc']:.4f}, KL {b['kl_bits']:.1f} bits) at step {b['step']} -> {r['out']}"
    )
    if args.out is None:
        # The attribute vectors belong to a latent space: new weights need their own (the
        # training saved the model's tensors only). After an interrupted run: `cadenza vae vectors`.
        from .attributes import add_vectors_to_weights

        add_vectors_to_weights(settings.data.pop909, args.model)
        print(f"{args.model}: attribute vectors computed from the training set and stored with the weights")
    return 0


def _eval(args, settings) -> int:
    from .evaluate import evaluate, format_report

    r = evaluate(
        settings.data.pop909,
        args.weights or args.model,
        split=args.split,
        limit=args.limit,
        samples=args.samples,
        seed=args.seed,
        threads=args.threads,
        save=args.save,
    )
    print(json.dumps(r) if args.json else format_report(r))
    return 0


def _bench(args, settings) -> int:
    from .bench import bench, format_bench

    r = bench(args.models, repeats=args.repeats)
    print(json.dumps(r) if args.json else format_bench(r))
    return 0


def _vectors(args, settings) -> int:
    from cadenza.errors import ConfigError

    from .attributes import add_vectors_to_weights

    if getattr(args, "weights", None):
        raise ConfigError("vae vectors writes into the shipped weights of --model; --weights is not supported")
    vecs = add_vectors_to_weights(settings.data.pop909, args.model)
    print(f"{args.model}: attribute vectors stored ({', '.join(f'{k} |{float(v.norm()):.2f}|' for k, v in vecs.items())})")
    return 0


def _files(args, settings) -> int:
    from . import files

    return files.run(args)


if __name__ == "__main__":  # usable before the command module is listed in cadenza.cli
    import sys

    import cadenza.cli as _cli

    if "cadenza.models.vae.cli" not in _cli.COMMAND_MODULES:
        _cli.COMMAND_MODULES = tuple(_cli.COMMAND_MODULES) + ("cadenza.models.vae.cli",)
    sys.exit(_cli.main(sys.argv[1:]))
