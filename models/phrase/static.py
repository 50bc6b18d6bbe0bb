"""The phrase model's one-token decode step with static shapes, captured as a CUDA graph on CUDA.

A decode step of the small transformer is ~40 small kernels; on a GPU their launches, not their
arithmetic, are what a token costs. A CUDA graph replays them as one launch, but it fixes every
tensor's address and shape, and every value the host passes in. So here:

* the KV cache is preallocated at a fixed batch (``batch`` rows: one for the live context, or N
  candidates of a best-of-N answer decoded in one pass) and a fixed length;
* attention always covers the whole buffer, with a mask ``slot <= position`` (the slots past the
  position hold stale keys; the mask hides them);
* the position is a tensor (``index``) that the host sets before each replay, so the graph reads
  it instead of baking a number in; the token and style inputs are static buffers too;
* a rotary model's cache is a ring (see ``model.py``): the slot is ``index % max_len``, the
  rotation and the mask are computed from ``index`` and the cache's ``slot_pos`` inside the graph,
  so decoding goes on past ``max_len`` without a re-prefill.

Prefill (many tokens at once: a fed file, a re-prefill when the cache slides) stays eager: it is
``PhraseModel.forward`` on the same :class:`~cadenza.models.phrase.model.KVCache`, so the two
paths share one cache and ``cache.pos`` stays the one truth about how much of it is filled.

On a CPU nothing is captured and the same step runs eagerly (tests compare it with the plain
cached forward; ``cadenza bench device`` times both). A failed capture logs one line with its
reason and runs eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from cadenza.models.phrase.model import CausalSelfAttention, KVCache, PhraseModel, rope_tables, split_heads

log = logging.getLogger(__name__)


class StaticDecoder:
    """One-token decode steps of ``batch`` rows over a preallocated KV cache (see module doc).

    ``prefill(tokens)`` appends a prompt (the same to every row); ``step(tokens)`` appends one
    token per row and returns next-token logits (batch, vocab). The returned logits are a static
    buffer that the next step overwrites: read them (``.cpu()``, sampling) before stepping again.
    Not thread-safe: one worker thread drives it.
    """

    def __init__(
        self, model: PhraseModel, *, batch: int = 1, max_len: int | None = None, style: int = 0, graphs: bool | None = None
    ) -> None:
        """``graphs``: capture a CUDA graph (default: when the model is on a CUDA device)."""
        self.model = model.eval()
        self.batch = batch
        self.cache: KVCache = model.new_cache(batch=batch, max_len=max_len)
        dev = model.wte.weight.device
        self.device = dev
        self.style = style
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)  # the position, as a tensor
        self._style = torch.full((batch,), style, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fallback_reason: str | None = None
        with torch.inference_mode():
            self.logits = self._decode()
        if graphs if graphs is not None else dev.type == "cuda":
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001  capture fails in many ways (driver, allocator, op support); any of them means eager
                self.graph = None
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("phrase decode: CUDA graph capture failed, running eagerly (%s)", self.fallback_reason)
        self.cache.reset()  # the trial steps above wrote slot 0

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def _capture(self) -> None:
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # first calls allocate and pick kernels: not in the graph
                for _ in range(3):
                    self._decode()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):  # other model threads may use CUDA meanwhile
                self.logits = self._decode()
            torch.cuda.synchronize()
        self.graph = g

    # ---- the step ------------------------------------------------------------------------------
    def _decode(self) -> torch.Tensor:
        """tokens (B, 1) at position ``index`` -> logits (B, vocab); writes each layer's key and
        value into the slot of ``index``. Only tensors: nothing the host must recompute between calls."""
        m = self.model
        cache = self.cache
        slot = self.index % cache.max_len if cache.sliding else self.index  # (1,)
        cache.slot_pos.index_copy_(0, slot, self.index)
        x = m.wte(self.tokens)  # (B, 1, C)
        rope = None
        if m.wpe is not None:
            x = x + m.wpe(self.index)
        else:
            rope = rope_tables(self.index, m.inv_freq, x.dtype)
        if m.wse is not None:
            x = x + m.wse(self._style)[:, None, :]
        mask = cache.window_mask(self.index, cache.slot_pos)  # (1, max_len): the filled slots in the window, this one included
        for layer, block in enumerate(m.h):
            x = x + self._attend(block.attn, block.ln_1(x), layer, mask, slot, rope)
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.ln_f(x))[:, 0]  # (B, vocab)

    def _attend(
        self,
        attn: CausalSelfAttention,
        x: torch.Tensor,
        layer: int,
        mask: torch.Tensor,
        slot: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        B, T, C = x.shape  # T == 1
        q, k, v = split_heads(attn.c_attn(x), attn.n_head, rope)  # (B, nh, 1, hd)
        keys, vals = self.cache.k[layer], self.cache.v[layer]  # (B, nh, max_len, hd)
        keys.index_copy_(2, slot, k)
        vals.index_copy_(2, slot, v)
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))

    # ---- driving it ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache.reset()

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` to every row (eager, any length) -> logits after the last (B, vocab)."""
        idx = torch.tensor([tokens], dtype=torch.long, device=self.device).expand(self.batch, -1)
        return self.model(idx, self.cache, last_only=True, style=self._style)[:, -1]

    @torch.inference_mode()
    def step(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Append one token per row -> next-token logits (B, vocab), a buffer the next step reuses."""
        p = self.cache.pos
        if p >= self.cache.max_len and not self.cache.sliding:
            raise ValueError(f"context of {p + 1} tokens exceeds {self.cache.max_len}")
        if isinstance(tokens, torch.Tensor):
            self.tokens.copy_(tokens.view(self.batch, 1), non_blocking=True)
        else:
            self.tokens.copy_(torch.tensor(tokens, dtype=torch.long).view(self.batch, 1), non_blocking=True)
        self.index.fill_(p)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._decode()
        self.cache.pos = p + 1  # (slot_pos was written by the step itself)
        return self.logits
