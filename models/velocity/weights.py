"""Velocity model weights on disk: ``velocity_<name>.safetensors`` + ``velocity_<name>.json``.

The JSON holds the model config (enough to rebuild the module), the feature spec the weights were
trained on, and how they were trained. No pickles: tensors go through safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cadenza.atomic import atomic_path
from cadenza.errors import ModelError
from cadenza.models.velocity.features import FEATURE_NAMES

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MAX_BYTES = 16 * 1024 * 1024


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"velocity_{name}.safetensors"


def save_weights(module: torch.nn.Module, path: Path, config: dict, meta: dict) -> None:
    """Write weights and their JSON config atomically; refuse files over the 16 MiB limit."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > MAX_BYTES:
        raise ModelError(f"{path.name}: {size / 2**20:.1f} MiB of weights, over the 16 MiB limit")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    doc = {"config": config, "features": list(FEATURE_NAMES), **meta}
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, json document); a one-line ModelError when missing or mismatched."""
    path = Path(path)
    cfg_path = path.with_suffix(".json")
    if not path.is_file() or not cfg_path.is_file():
        raise ModelError(f"velocity weights not found: {path} (train them with `cadenza train velocity`)")
    try:
        doc = json.loads(cfg_path.read_text())
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several kinds on a damaged file
        raise ModelError(f"{path.name}: cannot read weights ({str(exc).splitlines()[0]})") from None
    if doc.get("features") != list(FEATURE_NAMES):
        raise ModelError(f"{path.name}: trained on other note features than this version computes; retrain")
    return state, doc


def load_model(name: str, model_cls, config_cls, path: Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """Build ``model_cls(config_cls(**config))`` from ``velocity_<name>`` weights, in eval mode."""
    state, doc = load_weights(Path(path) if path else weights_path(name))
    return build_model(f"{name} velocity", model_cls, config_cls, state, doc, device)


def build_model(what: str, model_cls, config_cls, state: dict, doc: dict, device: str = "cpu") -> torch.nn.Module:
    """``model_cls(config_cls(**doc["config"]))`` with ``state`` loaded, in eval mode; a one-line
    ModelError naming ``what`` when they do not fit."""
    model = model_cls(config_cls(**doc["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{what} weights do not match their config ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()
