"""Melody attributes, melody statistics, validity, and attribute vectors in the latent space.

Attributes of one melody (events in the LO..HI encoding):
  density      note-ons per bar
  interval     mean absolute interval between consecutive notes, semitones
  register     mean MIDI pitch of the note-ons
  syncopation  share of note-ons that fall off the quarter-note beat

An attribute vector is mean(mu of training melodies in the top quartile of the attribute) minus
mean(mu of those in the bottom quartile) (MusicVAE, section 5.3); it ships in the weights file as
the tensor ``attr.<name>``.
"""

from __future__ import annotations

import numpy as np

from .data import LO, NOTE_OFF, STEPS_PER_BAR

NAMES = ("density", "interval", "register", "syncopation")


def note_ons(ev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, MIDI pitches) of the note-ons."""
    pos = np.flatnonzero(ev >= 2)
    return pos, ev[pos].astype(int) - 2 + LO


def attributes(ev: np.ndarray) -> np.ndarray:
    ev = np.asarray(ev)
    pos, p = note_ons(ev)
    bars = len(ev) / STEPS_PER_BAR
    dens = len(pos) / bars
    inter = float(np.abs(np.diff(p)).mean()) if len(p) > 1 else 0.0
    reg = float(p.mean()) if len(p) else float("nan")
    sync = float(np.mean(pos % 4 != 0)) if len(p) else 0.0
    return np.array([dens, inter, reg, sync])


def attribute_matrix(evs: np.ndarray) -> np.ndarray:
    return np.stack([attributes(e) for e in evs])


def is_valid(ev: np.ndarray) -> bool:
    """A valid melody: at least 2 note-ons, and no note-off while nothing sounds."""
    ev = np.asarray(ev)
    if np.count_nonzero(ev >= 2) < 2:
        return False
    sounding = False
    for e in ev:
        if e == NOTE_OFF:
            if not sounding:
                return False
            sounding = False
        elif e >= 2:
            sounding = True
    return True


def histograms(evs: np.ndarray) -> dict[str, np.ndarray]:
    """Normalised histograms over a set of melodies: pitch class, interval (-12..12, clipped),
    note density (note-ons per bar, 0..16), onset position in the beat (the 4 sixteenths: syncopation)."""
    pc = np.zeros(12)
    iv = np.zeros(25)
    de = np.zeros(17)
    sy = np.zeros(4)
    T = evs.shape[1]
    for ev in evs:
        pos, p = note_ons(ev)
        np.add.at(pc, p % 12, 1)
        np.add.at(iv, np.clip(np.diff(p), -12, 12) + 12, 1)
        np.add.at(sy, pos % 4, 1)
        for b in range(T // STEPS_PER_BAR):
            n = int(np.count_nonzero(ev[b * STEPS_PER_BAR : (b + 1) * STEPS_PER_BAR] >= 2))
            de[min(n, 16)] += 1
    return {k: v / max(v.sum(), 1e-9) for k, v in (("pitch_class", pc), ("interval", iv), ("density", de), ("syncopation", sy))}


def overlap(a: dict, b: dict) -> dict[str, float]:
    """Overlapping area of each pair of normalised histograms (1 = identical)."""
    return {k: round(float(np.minimum(a[k], b[k]).sum()), 4) for k in a}


def compute_vectors(model, windows, n: int = 4000, seed: int = 0) -> dict:
    """Attribute vectors from ``n`` training windows (shift 0), as torch tensors."""
    import torch

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(windows), min(n, len(windows)), replace=False))
    x = windows.encode(idx)
    with torch.no_grad():
        mus = torch.cat([model.encode(torch.from_numpy(x[i : i + 256]))[0] for i in range(0, len(x), 256)])
    att = attribute_matrix(x)
    out = {}
    for j, name in enumerate(NAMES):
        a = att[:, j]
        lo, hi = np.nanquantile(a, 0.25), np.nanquantile(a, 0.75)
        hi_m = torch.from_numpy(a >= hi) if hi > lo else torch.from_numpy(a > lo)
        lo_m = torch.from_numpy(a <= lo) if hi > lo else torch.from_numpy(a < hi)
        out[name] = (mus[hi_m].mean(0) - mus[lo_m].mean(0)).float()
    return out


def add_vectors_to_weights(root, name: str, n: int = 4000) -> dict:
    """Compute the attribute vectors of shipped model ``name`` and store them in its weights."""
    from safetensors.torch import load_file

    from .data import load_windows
    from .weights import read_meta, save_tensors, weights_path, write_meta

    p = weights_path(name)
    tensors = {k: v for k, v in load_file(str(p)).items() if not k.startswith("attr.")}
    from .weights import load_model

    model, meta, _ = load_model(name)
    vecs = compute_vectors(model, load_windows(root, "train", model.cfg.n_bars), n=n)
    tensors.update({f"attr.{k}": v for k, v in vecs.items()})
    save_tensors(p, tensors)
    meta = read_meta(p)
    meta["attributes"] = {
        "names": list(NAMES),
        "from": f"{n} POP909 train windows: mean mu of top quartile minus bottom quartile",
        "norms": {k: round(float(v.norm()), 3) for k, v in vecs.items()},
    }
    write_meta(p, meta)
    return vecs
