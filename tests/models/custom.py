"""Models "a real user would write" (float reference).

* ``UserUNet`` / ``user_unet()`` -- a small U-Net-like segmenter with

  - leftover ``QuantStub`` / ``DeQuantStub`` (``torch.ao.quantization``) from an
    earlier eager-mode attempt, still called in ``forward`` (identity in float);
  - the user's own parametrised layer ``ScaleShift`` (``x * self.scale + self.shift``
    with ``nn.Parameter`` scale/shift);
  - ``GroupNorm`` blocks next to ``BatchNorm2d`` blocks;
  - a decoder using ``F.interpolate(scale_factor=2, mode="nearest")`` and
    ``F.interpolate(scale_factor=2, mode="bilinear", align_corners=False)``,
    each followed by ``torch.cat`` with the encoder skip;
  - ``gate``: a ``DynamicGate`` whose forward has data-dependent Python control
    flow (``if x.mean() > 0:``), so ``torch.fx.symbolic_trace`` fails on it and
    therefore on the whole model, while the model traces fine when
    ``DynamicGate`` is treated as a leaf module (see ``UNTRACEABLE`` in
    ``tests/models/__init__.py``).  ``user_unet(with_gate=False)`` replaces it by
    ``nn.Identity`` and is fully traceable.

* ``MultiTaskNet`` / ``multitask_dict()`` -- returns ``{"logits": ..., "embedding": ...}``.
* ``TinyDetector`` / ``detector_dataclass()`` -- returns a ``DetectionOutput``
  dataclass (``boxes``, ``scores``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.quantization import DeQuantStub, QuantStub

__all__ = [
    "ScaleShift",
    "ConvGNAct",
    "DynamicGate",
    "UserUNet",
    "user_unet",
    "MultiTaskNet",
    "multitask_dict",
    "DetectionOutput",
    "TinyDetector",
    "detector_dataclass",
]


class ScaleShift(nn.Module):
    """User-defined per-channel affine layer (learned scale and shift)."""

    def __init__(self, channels: int, init_scale: float = 1.0, init_shift: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1), float(init_scale)))
        self.shift = nn.Parameter(torch.full((1, channels, 1, 1), float(init_shift)))

    def forward(self, x):
        return x * self.scale + self.shift


class ConvGNAct(nn.Module):
    """Conv2d -> GroupNorm -> SiLU (no BN, so nothing to fold)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 4, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.gn = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.gn(self.conv(x)))


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DynamicGate(nn.Module):
    """Data-dependent control flow: NOT symbolically traceable by torch.fx.

    Picks a 1x1 "positive" path or a 3x3 "negative" path depending on the sign
    of the input mean (a pattern users write for e.g. day/night or
    over/under-exposure handling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_pos = nn.Conv2d(channels, channels, 1)
        self.conv_neg = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        if x.mean() > 0:
            y = self.conv_pos(x)
        else:
            y = self.conv_neg(x)
        return self.relu(y)


class UserUNet(nn.Module):
    def __init__(self, in_ch: int = 3, num_classes: int = 4, width: int = 32, with_gate: bool = True):
        super().__init__()
        c = width
        # leftover from an earlier eager-mode quantization attempt
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

        self.stem = conv_bn_relu(in_ch, c)
        self.enc1 = ConvGNAct(c, c)
        self.down1 = conv_bn_relu(c, 2 * c, stride=2)
        self.enc2 = ConvGNAct(2 * c, 2 * c)
        self.affine2 = ScaleShift(2 * c, init_scale=0.8, init_shift=0.1)
        self.down2 = conv_bn_relu(2 * c, 4 * c, stride=2, relu=False)  # pre-activation goes into the gate
        self.gate = DynamicGate(4 * c) if with_gate else nn.Identity()
        self.bottleneck = ConvGNAct(4 * c, 4 * c)

        self.dec1 = conv_bn_relu(4 * c + 2 * c, 2 * c)
        self.dec2 = ConvGNAct(2 * c + c, c)
        self.out_affine = ScaleShift(c)
        self.head = nn.Conv2d(c, num_classes, kernel_size=1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.quant(x)
        s1 = self.enc1(self.stem(x))                      # H
        s2 = self.affine2(self.enc2(self.down1(s1)))      # H/2
        b = self.bottleneck(self.gate(self.down2(s2)))    # H/4

        u1 = F.interpolate(b, scale_factor=2, mode="nearest")
        u1 = self.dec1(torch.cat([u1, s2], dim=1))        # H/2
        u2 = F.interpolate(u1, scale_factor=2, mode="bilinear", align_corners=False)
        u2 = self.dec2(torch.cat([u2, s1], dim=1))        # H
        out = self.head(self.out_affine(u2))
        return self.dequant(out)


def user_unet(num_classes: int = 4, width: int = 32, with_gate: bool = True) -> UserUNet:
    """Input: (N, 3, H, W) with H, W divisible by 4; output (N, num_classes, H, W)."""
    return UserUNet(num_classes=num_classes, width=width, with_gate=with_gate)


# --------------------------------------------------------------------------------------
# dict / dataclass outputs
# --------------------------------------------------------------------------------------
class MultiTaskNet(nn.Module):
    def __init__(self, num_classes: int = 10, embed_dim: int = 32, width: int = 16):
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn_relu(3, width, stride=2),
            conv_bn_relu(width, 2 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.cls_head = nn.Linear(2 * width, num_classes)
        self.emb_head = nn.Sequential(nn.Linear(2 * width, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, x) -> Dict[str, torch.Tensor]:
        feat = self.backbone(x)
        return {"logits": self.cls_head(feat), "embedding": self.emb_head(feat)}


def multitask_dict(num_classes: int = 10, embed_dim: int = 32, width: int = 16) -> MultiTaskNet:
    return MultiTaskNet(num_classes=num_classes, embed_dim=embed_dim, width=width)


@dataclass
class DetectionOutput:
    boxes: torch.Tensor   # (N, A, 4)
    scores: torch.Tensor  # (N, A, num_classes), sigmoid


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int = 3, num_anchors: int = 3, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.body = nn.Sequential(
            conv_bn_relu(3, width, stride=2),
            conv_bn_relu(width, 2 * width, stride=2),
            conv_bn_relu(2 * width, 2 * width),
        )
        self.box_head = nn.Conv2d(2 * width, num_anchors * 4, 1)
        self.cls_head = nn.Conv2d(2 * width, num_anchors * num_classes, 1)

    def forward(self, x) -> DetectionOutput:
        f = self.body(x)
        n = f.shape[0]
        boxes = self.box_head(f).permute(0, 2, 3, 1).reshape(n, -1, 4)
        scores = self.cls_head(f).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes).sigmoid()
        return DetectionOutput(boxes=boxes, scores=scores)


def detector_dataclass(num_classes: int = 3, num_anchors: int = 3, width: int = 16) -> TinyDetector:
    return TinyDetector(num_classes=num_classes, num_anchors=num_anchors, width=width)
