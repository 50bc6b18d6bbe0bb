"""The file commands through `cadenza.cli.main`: bad inputs give one line and no output."""

from __future__ import annotations

import pytest

from .helpers import scale_melody, write_notes


def _bad(tmp_path, case):
    p = tmp_path / f"{case}.mid"
    if case == "empty":
        write_notes(p, [])
    elif case == "drums":
        write_notes(p, scale_melody(), channel=9)
    elif case == "waltz":
        write_notes(p, scale_melody(), ts=(3, 4))
    elif case == "corrupt":
        p.write_bytes(b"MThd\x00\x00\x00\x06garbage!")
    else:
        p = tmp_path / "missing.mid"
    return p


@pytest.mark.parametrize("case", ["empty", "drums", "waltz", "corrupt", "missing"])
@pytest.mark.parametrize("cmd", ["reconstruct", "vary", "attribute"])
def test_bad_input_one_line_error_no_output(vae_main, tmp_path, capsys, case, cmd):
    src = _bad(tmp_path, case)
    out = tmp_path / "out"
    argv = {
        "reconstruct": ["vae", "reconstruct", str(src), "-o", str(out / "x.mid")],
        "vary": ["vae", "vary", str(src), "-o", str(out), "-n", "2"],
        "attribute": ["vae", "attribute", str(src), "--attribute", "density", "-o", str(out / "x.mid")],
    }[cmd]
    rc = vae_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("cadenza: error:"), err
    assert not (out / "x.mid").exists() and not list(out.glob("*.mid")) if out.exists() else True


def test_folder_reconstruct_keeps_names_and_reports_bad_files(vae_main, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_notes(src / "good.mid", scale_melody())
    write_notes(src / "waltz.mid", scale_melody(), ts=(3, 4))
    rc = vae_main(["vae", "reconstruct", str(src), "-o", str(tmp_path / "out"), "--no-progress"])
    cap = capsys.readouterr()
    assert rc != 0
    assert (tmp_path / "out" / "good.mid").is_file() and not (tmp_path / "out" / "waltz.mid").exists()
    assert sum("waltz.mid" in line for line in cap.err.splitlines()) == 1
    assert "reconstructed 1 of 2" in cap.out


def test_sample_interpolate_vary(vae_main, tmp_path):
    a = write_notes(tmp_path / "a.mid", scale_melody())
    b = write_notes(tmp_path / "b.mid", scale_melody(base=55))
    assert vae_main(["vae", "sample", "-n", "3", "-o", str(tmp_path / "s"), "--seed", "1"]) == 0
    assert len(list((tmp_path / "s").glob("*.mid"))) == 3
    assert vae_main(["vae", "interpolate", str(a), str(b), "-n", "4", "-o", str(tmp_path / "i")]) == 0
    assert len(list((tmp_path / "i").glob("*.mid"))) == 4
    assert vae_main(["vae", "vary", str(a), "--amount", "0.3", "-n", "2", "-o", str(tmp_path / "v"), "--seed", "0"]) == 0
    assert len(list((tmp_path / "v").glob("*.mid"))) == 2
    assert vae_main(["vae", "sample", "-n", "0", "-o", str(tmp_path / "z")]) != 0
