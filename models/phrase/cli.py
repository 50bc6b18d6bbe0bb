"""Commands of the phrase model: `train phrase`, `eval phrase`, `continue`, `generate`, `bench continue`.

Parsing only; the work lives in train_phrase, eval_phrase, phrase_files and phrase_bench.
Heavy imports (torch) happen inside the handlers so `cadenza --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path


def register(groups) -> None:
    p = groups["train"].add_parser("phrase", help="train the phrase model (transformer, or the LSTM baseline) on MAESTRO train")
    p.add_argument(
        "--arch",
        choices=["transformer", "lstm"],
        default="transformer",
        help="the transformer (default) or the Performance RNN style LSTM baseline",
    )
    p.add_argument(
        "--minutes", type=float, default=25.0, help="wall-clock limit of this run (default 25); also the schedule without --tokens"
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=0,
        help="declared training-token budget the learning rate decays over (e.g. 3e7); the run also ends when it is spent",
    )
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="decay after warmup (default cosine)")
    p.add_argument("--steps", type=int, default=0, help="stop this run after N steps (default: no limit)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512, help="training window = context length in tokens")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=40, metavar="STEPS")
    p.add_argument("--layers", type=int, help="blocks (transformer default 4) / LSTM layers (default 3); with --init: grow to this many")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, help="embedding width (transformer default 128, LSTM 256)")
    p.add_argument(
        "--pos", choices=["absolute", "rope"], help="positions: rope (default for a new model) or absolute; with --init: convert to rope"
    )
    p.add_argument("--mlp", choices=["gelu", "swiglu"], help="MLP of a new transformer (default swiglu)")
    p.add_argument("--eval-every", type=float, default=150.0, metavar="SECONDS")
    p.add_argument(
        "--checkpoint-every", type=float, default=300.0, metavar="SECONDS", help="write the resumable checkpoint this often (default 300)"
    )
    p.add_argument("--init", type=Path, help="start from these weights (converted with --pos rope, grown with --layers)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint belongs to --out (or --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default .cache/phrase/<out stem>.ckpt)")
    p.add_argument(
        "--pop909",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of each batch from POP909 train, learned as the pop style (default 0)",
    )
    p.add_argument("-o", "--out", type=Path, help="where to write the best weights (default models/weights/phrase_v2 or phrase_lstm)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where to train (default cpu; auto = cuda when present)"
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU)")
    p.set_defaults(func=_train)

    p = groups["eval"].add_parser("phrase", help="NLL and generation statistics of the phrase model on MAESTRO")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, default=None, help="score only N pieces, evenly spaced over the split (default: all)")
    p.add_argument("--prompts", type=int, default=20, help="prompts for the generation statistics")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each generated continuation")
    p.add_argument("--ngram", type=int, default=4, help="order of the n-gram baseline")
    p.add_argument("--weights", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", type=Path, help="also write the JSON result to this file")
    p.add_argument("--files", type=Path, metavar="DIR", help="instead of a split: NLL per token and per second of the MIDI files in DIR")
    p.add_argument(
        "--report",
        type=Path,
        metavar="OUT_DIR",
        help="write the eval-midi report (report.md, figures) of the model's, the n-gram's and the real continuations",
    )
    _answer_flags(p)
    p.set_defaults(func=_eval, prepare=_answer_overrides)

    for name, help_ in (("continue", "append a generated continuation to a MIDI file"), ("generate", "generate a MIDI file from nothing")):
        p = groups["root"].add_parser(name, help=help_)
        if name == "continue":
            p.add_argument("input", type=Path, metavar="IN.mid")
        p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.mid")
        p.add_argument("--seconds", type=float, default=10.0, help="length to generate (default 10)")
        _sampling_flags(p)
        if name == "generate":  # a continuation plays on the input's own channel
            p.add_argument("--channel", type=int, default=0, help="MIDI channel of the generated notes (0-15)")
        if name == "continue":
            _answer_flags(p)
        p.set_defaults(func=_continue if name == "continue" else _generate, prepare=_sampling_overrides)

    p = groups["bench"].add_parser("continue", help="phrase model speed: cached tokens/s, speedup over re-running, time to first note")
    p.add_argument("--weights", type=Path)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--prompt", type=int, default=512, help="context tokens before generating")
    p.add_argument("--tokens", type=int, default=256, help="tokens to generate")
    p.add_argument("--calls", type=int, default=50, help="phrase-end calls for the TTFN measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)


def _sampling_flags(p) -> None:
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--style", choices=["classical", "pop"], help="classical (MAESTRO, the default) or pop (POP909)")
    p.add_argument("--weights", type=Path)


def _answer_flags(p) -> None:
    p.add_argument("--best-of", type=int, help="candidate answers per horizon, the best kept ([phrase] best_of; 1 = off)")
    p.add_argument("--key-guard", type=float, help="logit penalty on notes outside the call's key ([phrase] key_guard; 0 = off)")
    p.add_argument(
        "--register-guard", type=float, help="logit penalty per octave beyond the call's range ([phrase] register_guard; 0 = off)"
    )
    p.add_argument(
        "--pace-guard",
        type=float,
        help="NOTE_ON bias that keeps the answer near the call's notes per second ([phrase] pace_guard; 0 = off)",
    )


def _answer_overrides(args) -> None:
    from cadenza.cli import add_override

    for key in ("best_of", "key_guard", "register_guard", "pace_guard"):
        add_override(args, "phrase", key, getattr(args, key, None))


def _sampling_overrides(args) -> None:
    """Sampling flags are settings overrides, so a bad value fails with the config's one line."""
    from cadenza.cli import add_override

    for key in ("temperature", "top_k", "top_p", "seed", "style", "weights"):
        add_override(args, "phrase", key, getattr(args, key))
    _answer_overrides(args)


