"""cadenza eval midi and eval phrase --files: statistics, overlap/KL, report, skipped files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cadenza.cli import main
from cadenza.midifile import Performance, write_performance
from cadenza.models.evaluation.midi import SHIPPED_REFERENCE, collect, load_stats, midi_files
from cadenza.models.evaluation.stats import FEATURES, SetStats, compare


def _perf(seed: int, n: int = 120, low: int = 48, high: int = 84) -> Performance:
    rng = np.random.default_rng(seed)
    on = np.cumsum(rng.uniform(0.05, 0.4, n))
    return Performance(
        on,
        on + rng.uniform(0.05, 0.8, n),
        rng.integers(low, high, n).astype(np.int16),
        rng.integers(30, 110, n).astype(np.int16),
        np.zeros(n, np.int8),
    )


@pytest.fixture()
def folders(tmp_path):
    a, b = tmp_path / "low", tmp_path / "high"
    for i in range(3):
        write_performance(_perf(i, low=36, high=60), a / f"{i}.mid")
        write_performance(_perf(10 + i, low=60, high=96), b / "sub" / f"{i}.midi")
    (a / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    return a, b


def test_identical_sets_overlap_fully_and_disjoint_ones_do_not():
    s1, s2, s3 = SetStats("a"), SetStats("b"), SetStats("c")
    s1.add(_perf(0))
    s2.add(_perf(0))
    s3.add(_perf(1, low=90, high=100))
    same, other = compare(s1, s2), compare(s1, s3)
    assert all(same[k]["overlap"] == pytest.approx(1.0) and same[k]["kl"] == pytest.approx(0.0, abs=1e-9) for k in FEATURES)
    assert other["pitch"]["overlap"] == 0.0 and other["pitch"]["kl"] > 5
    assert other["mean"]["overlap"] < same["mean"]["overlap"]


def test_stats_round_trip_through_json_and_the_shipped_reference_loads():
    s = SetStats("x")
    s.add(_perf(3))
    again = SetStats.from_json(json.loads(json.dumps(s.to_json())))
    assert all(np.array_equal(s.hist[k], again.hist[k]) for k in FEATURES) and again.summary() == s.summary()
    ref = load_stats(SHIPPED_REFERENCE)
    assert ref.files == 178 and ref.notes > 100_000  # MAESTRO v2 test


def test_corrupt_file_is_one_line_and_skipped(folders):
    a, _ = folders
    lines: list[str] = []
    c = collect("low", midi_files(a), progress=False, warn=lines.append)
    assert c.stats.files == 3 and len(lines) == 1 and "corrupt.mid" in lines[0] and c.skipped == [str(a / "corrupt.mid")]


def test_eval_midi_json_and_report(folders, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "rep"
    rc = main(["eval", "midi", str(a), str(b), "--reference", str(SHIPPED_REFERENCE), "--report", str(out), "--json", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err.count("skipped") == 1
    r = json.loads(cap.out)
    assert set(r) >= {"reference", "sets", "features"} and set(r["sets"]) == {"low", "high"}
    for s in r["sets"].values():
        assert set(s["vs_reference"]) == {*FEATURES, "mean"}
        assert all(set(v) == {"overlap", "kl"} for v in s["vs_reference"].values())
    assert r["sets"]["low"]["files"] == 3 and r["sets"]["high"]["files"] == 3
    assert r["sets"]["low"]["pitch_mean"] < 60 < r["sets"]["high"]["pitch_mean"]
    text = (out / "report.md").read_text()
    assert "| pitch |" in text and "low" in text and "high" in text
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"comparison.png", *(f"{n}_{f}.png" for n in ("low", "high") for f in ("distributions", "pianoroll", "pitch"))}
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_folder_as_reference_and_nothing_readable_fails(folders, tmp_path, capsys):
    a, b = folders
    assert main(["eval", "midi", str(a), "--reference", str(a), "--no-progress"]) == 0
    assert "1.000" in capsys.readouterr().out  # a folder against itself
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mid").write_bytes(b"nope")
    assert main(["eval", "midi", str(bad), "--reference", str(SHIPPED_REFERENCE), "--no-progress"]) == 1
    assert "no readable MIDI file" in capsys.readouterr().err


def test_eval_phrase_files_gives_nll(folders, capsys):
    a, _ = folders
    assert main(["eval", "phrase", "--files", str(a), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["files"] == 3 and r["nll_per_token"] > 0 and r["nll_per_second"] > 0 and len(r["skipped"]) == 1
