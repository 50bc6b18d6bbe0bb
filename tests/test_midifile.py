import io

import mido
import numpy as np
import pytest

from cadenza.errors import MidiFileError
from cadenza.messages import control, note_off, note_on
from cadenza.midifile import MidiFile, parse, read_vlq, track_chunk, write_performance, write_vlq


def _file(tmp_path, name="a.mid"):
    mid = mido.MidiFile(ticks_per_beat=480)
    tr = mido.MidiTrack()
    tr += [
        mido.MetaMessage("set_tempo", tempo=600_000, time=0),
        mido.Message("control_change", control=64, value=127, time=0),
        mido.Message("note_on", note=60, velocity=50, time=0),
        mido.Message("note_on", note=64, velocity=60, time=0),
        mido.MetaMessage("text", text="keep me", time=10),
        mido.Message("note_off", note=60, velocity=0, time=470),
        mido.MetaMessage("set_tempo", tempo=300_000, time=0),
        mido.Message("note_on", note=64, velocity=0, time=480),
        mido.Message("control_change", control=64, value=0, time=0),
    ]
    mid.tracks.append(tr)
    path = tmp_path / name
    mid.save(path)
    return path


def test_notes_times_and_pedal(tmp_path):
    perf = MidiFile.load(_file(tmp_path)).performance
    assert list(perf.pitch) == [60, 64]
    assert list(perf.velocity) == [50, 60]
    assert perf.offset[0] == pytest.approx(0.6)  # 480 ticks at 0.6 s/beat
    assert perf.offset[1] == pytest.approx(0.6 + 0.3)  # then 480 ticks at 0.3 s/beat
    assert list(perf.pedal_v) == [127, 0] and perf.pedal_t[1] == pytest.approx(0.9)


def test_velocity_patch_changes_nothing_else(tmp_path):
    src = _file(tmp_path)
    mf = MidiFile.load(src)
    out = tmp_path / "out.mid"
    mf.save_with_velocities(np.array([100, 20]), out)
    a, b = src.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert sorted(diff) == sorted(mf.velocity_offsets.tolist())
    assert list(MidiFile.load(out).performance.velocity) == [100, 20]


@pytest.mark.parametrize("cut", [5, 14, 30, -3])
def test_truncated_and_corrupt_files_give_one_line(tmp_path, cut):
    data = _file(tmp_path).read_bytes()
    bad = tmp_path / "bad.mid"
    bad.write_bytes(data[:cut])
    with pytest.raises(MidiFileError) as exc:
        MidiFile.load(bad)
    assert "\n" not in str(exc.value) and "bad.mid" in str(exc.value)


def test_not_midi_and_missing(tmp_path):
    (tmp_path / "x.mid").write_text("hello, not MIDI at all")
    with pytest.raises(MidiFileError, match="not a standard MIDI file"):
        MidiFile.load(tmp_path / "x.mid")
    with pytest.raises(MidiFileError, match="no such file"):
        MidiFile.load(tmp_path / "none.mid")
    with pytest.raises(MidiFileError):
        parse(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0MTrk\x00\x00\x00\x04\x00\x3c\x40\x00")


def test_write_performance_round_trip(tmp_path):
    perf = MidiFile.load(_file(tmp_path)).performance
    write_performance(perf, tmp_path / "w.mid")
    back = MidiFile.load(tmp_path / "w.mid").performance
    assert np.allclose(back.onset, perf.onset, atol=1e-3) and np.allclose(back.offset, perf.offset, atol=1e-3)
    assert list(back.velocity) == list(perf.velocity)
    assert mido.MidiFile(file=io.BytesIO((tmp_path / "w.mid").read_bytes())).length == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize(
    ("n", "encoded"), [(0, b"\x00"), (0x7F, b"\x7f"), (0x80, b"\x81\x00"), (0x3FFF, b"\xff\x7f"), (0x0FFFFFFF, b"\xff\xff\xff\x7f")]
)
def test_vlq_write_matches_the_standard_and_reads_back(n, encoded):
    assert write_vlq(n) == encoded  # the examples of the SMF 1.0 specification
    assert read_vlq(encoded, 0, len(encoded)) == (n, len(encoded))


def test_track_chunk_is_read_by_mido():
    chunk = track_chunk([(0, note_on(0, 60, 90)), (480, note_off(0, 60)), (240, control(0, 64, 127))], name=b"t")
    header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big") + (480).to_bytes(2, "big")
    mid = mido.MidiFile(file=io.BytesIO(header + chunk))
    msgs = list(mid.tracks[0])
    assert msgs[0].type == "track_name" and msgs[0].name == "t"
    assert [(m.type, m.time) for m in msgs[1:]] == [("note_on", 0), ("note_off", 480), ("control_change", 0), ("end_of_track", 0)]


def test_with_track_keeps_every_byte_and_follows_the_tempo_map(tmp_path):
    src = _file(tmp_path)  # 0.6 s/beat for 480 ticks, then 0.3 s/beat
    mf = MidiFile.load(src)
    assert mf.seconds_to_ticks(0.6) == 480 and mf.seconds_to_ticks(0.9) == 960
    data = mf.with_track([(0.3, note_on(0, 72, 80)), (0.9, note_off(0, 72))], name=b"added")
    assert data[12 : len(mf.data)] == mf.data[12:]  # the existing tracks, byte for byte
    assert int.from_bytes(data[8:10], "big") == 1 and int.from_bytes(data[10:12], "big") == 2
    (tmp_path / "more.mid").write_bytes(data)
    perf = MidiFile.load(tmp_path / "more.mid").performance
    added = perf.pitch == 72
    assert perf.onset[added][0] == pytest.approx(0.3) and perf.offset[added][0] == pytest.approx(0.9)
    assert list(perf.pitch[~added]) == [60, 64]
