"""The sampler study of docs/evaluation.md: the generation study of `cadenza eval phrase`
(models/phrase/calls.py) for several sampling settings at once, without the likelihood scoring.

    python docs/tools/sampler_study.py WEIGHTS PROMPTS SETTING...

A SETTING is comma-separated key=value: t (temperature, 0.9), p (top-p, 0.95), k (top-k, 0),
n (best-of-N, 1), kg / rg / pg (key / register / pace guard, 0), la (lookahead seconds, 1), and w_<name>
for a best-of-N fit weight (w_loglik, w_pc, w_register, w_density, w_ioi, ...). Prints one line
per setting and one for the real continuation: overlap with the real next 10 s, mean note length,
notes per second, call-relatedness. MAESTRO validation, seed 0: every setting answers the same
prompts. Needs the shared data ([data] root).
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cadenza.config.settings import load_settings
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.answer import AnswerOptions
from cadenza.models.phrase.calls import Named, live_generator, real_next, study
from cadenza.models.phrase.data import load_split
from cadenza.models.phrase.live import LivePhrase
from cadenza.models.phrase.model import load_phrase
from cadenza.models.phrase.relatedness import FitWeights


@dataclass
class Sampling:
    temperature: float
    top_k: int
    top_p: float


def generator(model, spec: str) -> Named:
    kw = dict(kv.split("=") for kv in spec.split(",")) if spec else {}
    sampling = Sampling(float(kw.get("t", 0.9)), int(kw.get("k", 0)), float(kw.get("p", 0.95)))
    opts = AnswerOptions(
        best_of=int(kw.get("n", 1)),
        weights=FitWeights(**{k[2:]: float(v) for k, v in kw.items() if k.startswith("w_")}),
        key_guard=float(kw.get("kg", 0)),
        register_guard=float(kw.get("rg", 0)),
        pace_guard=float(kw.get("pg", 0)),
        lookahead_s=float(kw.get("la", 1.0)),
    )
    return Named(spec, live_generator(LivePhrase(model, answer=opts), sampling))


def main() -> None:
    torch.set_num_threads(1)
    weights, prompts, specs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    model = load_phrase(weights)
    ts = load_split(load_settings().data.maestro, "validation", progress=False)
    gens = [generator(model, s) for s in specs] + [Named("real", real_next)]
    t0 = time.monotonic()
    res = study(gens, lambda i: tk.decode_tokens(ts.piece(i)[1:]), len(ts), prompts=prompts, seconds=10.0, seed=0, progress=False)
    for g in gens:
        answers, ov, rel = res.answers[g.name], res.overlap.get(g.name, {}), res.relatedness[g.name]
        length = np.mean([np.mean(a.offset - a.onset) if len(a.onset) else 0.0 for a in answers])
        rate = np.mean([len(a.onset) / 10.0 for a in answers])
        overlaps = " ".join(f"{k}={v:.3f}" for k, v in ov.items() if isinstance(v, float))
        related = " ".join(f"{k}={v:.2f}" for k, v in rel.items() if v is not None)
        print(f"{g.name:40s} {overlaps} | length={length:.3f}s notes/s={rate:.2f} | {related}")
    prev = " ".join(f"{k}={v:.3f}" for k, v in res.overlap["previous_real"].items())
    print(f"{'real previous 10 s':40s} {prev} | {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
