"""The causal velocity step with static shapes: preallocated buffers and, on CUDA, CUDA graphs.

On a GPU a live step is a dozen tiny kernels, and what it costs is launching them, not their
arithmetic. A CUDA graph replays the whole step as one launch, but it needs the same tensors
(addresses and shapes) every time. So the step runs on preallocated input and state buffers of a
few fixed batch sizes ("buckets", by default 1 and 64): a round of B sessions is copied into the
smallest bucket that holds it, the padding rows (whatever the last round left there: rows are
independent) are computed and ignored, and the first B rows of the outputs are returned.

The graphs are captured once, at construction (after a warm-up on a side stream, as PyTorch's
CUDA-graph notes require). If capture fails, one line says why and the same buffers run eagerly.
On a CPU there is nothing to capture: the static-buffer path runs eagerly (tests and benches
force it there, to compare it with the plain torch step; ``cadenza bench device`` measures both).
"""

from __future__ import annotations

import logging

import torch

from cadenza.models.velocity.causal import CausalVelocityModel

log = logging.getLogger(__name__)

BUCKETS = (1, 64)


class _Bucket:
    """Input, state and output buffers of one batch size, and its graph when captured."""

    def __init__(self, model: CausalVelocityModel, size: int) -> None:
        dev = model.feat_mean.device
        self.size = size
        self.x = torch.zeros(size, model.n_features, device=dev)
        self.h = torch.zeros(size, model.cfg.hidden, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.v, self.h_new = model.step(self.x, self.h)  # outputs; the graph's own when captured


class StaticVelocityStep:
    """``CausalVelocityModel.step`` on fixed-shape buffers (see the module doc).

    The same interface as the torch model's step: ``initial_state(batch)``, ``step(x (B, F),
    state (B, H)) -> (velocities (B,), new state (B, H))``, ``feat_mean`` (for the device),
    ``state_batch_dim``. Returned tensors are the caller's own (never views of the buffers that
    the next step overwrites). Not thread-safe: one worker thread steps it.
    """

    state_batch_dim = 0

    def __init__(self, model: CausalVelocityModel, *, buckets: tuple[int, ...] = BUCKETS, graphs: bool | None = None) -> None:
        """``graphs``: capture CUDA graphs (default: when the model is on a CUDA device)."""
        self.model = model.eval()
        self.n_features = model.n_features
        self.hidden = model.cfg.hidden
        self.feat_mean = model.feat_mean
        dev = model.feat_mean.device
        with torch.inference_mode():
            self._buckets = [_Bucket(model, b) for b in sorted(set(buckets))]
        self.graphed = False
        self.fallback_reason: str | None = None
        if graphs if graphs is not None else dev.type == "cuda":
            try:
                self._capture()
                self.graphed = True
            except Exception as exc:  # noqa: BLE001  capture fails in many ways (driver, allocator, op support); any of them means eager
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                for b in self._buckets:
                    b.graph = None
                log.warning("velocity step: CUDA graph capture failed, running eagerly (%s)", self.fallback_reason)

    @property
    def max_batch(self) -> int:
        return self._buckets[-1].size

    def _capture(self) -> None:
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # first calls allocate and pick kernels: not in the graph
                for b in self._buckets:
                    for _ in range(3):
                        self.model.step(b.x, b.h)
            torch.cuda.current_stream().wait_stream(side)
            for b in self._buckets:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, capture_error_mode="thread_local"):  # other model threads may use CUDA meanwhile
                    b.v, b.h_new = self.model.step(b.x, b.h)
                b.graph = g
            torch.cuda.synchronize()

    def initial_state(self, batch: int) -> torch.Tensor:
        return self.model.initial_state(batch)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One note-on per row: x (B, F), state (B, H) -> (velocities (B,) in [1, 127], new state).
        Rounds larger than the largest bucket run as several of them."""
        n = x.shape[0]
        top = self.max_batch
        if n <= top:
            return self._run(x, state)
        parts = [self._run(x[i : i + top], state[i : i + top]) for i in range(0, n, top)]
        return torch.cat([v for v, _ in parts]), torch.cat([h for _, h in parts])

    def _run(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        b = next(b for b in self._buckets if b.size >= n)
        with torch.inference_mode():
            b.x[:n].copy_(x, non_blocking=True)
            b.h[:n].copy_(state, non_blocking=True)
            if b.graph is not None:
                b.graph.replay()
            else:
                b.v, b.h_new = self.model.step(b.x, b.h)
            return b.v[:n].clone(), b.h_new[:n].clone()
