"""Shipped weights: ``models/weights/vae_<name>.safetensors`` (model tensors, plus ``attr.<name>``
attribute vectors) and ``vae_<name>.json`` beside it (config, training runs, metrics)."""

from __future__ import annotations

import json
from pathlib import Path

from cadenza.atomic import write_atomic
from cadenza.errors import ConfigError, ModelError

MODELS = ("mel_2bar", "mel_16bar", "mel_16bar_flat")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def weights_path(name: str) -> Path:
    if name not in MODELS:
        raise ConfigError(f"unknown VAE model {name!r}; choose one of {', '.join(MODELS)}")
    return WEIGHTS_DIR / f"vae_{name}.safetensors"


def meta_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_meta(weights: Path) -> dict:
    p = meta_path(weights)
    return json.loads(p.read_text()) if p.is_file() else {}


def write_meta(weights: Path, meta: dict) -> None:
    write_atomic(meta_path(weights), (json.dumps(meta, indent=1) + "\n").encode())


def save_tensors(weights: Path, tensors: dict) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_atomic(Path(weights), data)


def load_model(name_or_path: str | Path):
    """(MusicVAE in eval mode, meta dict, attribute vectors {name: tensor})."""
    from safetensors.torch import load_file

    from .model import MusicVAE, VAEConfig

    p = Path(name_or_path) if str(name_or_path).endswith(".safetensors") else weights_path(str(name_or_path))
    if not p.is_file():
        raise ModelError(f"VAE weights not found: {p} (train them with `cadenza train vae`)")
    meta = read_meta(p)
    if "config" not in meta:
        raise ModelError(f"{meta_path(p)}: missing or without a config")
    cfg = VAEConfig(**meta["config"])
    tensors = load_file(str(p))
    attrs = {k[5:]: v for k, v in tensors.items() if k.startswith("attr.")}
    model = MusicVAE(cfg)
    try:
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("attr.")})
    except RuntimeError as exc:
        raise ModelError(f"{p}: weights do not match their config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, meta, attrs
