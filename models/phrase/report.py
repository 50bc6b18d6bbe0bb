"""`cadenza eval phrase --report DIR`: the eval-midi report for the answers of the generation study.

Each generator's answers (the model's, the n-gram's, the real continuations, any extra one) are
one set; they are compared with the same reference as ``cadenza eval midi`` (MAESTRO test, or the
shipped statistics) and written as report.md plus figures, with the call-relatedness table and
the overlap with the real continuation added below.
"""

from __future__ import annotations

from pathlib import Path

from cadenza.models.evaluation.midi import collect_performances, evaluate_sets, format_table, reference
from cadenza.models.evaluation.report import write_report
from cadenza.models.phrase.calls import StudyResult
from cadenza.models.phrase.relatedness import RELATEDNESS


def _md_table(title: str, rows: dict[str, dict], cols) -> str:
    lines = [f"## {title}", "", "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k, d in rows.items():
        if isinstance(d, dict):
            lines.append(f"| {k} | " + " | ".join("–" if d.get(c) is None else f"{d[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def phrase_report(out_dir: Path, study: StudyResult, maestro_root: Path | None) -> Path:
    sets = [collect_performances(name, perfs) for name, perfs in study.answers.items()]
    ref = reference(None, maestro_root, progress=False)
    result = evaluate_sets(ref, sets)
    from cadenza.models.phrase.evaluate import STATS

    extra = "\n\n".join(
        [
            _md_table("Call-relatedness (answer vs the prompt's last seconds)", study.relatedness, RELATEDNESS),
            "pc_corr: correlation of pitch-class profiles (higher = closer); register: semitones between mean pitches; "
            "density, ioi: |log2| of the ratio of notes per second and of median inter-onset intervals (lower = closer).",
            _md_table(
                f"Overlap with the real next {study.overlap.get('seconds', 0):g} s ({study.overlap.get('prompts', 0)} prompts)",
                study.overlap,
                (*STATS, "mean"),
            ),
        ]
    )
    path = write_report(out_dir, ref, sets, result, extra=extra)
    print(format_table(result))
    return path