def _train(args, settings) -> int:
    from cadenza.models.phrase.model import WEIGHTS_DIR
    from cadenza.models.phrase.train import TrainOptions, train

    lstm = args.arch == "lstm"
    opt = TrainOptions(
        minutes=args.minutes,
        tokens=int(args.tokens),
        schedule=args.schedule,
        steps=args.steps,
        threads=args.threads,
        seed=args.seed,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup,
        arch=args.arch,
        n_layer=args.layers or (3 if lstm else 4),
        n_head=args.heads,
        n_embd=args.width or (256 if lstm else 128),
        pos=args.pos,
        mlp=args.mlp,
        eval_every_s=args.eval_every,
        checkpoint_every_s=args.checkpoint_every,
        init=args.init,
        resume=args.resume,
        checkpoint=args.checkpoint,
        pop909=args.pop909,
        pop909_root=settings.data.pop909,
        device=args.device,
        bf16=args.bf16,
        compile=args.compile,
        out=args.out or WEIGHTS_DIR / ("phrase_lstm.safetensors" if lstm else "phrase_v2.safetensors"),
    )
    result = train(settings.data.maestro, opt, progress=not args.no_progress)
    b = result["best"]
    print(
        f"phrase {opt.arch}: {result['params']:,} parameters, {result['steps']} steps, {result['tokens']:,} tokens (stopped: {result['stopped']})"
    )
    print(
        f"best validation NLL {b['val_nll']:.4f} nats/token at step {b['step']} -> {opt.out}; resume with --resume (checkpoint {result['checkpoint']})"
    )
    return 0


def _eval(args, settings) -> int:
    from cadenza.models.phrase.answer import options_from
    from cadenza.models.phrase.evaluate import evaluate, format_report

    if args.files is not None:
        from cadenza.models.phrase.nll_files import files_nll, format_files

        result = files_nll(args.files, weights=args.weights or settings.phrase.weights, threads=args.threads)
        print(json.dumps(result) if args.json else format_files(result))
        return 0
    result = evaluate(
        settings.data.maestro,
        split=args.split,
        limit=args.limit,
        prompts=args.prompts,
        seconds=args.seconds,
        ngram_order=args.ngram,
        weights=args.weights or settings.phrase.weights,
        seed=args.seed,
        threads=args.threads,
        sampling=settings.phrase,
        pop909_root=settings.data.pop909,
        answer=options_from(settings.phrase),
        report=args.report,
    )
    if args.save:
        from cadenza.atomic import write_atomic

        write_atomic(args.save, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _continue(args, settings) -> int:
    from cadenza.models.phrase.answer import options_from
    from cadenza.models.phrase.files import continue_file

    c = settings.phrase
    n = continue_file(
        args.input,
        args.output,
        seconds=args.seconds,
        temperature=c.temperature,
        top_k=c.top_k,
        top_p=c.top_p,
        seed=c.seed,
        weights=c.weights,
        style=c.style,
        answer=options_from(c),
    )
    print(f"{args.output}: input kept, {n} generated notes appended as a new track ({args.seconds:g} s)")
    return 0


def _generate(args, settings) -> int:
    from cadenza.models.phrase.files import generate_file

    c = settings.phrase
    n = generate_file(
        args.output,
        seconds=args.seconds,
        temperature=c.temperature,
        top_k=c.top_k,
        top_p=c.top_p,
        seed=c.seed,
        weights=c.weights,
        channel=args.channel,
        style=c.style,
    )
    print(f"{args.output}: {n} notes, {args.seconds:g} s")
    return 0


def _bench(args, settings) -> int:
    from cadenza.bench import engine_ttfn
    from cadenza.models.phrase.bench import format_bench, run_bench

    result = run_bench(
        weights=args.weights or settings.phrase.weights,
        device=args.device or settings.phrase.device,
        threads=args.threads,
        prompt=args.prompt,
        tokens=args.tokens,
        calls=args.calls,
        settings=settings,
        ttfn=engine_ttfn,
    )
    print(json.dumps(result) if args.json else format_bench(result))
    return 0
