"""The phrase model: a small decoder-only transformer over event tokens, with a KV cache.

nanoGPT's shape (pre-LayerNorm blocks, learned positions, tied input/output embeddings) at a size
that trains on CPU. Inference appends tokens through a preallocated :class:`KVCache`, so a live
context costs one short forward per event and nothing is left to prefill when the performer stops.

The cache has two attention modes: ``static=False`` attends over the filled prefix only (fastest
on CPU), ``static=True`` always attends over the whole preallocated buffer with a mask, so every
step has the same shapes (what CUDA graphs need). Both give the same logits.

Weights are one safetensors file with a JSON config beside it (``phrase.safetensors`` +
``phrase.json`` in ``models/weights/``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from cadenza.errors import ModelError
from cadenza.models.phrase.tokens import VOCAB_SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Styles the model can be asked for (a learned vector added at every position; index = id).
STYLES = ("classical", "pop")
DEFAULT_WEIGHTS = WEIGHTS_DIR / "phrase.safetensors"


@dataclass
class PhraseConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 1024  # longest context (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    n_styles: int = 0  # 0: no style conditioning (weights from before styles load as they were)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_head, max_len, head_dim)."""

    def __init__(self, cfg: PhraseConfig, *, batch: int = 1, max_len: int | None = None, static: bool = False, device="cpu", dtype=torch.float32):
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, self.max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.static = static
        self.pos = 0  # tokens held

    def reset(self) -> None:
        self.pos = 0

    @property
    def free(self) -> int:
        return self.max_len - self.pos


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            p = cache.pos
            cache.k[layer, :, :, p : p + T] = k
            cache.v[layer, :, :, p : p + T] = v
            if cache.static:
                keys, vals = cache.k[layer], cache.v[layer]  # (B, nh, max_len, hd)
                mask = torch.arange(cache.max_len, device=x.device)[None, :] <= (p + torch.arange(T, device=x.device))[:, None]
            else:
                keys, vals = cache.k[layer, :, :, : p + T], cache.v[layer, :, :, : p + T]  # (B, nh, p+T, hd)
                # query i sits at position p+i and sees keys 0..p+i
                mask = None if T == 1 else torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
            y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int, cache: KVCache | None):
        x = x + self.attn(self.ln_1(x), layer, cache)
        return x + self.mlp(self.ln_2(x))


class PhraseModel(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.wse = nn.Embedding(cfg.n_styles, cfg.n_embd) if cfg.n_styles else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: fewer parameters, better small-data behaviour
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.wse is not None:  # no style = the unconditioned model (what extending starts from)
            nn.init.zeros_(self.wse.weight)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False, style: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens ``idx`` (B, T); with a cache, ``idx`` continues it.

        ``style``: an index into :data:`STYLES` (or one per row); default 0. A cached context
        must keep one style (its keys and values carry it)."""
        B, T = idx.shape
        p0 = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.block_size
        if p0 + T > limit:
            raise ValueError(f"context of {p0 + T} tokens exceeds {limit}")
        pos = torch.arange(p0, p0 + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        if self.wse is not None:
            s = torch.as_tensor(0 if style is None else style, device=idx.device, dtype=torch.long).reshape(-1)
            x = x + self.wse(s)[:, None, :]
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, i, cache)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def new_cache(self, *, batch: int = 1, max_len: int | None = None, static: bool = False) -> KVCache:
        w = self.wte.weight
        return KVCache(self.config, batch=batch, max_len=max_len, static=static, device=w.device, dtype=w.dtype)

    # ---- weights ---------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Weights as safetensors plus ``<stem>.json`` (config + ``extra``), both atomically."""
        from safetensors.torch import save_file

        from cadenza.atomic import atomic_path

        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k != "lm_head.weight"}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        meta = {"config": asdict(self.config), **(extra or {})}
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")


def style_index(model: PhraseModel, style: str) -> int:
    """The index of a style name; ConfigError if unknown or the model has no styles."""
    from cadenza.errors import ConfigError

    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    i = STYLES.index(style)
    if i and i >= model.config.n_styles:
        raise ConfigError(f"these phrase weights know no style {style!r} (trained without styles)")
    return i


def with_styles(model: PhraseModel, n_styles: int) -> PhraseModel:
    """The same network with ``n_styles`` style vectors (new ones zero: behaves as before)."""
    if model.config.n_styles >= n_styles:
        return model
    cfg = PhraseConfig(**{**asdict(model.config), "n_styles": n_styles})
    new = PhraseModel(cfg)
    state = model.state_dict()
    if model.wse is not None:
        w = new.wse.weight.detach().clone()
        w[: model.config.n_styles] = state.pop("wse.weight")
        state["wse.weight"] = w
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"wse.weight"}, (missing, unexpected)
    return new.to(model.wte.weight.device)


def load_phrase(path: str | Path | None = None, device: str = "cpu") -> PhraseModel:
    """The phrase model in eval mode, from ``path`` (default: the shipped weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path else DEFAULT_WEIGHTS
    cfg_path = path.with_suffix(".json")
    if not path.is_file() or not cfg_path.is_file():
        raise ModelError(f"phrase model weights not found: {path} (and {cfg_path.name} beside it)")
    try:
        meta = json.loads(cfg_path.read_text())
        names = {f.name for f in fields(PhraseConfig)}
        cfg = PhraseConfig(**{k: v for k, v in meta["config"].items() if k in names})
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{cfg_path}: not a phrase model config ({exc})") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PhraseModel(cfg)
    try:
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ModelError(f"{path}: weights do not load ({str(exc).splitlines()[0]})") from None
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ModelError(f"{path}: weights do not match {cfg_path.name} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval()
