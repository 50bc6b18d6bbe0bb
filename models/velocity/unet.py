"""The U-Net piano-roll velocity colorizer: our re-implementation of the CMMR 2025 baseline.

He, Cooper, Huang & Togneri, "Filling MIDI Velocity using U-Net Image Colorizer" (CMMR 2025)
treat a 10 s stretch of a performance as an image: 88 pitch rows x 96 time frames (~104 ms each)
in, a "velocity image" of the same size out, read back at the cells where notes start. This file
is written from the paper's description, not from its (CC BY-NC) code. Choices of ours:

* Input channels: onset roll (1 where a note starts), frame roll (1 while the key is held) and
  the sustain-pedal depth (CC64 / 127, the same on every pitch row). ``in_channels=1`` is the
  paper's onset-only image; 2 and 3 add the held keys and the pedal (our additions).
* One self-attention layer over the 11 x 12 bottleneck (the paper's best U-Net adds attention
  there); ``attn_heads=0`` turns it off.
* Output: one sigmoid channel mapped to velocity 1..127. The loss is taken only at onset cells
  (the rest of the image has no ground truth); ``loss="l1"`` optimises the reported metric
  directly, ``loss="bce"`` is the paper's choice (BCE against velocity / 127).

For a whole piece, :func:`predict_unet` tiles the roll into windows with 50 % overlap and blends
each note's predictions with triangular weights, so no note is judged from the edge of a window
when a more central view exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cadenza.errors import ModelError

LOWEST_PITCH = 21  # A0, row 0 of the roll
N_PITCHES = 88
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "velocity_unet.safetensors"


@dataclass
class UNetConfig:
    frames: int = 96  # time frames per window
    window_s: float = 10.0  # seconds per window; a frame is window_s / frames (~104 ms)
    in_channels: int = 3  # the first k of: onset, frame (key held), pedal; 1 = the paper's onset roll
    base: int = 16  # channels of the first level; doubled at each level down
    depth: int = 3  # number of 2x down-samplings: 88x96 -> 44x48 -> 22x24 -> 11x12
    attn_heads: int = 4  # self-attention heads at the bottleneck; 0 = none
    loss: str = "l1"  # "l1" (on velocity / 127) or "bce" (the paper's)

    @property
    def frame_s(self) -> float:
        return self.window_s / self.frames

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"U-Net config has unknown fields {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Rasterizing notes into the model's image


def note_cells(onset: np.ndarray, pitch: np.ndarray, t0: float, frame_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Row (pitch) and column (frame, relative to ``t0``) of each note's onset cell.

    Pitches outside the piano's range are folded onto its edge rows so that every note has a cell.
    """
    row = np.clip(np.asarray(pitch, np.int64) - LOWEST_PITCH, 0, N_PITCHES - 1)
    col = np.floor((np.asarray(onset, np.float64) - t0) / frame_s).astype(np.int64)
    return row, col


def piano_roll(
    onset: np.ndarray,
    offset: np.ndarray,
    pitch: np.ndarray,
    pedal_t: np.ndarray,
    pedal_v: np.ndarray,
    t0: float,
    n_frames: int,
    frame_s: float,
) -> np.ndarray:
    """The (3, 88, n_frames) float32 input image of the stretch starting at ``t0`` seconds."""
    x = np.zeros((3, N_PITCHES, n_frames), np.float32)
    row, col = note_cells(onset, pitch, t0, frame_s)
    end = np.floor((np.asarray(offset, np.float64) - t0) / frame_s).astype(np.int64)
    end = np.maximum(end, col)
    live = (end >= 0) & (col < n_frames)
    row, col, end = row[live], col[live], end[live]
    starts = col >= 0
    x[0, row[starts], col[starts]] = 1.0
    # Key-held roll: +1 at the first frame, -1 after the last, then a running sum over time.
    d = np.zeros((N_PITCHES, n_frames + 1), np.int32)
    np.add.at(d, (row, np.clip(col, 0, n_frames)), 1)
    np.add.at(d, (row, np.clip(end + 1, 0, n_frames)), -1)
    x[1] = np.cumsum(d, axis=1)[:, :n_frames] > 0
    if len(pedal_t):
        centers = t0 + (np.arange(n_frames) + 0.5) * frame_s
        idx = np.searchsorted(pedal_t, centers, side="right") - 1
        depth = np.where(idx >= 0, np.asarray(pedal_v, np.float32)[np.maximum(idx, 0)] / 127.0, 0.0)
        x[2] = depth[None, :]
    return x


