"""The LSTM baseline, Performance RNN style (Oore et al. 2018): stacked LSTMs over the same event
tokens, trained on the same data as the transformer, so the two can be compared token for token.

It runs through the same interfaces as :class:`~cadenza.models.phrase.model.PhraseModel`:
``model(idx, cache, last_only=..., style=...)`` and ``new_cache()``, so training, evaluation, the
benchmark and :class:`~cadenza.models.phrase.live.LivePhrase` drive it unchanged. Its "cache" is
the recurrent state, which never fills up (it slides by nature). :class:`LSTMState` also keeps the
state after each of the last ``max_len`` one-token steps, because the live path takes back
generated tokens that were never heard (``rewind``); a transformer cache can simply forget keys.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from cadenza.models.phrase.tokens import VOCAB_SIZE


@dataclass
class LSTMConfig:
    arch: str = "lstm"  # what load_phrase reads to pick this class
    vocab_size: int = VOCAB_SIZE
    block_size: int = 512  # training window (truncated backpropagation); also the rewind history
    n_layer: int = 3
    n_embd: int = 256  # embedding = hidden width (the output layer is tied to the embedding)
    dropout: float = 0.0
    n_styles: int = 0


class LSTMState:
    """Recurrent state (n_layer, B, H) plus snapshots of it for rewinding (see module doc)."""

    sliding = True
    static = False

    def __init__(self, cfg: LSTMConfig, *, batch: int = 1, max_len: int | None = None, device="cpu", dtype=torch.float32):
        self.max_len = max(2, min(max_len or cfg.block_size, cfg.block_size))
        shape = (cfg.n_layer, batch, cfg.n_embd)
        self.h = torch.zeros(shape, device=device, dtype=dtype)
        self.c = torch.zeros(shape, device=device, dtype=dtype)
        self.snap_h = torch.zeros((self.max_len, *shape), device=device, dtype=dtype)  # state after token p at p % max_len
        self.snap_c = torch.zeros_like(self.snap_h)
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.snap_from = 0  # states after tokens snap_from .. pos-1 are all in the snapshots (if recent enough)
        self.h.zero_()
        self.c.zero_()

    @property
    def free(self) -> int:
        return sys.maxsize

    def can_rewind(self, n: int) -> bool:
        back = self.pos - n - 1  # the token whose state we return to
        return 0 <= n <= self.pos and (back < 0 or (back >= self.snap_from and n + 1 <= self.max_len))

    def rewind(self, n: int) -> None:
        if not self.can_rewind(n):
            raise ValueError(f"cannot rewind {n} of {self.pos} tokens")
        self.pos -= n
        if self.pos == 0:
            self.reset()
        else:
            s = (self.pos - 1) % self.max_len
            self.h.copy_(self.snap_h[s])
            self.c.copy_(self.snap_c[s])

    def advance(self, T: int, h: torch.Tensor, c: torch.Tensor) -> None:
        """Take the state after ``T`` more tokens. Only the last one's state is kept as a
        snapshot, so a chunk's interior cannot be rewound into (the live path never needs it)."""
        self.h.copy_(h)
        self.c.copy_(c)
        self.pos += T
        s = (self.pos - 1) % self.max_len
        self.snap_h[s].copy_(h)
        self.snap_c[s].copy_(c)
        if T > 1:
            self.snap_from = self.pos - 1


class PhraseLSTM(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wse = nn.Embedding(cfg.n_styles, cfg.n_embd) if cfg.n_styles else None
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_embd, cfg.n_layer, batch_first=True, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        # Its own softmax layer, and the embedding at nn.Embedding's unit scale, as Performance RNN
        # (one-hot events in, a softmax layer out): an LSTM has no normalisation between its input
        # and its gates, so the transformer's recipe (tied, std 0.02) does not carry over.
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        if self.wse is not None:
            nn.init.zeros_(self.wse.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, cache: LSTMState | None = None, *, last_only: bool = False, style: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens ``idx`` (B, T); with a state, ``idx`` continues it."""
        x = self.wte(idx)  # (B, T, C)
        if self.wse is not None:
            s = torch.as_tensor(0 if style is None else style, device=idx.device, dtype=torch.long).reshape(-1)
            x = x + self.wse(s)[:, None, :]
        x = self.drop(x)
        if cache is None:
            y, _ = self.lstm(x)
        else:
            y, (h, c) = self.lstm(x, (cache.h, cache.c))
            cache.advance(idx.size(1), h, c)
        if last_only:
            y = y[:, -1:]
        return self.lm_head(self.drop(y))

    def new_cache(self, *, batch: int = 1, max_len: int | None = None, static: bool = False) -> LSTMState:
        w = self.wte.weight
        return LSTMState(self.config, batch=batch, max_len=max_len, device=w.device, dtype=w.dtype)

    def save(self, path, extra: dict | None = None) -> None:
        from cadenza.models.phrase.model import save_weights

        save_weights(self, path, extra)
