"""`cadenza eval vae`: the MusicVAE paper's measures on POP909 (validation or test).

* reconstruction accuracy per sixteenth, on ``limit`` windows evenly spaced over the split:
  teacher-forced (z sampled from the posterior, true previous events as inputs), sampled (z sampled
  from the posterior, the decoder sampling its own outputs at temperature 1, as in the paper) and
  greedy (z = posterior mean, argmax outputs);
* where the teacher-forced errors are: accuracy per bar (a U over the bars says the encoder's two
  final states hold the first and last bars better than the middle) and on note-on steps alone
  (the right pitch at the right sixteenth; most steps are "no event", which is easy);
* KL to the prior in bits; active dims: latent dims whose mu varies over the data by more than 0.01;
* prior samples: share of valid melodies (attributes.is_valid) at temperature 1.0 and 0.5, with the
  decoder's note-off constraint (as every command decodes) and without it (the raw model), and
  the overlap of their pitch-class / interval / density / onset-position histograms with the split's;
* interpolation: 9-point slerp between the posterior means of two melodies of the split, greedy
  decoded; a path is smooth when the Hamming distance to A never shrinks and to B never grows along
  it. Baseline: data-space interpolation (each sixteenth switches from A's event to B's at a fixed
  random threshold), which is monotone by construction but yields invalid melodies;
* attribute matrix: mean change of each attribute (in units of the split's standard deviation)
  when a melody's mu moves by +1 attribute vector.
"""

from __future__ import annotations

import math

import numpy as np

from . import attributes as A
from .data import load_windows


