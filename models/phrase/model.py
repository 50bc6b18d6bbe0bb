"""The phrase model: a small decoder-only transformer over event tokens, with a KV cache.

nanoGPT's shape (pre-LayerNorm blocks, tied input/output embeddings) at a size that trains on CPU.
Positions are either learned absolute embeddings (``pos="absolute"``: the first shipped weights)
or rotary (``pos="rope"``, RoFormer): keys and queries are rotated by their position, so attention
depends only on how far apart two tokens are. Inference appends tokens through a preallocated
:class:`KVCache`, so a live context costs one short forward per event and nothing is left to
prefill when the performer stops.

Sliding past the context. An absolute-position cache is full after ``block_size`` tokens and must
be rebuilt (re-prefill the recent past). A rotary cache is a ring instead: a key, once rotated, is
valid at any later step, so the newest token simply overwrites the oldest slot and every query
sees the last ``max_len`` tokens; no token is ever re-encoded. This is sliding-window attention:
the same logits as a full forward over the whole sequence with a band mask of width ``max_len``
(what :meth:`PhraseModel.forward` computes for a rotary model given more than ``block_size``
tokens; tests/models/test_phrase_v2.py checks the two agree).

The cache has two attention modes: ``static=False`` attends over the filled slots only (fastest
on CPU), ``static=True`` always attends over the whole preallocated buffer with a mask, so every
step has the same shapes (what CUDA graphs need). Both give the same logits.

Weights are one safetensors file with a JSON config beside it (``phrase.safetensors`` +
``phrase.json`` in ``models/weights/``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from cadenza.errors import ModelError
from cadenza.models.phrase.tokens import VOCAB_SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Styles the model can be asked for (a learned vector added at every position; index = id).
STYLES = ("classical", "pop")
DEFAULT_WEIGHTS = WEIGHTS_DIR / "phrase_v2.safetensors"  # phrase.safetensors: the first model (absolute positions), kept for comparison


@dataclass
class PhraseConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 1024  # longest context (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    n_styles: int = 0  # 0: no style conditioning (weights from before styles load as they were)
    pos: str = "absolute"  # "absolute" (learned, the first shipped weights) or "rope" (rotary, slides freely)
    mlp: str = "gelu"  # "gelu" (4x wide) or "swiglu" (gated, 8/3 x wide: the same parameter count)
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.pos not in ("absolute", "rope") or self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"pos must be absolute|rope and mlp gelu|swiglu (got {self.pos!r}, {self.mlp!r})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rotary positions need an even head width")


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_head, max_len, head_dim).

    ``pos`` counts the tokens appended since the last reset (the next token's position). A
    ``sliding`` cache (rotary models) is a ring: token ``p`` lives in slot ``p % max_len`` and
    ``slot_pos`` says which position each slot holds (-1: empty), which is all a mask needs.
    """

    def __init__(
        self, cfg: PhraseConfig, *, batch: int = 1, max_len: int | None = None, static: bool = False, device="cpu", dtype=torch.float32
    ):
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, self.max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((self.max_len,), -1, dtype=torch.long, device=device)
        self.static = static
        self.sliding = cfg.pos == "rope"
        self.reset()

    def reset(self) -> None:
        self.pos = 0  # tokens held (absolute) / appended (sliding)
        self._holes_until = 0  # a sliding cache has empty slots inside its window until pos reaches this
        self.slot_pos.fill_(-1)

    @property
    def free(self) -> int:
        """Tokens that can still be appended: a sliding cache never runs out (it forgets its oldest)."""
        return sys.maxsize if self.sliding else self.max_len - self.pos

    @property
    def contiguous(self) -> bool:
        """Every slot a one-token step attends to (the first min(pos + 1, max_len)) is valid."""
        return self.pos >= self._holes_until

    def can_rewind(self, n: int) -> bool:
        return 0 <= n <= self.pos

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` tokens. In a ring that has wrapped, the slots they overwrote are
        lost too: the window holds fewer tokens until as many new ones have been appended."""
        if not self.can_rewind(n):
            raise ValueError(f"cannot rewind {n} of {self.pos} tokens")
        old, self.pos = self.pos, self.pos - n
        if n:
            self.slot_pos.masked_fill_(self.slot_pos >= self.pos, -1)
            if self.sliding and old > self.max_len:
                self._holes_until = max(self._holes_until, old)

    def advance(self, T: int) -> None:
        """Record that ``T`` tokens were written at positions pos .. pos+T-1."""
        m = min(T, self.max_len)
        if m == 1:
            self.slot_pos[(self.pos + T - 1) % self.max_len] = self.pos + T - 1
        else:
            p = torch.arange(self.pos + T - m, self.pos + T, device=self.slot_pos.device)
            self.slot_pos.index_copy_(0, p % self.max_len, p)
        self.pos += T

    def window_mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """(T, K) bool: key at position kpos is visible from query at qpos (causal, within the
        last max_len positions, slot filled)."""
        q, k = qpos[:, None], kpos[None, :]
        return (k <= q) & (k > q - self.max_len) & (k >= 0)


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (T, 1, head_dim) for positions ``pos`` (T,), laid out for (B, T, H, hd).
    Angles are computed in float64: a live session reaches millions of positions, where float32
    angles would be off by a tenth of a radian."""
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    sin = ang.sin()
    return torch.cat((ang, ang), dim=-1).cos().to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by the tables: pairs (i, i + hd/2) turn together. The roll and the
    signed sine make it four array calls, which is what a one-token step costs at batch 1."""
    return x * cos + torch.roll(x, x.size(-1) // 2, dims=-1) * ssin


def split_heads(
    qkv: torch.Tensor, n_head: int, rope: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3C) -> q, k, v (B, nh, T, hd), queries and keys rotated together when ``rope``."""
    B, T, C3 = qkv.shape
    hd = C3 // 3 // n_head
    qkv = qkv.view(B, T, 3 * n_head, hd)
    if rope is None:
        q, k = qkv[:, :, :n_head], qkv[:, :, n_head : 2 * n_head]
    else:
        q, k = apply_rope(qkv[:, :, : 2 * n_head], *rope).split(n_head, dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2 * n_head :].transpose(1, 2)


def band_mask(T: int, width: int, device) -> torch.Tensor:
    """(T, T) causal mask that lets each query see only the last ``width`` positions."""
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < width)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.window = cfg.block_size
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, layer: int, cache: KVCache | None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = split_heads(self.c_attn(x), self.n_head, rope)  # (B, nh, T, hd) each
        if cache is None:
            if rope is not None and self.window < T:  # longer than trained: sliding-window attention
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, self.window, x.device))
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        elif cache.sliding:
            y = self._ring(q, k, v, layer, cache)
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

    @staticmethod
    def _ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: KVCache) -> torch.Tensor:
        """Attention through a sliding (ring) cache; writes this chunk's keys and values into it."""
        T, W, p = q.size(2), cache.max_len, cache.pos
        if T == 1 and not cache.static and cache.contiguous:  # the per-event step: no mask needed
            s = p % W
            cache.k[layer, :, :, s : s + 1] = k
            cache.v[layer, :, :, s : s + 1] = v
            n = min(p + 1, W)  # before the ring wraps only the prefix is filled; after, every slot
            return F.scaled_dot_product_attention(q, cache.k[layer, :, :, :n], cache.v[layer, :, :, :n])
        # A chunk (or a step with holes): attend over the cache as it was plus the chunk itself,
        # masked by position, then write the chunk's newest max_len tokens into their slots.
        qpos = torch.arange(p, p + T, device=q.device)
        keys, vals = torch.cat((cache.k[layer], k), 2), torch.cat((cache.v[layer], v), 2)
        mask = cache.window_mask(qpos, torch.cat((cache.slot_pos, qpos)))
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        m = min(T, W)
        slots = qpos[T - m :] % W
        cache.k[layer].index_copy_(2, slots, k[:, :, T - m :])
        cache.v[layer].index_copy_(2, slots, v[:, :, T - m :])
        return y


class MLP(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        # SwiGLU (Shazeer 2020) splits one projection into a gate and a value; 8/3 x keeps the
        # parameter count of the 4 x GELU MLP.
        hidden = 32 * round(8 * cfg.n_embd / 3 / 32) if self.gated else 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.gated else hidden)
        self.c_proj = nn.Linear(hidden, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            return self.drop(self.c_proj(F.silu(a) * b))
        return self.drop(self.c_proj(F.gelu(h, approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int, cache: KVCache | None, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        x = x + self.attn(self.ln_1(x), layer, cache, rope)
        return x + self.mlp(self.ln_2(x))


class PhraseModel(nn.Module):
    def __init__(self, cfg: PhraseConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "absolute" else None
        hd = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,), float64: see rope_tables
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

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False, style: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens ``idx`` (B, T); with a cache, ``idx`` continues it.

        ``style``: an index into :data:`STYLES` (or one per row); default 0. A cached context
        must keep one style (its keys and values carry it)."""
        B, T = idx.shape
        if cache is not None and cache.sliding and cache.max_len < T:
            # A long prefill through a ring cache goes in chunks of the ring's length: the same
            # logits (each query sees at most that far back), but memory and time linear in T
            # instead of quadratic (a whole piece fed at once had a T x T mask and scores).
            parts = [self(idx[:, i : i + cache.max_len], cache, last_only=last_only, style=style) for i in range(0, T, cache.max_len)]
            return parts[-1] if last_only else torch.cat(parts, 1)
        p0 = cache.pos if cache is not None else 0
        if self.wpe is not None:  # learned positions end at block_size; rotary ones slide (module doc)
            limit = cache.max_len if cache is not None else self.config.block_size
            if p0 + T > limit:
                raise ValueError(f"context of {p0 + T} tokens exceeds {limit}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(p0, p0 + T, device=idx.device))
        else:
            rope = rope_tables(torch.arange(p0, p0 + T, device=idx.device), self.inv_freq, x.dtype)
        if self.wse is not None:
            s = torch.as_tensor(0 if style is None else style, device=idx.device, dtype=torch.long).reshape(-1)
            x = x + self.wse(s)[:, None, :]
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, i, cache, rope)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def new_cache(self, *, batch: int = 1, max_len: int | None = None, static: bool = False) -> KVCache:
        w = self.wte.weight
        return KVCache(self.config, batch=batch, max_len=max_len, static=static, device=w.device, dtype=w.dtype)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        save_weights(self, path, extra)


def _tied_keys(model: nn.Module) -> set[str]:
    """The output layer's key when it is the embedding (the transformer): stored once, as ``wte``."""
    return {"lm_head.weight"} if model.lm_head.weight is model.wte.weight else set()


def save_weights(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors plus ``<stem>.json`` (config + ``extra``), both atomically; a
    tied output layer is not stored twice."""
    from safetensors.torch import save_file

    from cadenza.atomic import atomic_path

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in _tied_keys(model)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {"config": asdict(model.config), **(extra or {})}
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


if TYPE_CHECKING:
    from cadenza.models.phrase.lstm import PhraseLSTM

    PhraseNet = PhraseModel | PhraseLSTM  # what load_phrase returns: both take (idx, cache, last_only, style)


def load_phrase(path: str | Path | None = None, device: str = "cpu") -> PhraseNet:
    """The phrase model in eval mode, from ``path`` (default: the shipped weights): a
    :class:`PhraseModel`, or a :class:`~cadenza.models.phrase.lstm.PhraseLSTM` when the config
    says ``"arch": "lstm"``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cadenza.models.phrase.lstm import LSTMConfig, PhraseLSTM

    path = Path(path) if path else DEFAULT_WEIGHTS
    cfg_path = path.with_suffix(".json")
    if not path.is_file() or not cfg_path.is_file():
        raise ModelError(f"phrase model weights not found: {path} (and {cfg_path.name} beside it)")
    try:
        meta = json.loads(cfg_path.read_text())
        kind = LSTMConfig if meta["config"].get("arch") == "lstm" else PhraseConfig
        names = {f.name for f in fields(kind)}
        cfg = kind(**{k: v for k, v in meta["config"].items() if k in names})  # pos/mlp missing: absolute/gelu
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{cfg_path}: not a phrase model config ({exc})") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PhraseLSTM(cfg) if isinstance(cfg, LSTMConfig) else PhraseModel(cfg)
    try:
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ModelError(f"{path}: weights do not load ({str(exc).splitlines()[0]})") from None
    if unexpected or set(missing) - _tied_keys(model):
        raise ModelError(
            f"{path}: weights do not match {cfg_path.name} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval()