# --------------------------------------------------------------------------------------------
# The network


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class BottleneckAttention(nn.Module):
    """Self-attention over all cells of the coarsest level: every 1-s x 8-key patch sees the
    whole 10-s window at once, which the convolutions alone reach only at their edges."""

    def __init__(self, channels: int, heads: int, h: int, w: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, h * w, channels))
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        q = self.norm(t + self.pos)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        return t.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """(B, in_channels, 88, frames) piano roll -> (B, 88, frames) velocity logits."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        scale = 2**cfg.depth
        if not 1 <= cfg.in_channels <= 3:
            raise ModelError(f"U-Net in_channels must be 1 (onset), 2 (+ held keys) or 3 (+ pedal), not {cfg.in_channels}")
        if N_PITCHES % scale or cfg.frames % scale:
            raise ModelError(f"U-Net depth {cfg.depth} does not divide the {N_PITCHES}x{cfg.frames} roll")
        ch = [cfg.base * 2**i for i in range(cfg.depth + 1)]
        self.inc = DoubleConv(cfg.in_channels, ch[0])
        self.down = nn.ModuleList(DoubleConv(ch[i], ch[i + 1]) for i in range(cfg.depth))
        self.attn = (
            BottleneckAttention(ch[-1], cfg.attn_heads, N_PITCHES // scale, cfg.frames // scale) if cfg.attn_heads else nn.Identity()
        )
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(cfg.depth)))
        self.up = nn.ModuleList(DoubleConv(2 * ch[i], ch[i]) for i in reversed(range(cfg.depth)))
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inc(x)
        skips = [h]
        for down in self.down:
            h = down(F.max_pool2d(h, 2))
            skips.append(h)
        h = self.attn(skips.pop())
        for upsample, up in zip(self.upsample, self.up):
            h = up(torch.cat([upsample(h), skips.pop()], dim=1))
        return self.head(h).squeeze(1)  # (B, 88, frames)


def logits_to_velocity(logits: torch.Tensor) -> torch.Tensor:
    return 1.0 + 126.0 * torch.sigmoid(logits)


def masked_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Loss over onset cells only; ``target`` is velocity 1..127, ``mask`` is 1 at onset cells."""
    mask = mask.to(logits.dtype)
    n = mask.sum().clamp_min(1.0)
    if kind == "l1":
        err = (logits_to_velocity(logits) - target).abs() / 127.0
    elif kind == "bce":
        err = F.binary_cross_entropy_with_logits(logits, ((target - 1.0) / 126.0).clamp(0, 1), reduction="none")
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return (err * mask).sum() / n


# --------------------------------------------------------------------------------------------
# Loading and whole-piece prediction


def load_unet(path: Path | None = None, device: str = "cpu") -> UNet:
    """The U-Net from ``path`` (default: the shipped weights) with its JSON config beside it."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    cfg_path = path.with_suffix(".json")
    if not path.is_file():
        raise ModelError(f"U-Net weights not found: {path}")
    if not cfg_path.is_file():
        raise ModelError(f"U-Net config not found beside the weights: {cfg_path}")
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = UNetConfig.from_dict(meta["config"])
        model = UNet(cfg)
        model.load_state_dict(load_file(str(path), device="cpu"))
    except ModelError:
        raise
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelError(f"U-Net weights {path.name} do not match their config: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def config_dict(cfg: UNetConfig) -> dict:
    return asdict(cfg)


@torch.inference_mode()
def predict_unet(model: UNet, perf, *, batch: int = 32) -> np.ndarray:
    """Velocities (N,) float32 in [1, 127] for every note of ``perf`` (a stream.smf.Performance).

    Windows of ``cfg.frames`` frames start every ``frames // 2`` frames; a note's prediction is
    the blend of the windows that contain its onset, weighted by how central it sits in each.
    Notes that share an onset cell share its value. Velocities of ``perf`` are ignored.
    """
    cfg = model.cfg
    n = len(perf)
    if n == 0:
        return np.zeros(0, np.float32)
    fs = cfg.frame_s
    hop = cfg.frames // 2
    row, gcol = note_cells(perf.onset, perf.pitch, 0.0, fs)
    gcol = np.maximum(gcol, 0)  # notes before time 0 (never in valid files) join the first frame
    n_windows = max(1, int(np.ceil((gcol.max() + 1 - cfg.frames) / hop)) + 1) if gcol.max() >= cfg.frames else 1
    device = next(model.parameters()).device
    acc = np.zeros(n, np.float64)
    wsum = np.zeros(n, np.float64)
    # Triangular weight over a window's frames: ~0 at the edges, 1 in the middle.
    tri = 1.0 - np.abs((np.arange(cfg.frames) + 0.5) / cfg.frames * 2.0 - 1.0) + 1e-3
    for b0 in range(0, n_windows, batch):
        starts = [k * hop for k in range(b0, min(b0 + batch, n_windows))]
        x = np.stack(
            [
                piano_roll(perf.onset, perf.offset, perf.pitch, perf.pedal_t, perf.pedal_v, s * fs, cfg.frames, fs)[: cfg.in_channels]
                for s in starts
            ]
        )
        vel = logits_to_velocity(model(torch.from_numpy(x).to(device))).float().cpu().numpy()  # (b, 88, frames)
        for j, s in enumerate(starts):
            lo, hi = np.searchsorted(gcol, [s - 1, s + cfg.frames + 1], side="left")  # onsets are sorted
            # Same arithmetic as piano_roll, so a note is read where it was drawn.
            _, c = note_cells(perf.onset[lo:hi], perf.pitch[lo:hi], s * fs, fs)
            ok = (c >= 0) & (c < cfg.frames)
            idx = np.arange(lo, hi)[ok]
            c = c[ok]
            acc[idx] += tri[c] * vel[j, row[idx], c]
            wsum[idx] += tri[c]
    return np.clip(acc / np.maximum(wsum, 1e-9), 1.0, 127.0).astype(np.float32)
