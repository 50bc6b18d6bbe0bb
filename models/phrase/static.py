"""The phrase model's one-token decode step with static shapes, captured as a CUDA graph on CUDA.

A decode step of the small transformer is ~40 small kernels; on a GPU their launches, not their
arithmetic, are what a token costs. A CUDA graph replays them as one launch, but it fixes every
tensor's address and shape, and every value the host passes in. So here:

* the KV cache is preallocated at a fixed batch (``batch`` rows: one for the live context, or N
  candidates of a best-of-N answer decoded in one pass) and a fixed length;
* attention always covers the whole buffer, with a mask ``slot <= position`` (the slots past the
  position hold stale keys; the mask hides them);
* the position is a tensor (``index``) that the host sets before each replay, so the graph reads
  it instead of baking a number in; the token and style inputs are static buffers too.

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

from cadenza.models.phrase.model import CausalSelfAttention, KVCache, PhraseModel

log = logging.getLogger(__name__)


class StaticDecoder:
    """One-token decode steps of ``batch`` rows over a preallocated KV cache (see module doc).

    ``prefill(tokens)`` appends a prompt (the same to every row); ``step(tokens)`` appends one
    token per row and returns next-token logits (batch, vocab). The returned logits are a static
    buffer that the next step overwrites: read them (``.cpu()``, sampling) before stepping again.
    Not thread-safe: one worker thread drives it.
    """

    def __init__(self, model: PhraseModel, *, batch: int = 1, max_len: int | None = None, style: int = 0,
                 graphs: bool | None = None) -> None:
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
        self._slots = torch.arange(self.cache.max_len, device=dev)
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
        value into slot ``index``. Only tensors: nothing the host must recompute between calls."""
        m = self.model
        x = m.wte(self.tokens) + m.wpe(self.index)  # (B, 1, C)
        if m.wse is not None:
            x = x + m.wse(self._style)[:, None, :]
        mask = (self._slots <= self.index)[None, :]  # (1, max_len): the filled slots, this one included
        for layer, block in enumerate(m.h):
            x = x + self._attend(block.attn, block.ln_1(x), layer, mask)
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.ln_f(x))[:, 0]  # (B, vocab)

    def _attend(self, attn: CausalSelfAttention, x: torch.Tensor, layer: int, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # T == 1
        hd = C // attn.n_head
        q, k, v = attn.c_attn(x).split(C, dim=2)
        q = q.view(B, T, attn.n_head, hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = k.view(B, T, attn.n_head, hd).transpose(1, 2)
        v = v.view(B, T, attn.n_head, hd).transpose(1, 2)
        keys, vals = self.cache.k[layer], self.cache.v[layer]  # (B, nh, max_len, hd)
        keys.index_copy_(2, self.index, k)
        vals.index_copy_(2, self.index, v)
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
        if p >= self.cache.max_len:
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
        self.cache.pos = p + 1
        return self.logits