def slerp(a, b, t: float):
    import torch

    na, nb = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    om = torch.arccos((na * nb).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(om)
    return torch.sin((1 - t) * om) / so * a + torch.sin(t * om) / so * b


def _monotone(path: np.ndarray) -> bool:
    da = (path != path[0]).sum(1)
    db = (path != path[-1]).sum(1)
    return bool(np.all(np.diff(da) >= 0) and np.all(np.diff(db) <= 0))


def evaluate(
    root,
    model_name,
    split: str = "test",
    limit: int = 1000,
    samples: int = 500,
    seed: int = 0,
    threads: int = 1,
    save: bool = False,
    pairs: int = 50,
) -> dict:
    import torch

    from .weights import load_model, read_meta, weights_path, write_meta

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, meta, attrs = load_model(model_name)
    cfg = model.cfg
    w = load_windows(root, split, cfg.n_bars)
    idx = np.unique(np.linspace(0, len(w) - 1, min(limit, len(w))).astype(int))
    X = torch.from_numpy(w.encode(idx))
    T = X.shape[1]
    sa = gr = 0.0
    kls, mus, greedy, per_window, tf_hits = [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(X), 250):
            x = X[i : i + 250]
            mu, sigma = model.encode(x)
            z = mu + sigma * torch.randn(mu.shape, generator=g)
            tf_hits.append(model.decoder(z, x, 0.0).argmax(-1) == x)
            sa += (model.decode(z, 1.0, g) == x).float().sum().item()
            gx = model.decode(mu, 0.0)
            gr += (gx == x).float().sum().item()
            greedy.append(gx)
            per_window.append((gx == x).float().mean(1))
            kls.append(A_kl(mu, sigma))
            mus.append(mu)
    n = len(X) * T
    mu_all = torch.cat(mus)
    kl = torch.cat(kls)
    data_np = X.numpy()
    data_h = A.histograms(data_np)
    hits = torch.cat(tf_hits).float()
    r = {
        "model": cfg.name,
        "split": split,
        "windows": len(X),
        "windows_in_split": len(w),
        "steps": T,
        "tf_acc": round(float(hits.mean()), 4),
        "sampled_acc": round(sa / n, 4),
        "greedy_acc": round(gr / n, 4),
        "greedy_acc_window_sd": round(float(torch.cat(per_window).std()), 4),
        "tf_acc_note_on": round(float(hits[X >= 2].mean()), 4),
        "tf_acc_per_bar": [round(float(v), 3) for v in hits.view(len(X), cfg.n_bars, -1).mean((0, 2))],
        "kl_bits": round(float(kl.mean()) / math.log(2), 2),
        "active_dims": int((mu_all.var(0) > 0.01).sum()),
        "z_dim": cfg.z_dim,
        "no_event_share": round(float((X == 0).float().mean()), 4),
    }
    # prior samples
    with torch.no_grad():
        zp = torch.randn(samples, cfg.z_dim, generator=g)
        for temp in (1.0, 0.5):
            s = torch.cat([model.decode(zp[i : i + 250], temp, g) for i in range(0, samples, 250)]).numpy()
            key = f"prior_t{temp:g}"
            r[key + "_valid"] = round(float(np.mean([A.is_valid(e) for e in s])), 4)
            r[key + "_overlap"] = A.overlap(A.histograms(s), data_h)
            raw = torch.cat([model.decode(zp[i : i + 250], temp, g, constrain=False) for i in range(0, samples, 250)]).numpy()
            r[key + "_valid_raw"] = round(float(np.mean([A.is_valid(e) for e in raw])), 4)
    # interpolation
    rng = np.random.default_rng(seed)
    pa = rng.choice(len(X), pairs)
    pb = (pa + 1 + rng.choice(len(X) - 1, pairs)) % len(X)
    lat_ok = lat_valid = dat_ok = dat_valid = 0
    ts = np.linspace(0, 1, 9)
    with torch.no_grad():
        for a, b in zip(pa, pb):
            zs = torch.stack([slerp(mu_all[a], mu_all[b], float(t)) for t in ts])
            path = model.decode(zs, 0.0).numpy()
            lat_ok += _monotone(path)
            lat_valid += sum(A.is_valid(e) for e in path[1:-1])
            thr = rng.random(T)
            xa, xb = data_np[a], data_np[b]
            dpath = np.stack([np.where(thr < t, xb, xa) for t in ts])
            dat_ok += _monotone(dpath)
            dat_valid += sum(A.is_valid(e) for e in dpath[1:-1])
    r["interp_latent_monotone"] = round(lat_ok / pairs, 3)
    r["interp_latent_valid"] = round(lat_valid / (7 * pairs), 3)
    r["interp_data_monotone"] = round(dat_ok / pairs, 3)
    r["interp_data_valid"] = round(dat_valid / (7 * pairs), 3)
    # attribute matrix
    if attrs:
        k = min(300, len(X))
        base = A.attribute_matrix(torch.cat(greedy)[:k].numpy())
        sd = np.nanstd(A.attribute_matrix(data_np), 0) + 1e-9
        mat = {}
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-rest decode has no register (nan)
            for name in A.NAMES:
                moved = A.attribute_matrix(model.decode(mu_all[:k] + attrs[name], 0.0).numpy())
                mat[name] = {m: round(float(np.nanmean(moved[:, j] - base[:, j]) / sd[j]), 3) for j, m in enumerate(A.NAMES)}
        r["attribute_matrix"] = mat
    if save:
        p = weights_path(cfg.name) if not str(model_name).endswith(".safetensors") else model_name
        m = read_meta(p)
        m[f"eval_{split}"] = r
        write_meta(p, m)
    return r


def A_kl(mu, sigma):
    from .model import kl_terms

    return kl_terms(mu, sigma).sum(1)


def format_report(r: dict) -> str:
    lines = [
        f"MusicVAE {r['model']} on POP909 {r['split']} ({r['windows']} of {r['windows_in_split']} windows, {r['steps']} sixteenths)",
        f"  reconstruction accuracy  teacher-forced {r['tf_acc']:.4f}  sampled {r['sampled_acc']:.4f}  greedy {r['greedy_acc']:.4f}"
        f"  (share of 'no event' in the data {r['no_event_share']:.3f})",
        f"  teacher-forced on note-on steps {r['tf_acc_note_on']:.4f}; per bar " + " ".join(f"{v:.2f}" for v in r["tf_acc_per_bar"]),
        f"  KL {r['kl_bits']:.1f} bits, active dims {r['active_dims']} of {r['z_dim']}",
        f"  prior samples valid: T=1.0 {r['prior_t1_valid']:.3f}  T=0.5 {r['prior_t0.5_valid']:.3f}"
        f"  (decoder without the note-off constraint: {r['prior_t1_valid_raw']:.3f} / {r['prior_t0.5_valid_raw']:.3f})",
        "  prior (T=1.0) vs data histogram overlap: " + "  ".join(f"{k} {v:.3f}" for k, v in r["prior_t1_overlap"].items()),
        f"  interpolation smooth paths: latent slerp {r['interp_latent_monotone']:.2f} (valid points {r['interp_latent_valid']:.2f}),"
        f" data space {r['interp_data_monotone']:.2f} (valid points {r['interp_data_valid']:.2f})",
    ]
    if "attribute_matrix" in r:
        lines.append("  attribute vectors (+1): change of each attribute in data standard deviations")
        lines.append("    " + " " * 12 + "".join(f"{n:>12}" for n in A.NAMES))
        for k, row in r["attribute_matrix"].items():
            lines.append(f"    {k:<12}" + "".join(f"{row[n]:>12.2f}" for n in A.NAMES))
    return "\n".join(lines)
