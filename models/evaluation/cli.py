"""`cadenza eval midi`: parsing only; the work is in midi.py and report.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(groups) -> None:
    p = groups["eval"].add_parser("midi", help="statistics of folders of MIDI files against MAESTRO test (or --reference)")
    p.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="folders of .mid/.midi files (searched recursively)")
    p.add_argument(
        "--reference",
        type=Path,
        metavar="DIR|STATS.json",
        help="compare with this folder or statistics file (default: MAESTRO test when present, else the shipped statistics)",
    )
    p.add_argument("--report", type=Path, metavar="OUT_DIR", help="write report.md and PNG figures here")
    p.add_argument("--save-reference", type=Path, metavar="STATS.json", help="also write the reference's statistics to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval_midi)


def _eval_midi(args, settings) -> int:
    from cadenza.atomic import write_atomic
    from cadenza.models.evaluation.midi import collect, evaluate_sets, format_table, midi_files, reference

    sets = []
    for folder in args.folders:
        name = folder.resolve().name or str(folder)
        sets.append(collect(name, midi_files(folder), progress=not args.no_progress))
    if not any(c.stats.files for c in sets):
        print("cadenza: error: no readable MIDI file in " + ", ".join(map(str, args.folders)), file=sys.stderr)
        return 1
    ref = reference(args.reference, settings.data.maestro, progress=not args.no_progress)
    if args.save_reference:
        write_atomic(args.save_reference, (json.dumps(ref.to_json()) + "\n").encode())
    result = evaluate_sets(ref, sets)
    if args.report:
        from cadenza.models.evaluation.report import write_report

        result["report"] = str(write_report(args.report, ref, sets, result))
    print(json.dumps(result) if args.json else format_table(result))
    return 0
