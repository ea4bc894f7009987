"""BlazeFace-like face detector float reference (seed 004).

Reproduces the module tree printed in the seed exactly (class names ``Blaze`` /
``BlazeBlock``, stem ``conv1`` Sequential, blocks ``conv2`` .. ``conv12``, the
misspelt ``actvation`` attribute, ``conv`` Sequential of Sequentials,
``shortcut`` = MaxPool2d + 1x1 Conv2d(bias=True) + BN + ReLU on strided
blocks, identity residual otherwise, and ``loc`` / ``conf`` / ``landm`` heads
of (3x3 depthwise conv, ReLU, 1x1 conv) per feature map).

Quirks of the original kept on purpose:

* the *second* conv of a "double" BlazeBlock is a dense 5x5 conv (no
  ``groups``), exactly as printed (``Conv2d(24, 24, kernel_size=(5, 5), ...,
  bias=False)``);
* the residual add ``h + x`` is followed by the shared ``self.actvation``;
* head outputs go ``permute(0, 2, 3, 1).contiguous()`` then
  ``view(N, -1, k)`` and are ``torch.cat``-ed across the two feature maps
  (16x16 with 2 anchors and 8x8 with 6 anchors for a 128x128 input -> 896
  anchors); class scores get a softmax in test phase.

``blazeface(with_landmarks=False)`` (default) drops the ``landm`` head and
returns ``(boxes, scores)``; ``with_landmarks=True`` is the seed model verbatim
and returns ``(boxes, scores, landmarks)``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BlazeBlock", "Blaze", "blazeface"]


def conv_bn(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def conv_dw(inp: int, oup: int, stride: int, kernel_size: int = 5, depthwise: bool = True) -> nn.Sequential:
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(inp, inp, kernel_size=kernel_size, stride=stride, padding=padding,
                  groups=inp if depthwise else 1, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, kernel_size=1, stride=1, padding=0, bias=False),
        nn.BatchNorm2d(oup),
    )


class BlazeBlock(nn.Module):
    def __init__(self, inp: int, oup: int, double_oup: Optional[int] = None, stride: int = 1, kernel_size: int = 5):
        super(BlazeBlock, self).__init__()
        assert stride in [1, 2]
        self.stride = stride
        self.inp = inp
        self.use_pooling = self.stride != 1
        self.shortcut_oup = double_oup or oup
        self.actvation = nn.ReLU(inplace=True)

        if double_oup is None:
            self.conv = nn.Sequential(
                conv_dw(inp, oup, stride, kernel_size),
            )
        else:
            self.conv = nn.Sequential(
                conv_dw(inp, oup, stride, kernel_size),
                nn.ReLU(inplace=True),
                conv_dw(oup, double_oup, 1, kernel_size, depthwise=False),
                nn.ReLU(inplace=True),
            )

        if self.use_pooling:
            self.shortcut = nn.Sequential(
                nn.MaxPool2d(kernel_size=stride, stride=stride),
                nn.Conv2d(in_channels=inp, out_channels=self.shortcut_oup, kernel_size=1, stride=1),
                nn.BatchNorm2d(self.shortcut_oup),
                nn.ReLU(inplace=True),
            )

    def forward(self, x):
        h = self.conv(x)

        if self.use_pooling:
            x = self.shortcut(x)

        z = h + x
        return self.actvation(z)


def _head(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, kernel_size=3, stride=1, padding=1, groups=inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, out, kernel_size=1, stride=1),
    )


class Blaze(nn.Module):
    def __init__(self, num_classes: int = 2, num_anchors=(2, 6), width_mult: float = 1.0,
                 with_landmarks: bool = True, phase: str = "test"):
        super(Blaze, self).__init__()
        self.phase = phase
        self.num_classes = num_classes
        self.with_landmarks = with_landmarks

        def c(ch: int) -> int:
            return max(1, int(round(ch * width_mult)))

        c24, c48, c96 = c(24), c(48), c(96)
        self.conv1 = conv_bn(3, c24, stride=2)
        self.conv2 = BlazeBlock(c24, c24)
        self.conv3 = BlazeBlock(c24, c24)
        self.conv4 = BlazeBlock(c24, c48, stride=2)
        self.conv5 = BlazeBlock(c48, c48)
        self.conv6 = BlazeBlock(c48, c48)
        self.conv7 = BlazeBlock(c48, c24, c96, stride=2)
        self.conv8 = BlazeBlock(c96, c24, c96)
        self.conv9 = BlazeBlock(c96, c24, c96)
        self.conv10 = BlazeBlock(c96, c24, c96, stride=2)
        self.conv11 = BlazeBlock(c96, c24, c96)
        self.conv12 = BlazeBlock(c96, c24, c96)

        self.loc = nn.Sequential(*[_head(c96, a * 4) for a in num_anchors])
        self.conf = nn.Sequential(*[_head(c96, a * num_classes) for a in num_anchors])
        if with_landmarks:
            self.landm = nn.Sequential(*[_head(c96, a * 10) for a in num_anchors])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, inputs):
        sources: List[torch.Tensor] = []

        x = self.conv1(inputs)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.conv4(x)
        x = self.conv5(x)
        x = self.conv6(x)
        x = self.conv7(x)
        x = self.conv8(x)
        x = self.conv9(x)
        sources.append(x)
        x = self.conv10(x)
        x = self.conv11(x)
        x = self.conv12(x)
        sources.append(x)

        loc = []
        conf = []
        for (x, l, c) in zip(sources, self.loc, self.conf):
            loc.append(l(x).permute(0, 2, 3, 1).contiguous())
            conf.append(c(x).permute(0, 2, 3, 1).contiguous())

        bbox_regressions = torch.cat([o.view(o.size(0), -1, 4) for o in loc], 1)
        classifications = torch.cat([o.view(o.size(0), -1, self.num_classes) for o in conf], 1)
        if self.phase != "train":
            classifications = F.softmax(classifications, dim=-1)

        if not self.with_landmarks:
            return bbox_regressions, classifications

        landm = []
        for (x, lm) in zip(sources, self.landm):
            landm.append(lm(x).permute(0, 2, 3, 1).contiguous())
        ldm_regressions = torch.cat([o.view(o.size(0), -1, 10) for o in landm], 1)
        return bbox_regressions, classifications, ldm_regressions


def blazeface(num_classes: int = 2, width_mult: float = 1.0, with_landmarks: bool = False,
              phase: str = "test") -> Blaze:
    """BlazeFace detector from seed 004.  Returns ``(boxes, scores)`` (plus
    ``landmarks`` when ``with_landmarks=True``, which is the seed model
    verbatim).  Native input is 128x128 (any multiple of 16 works)."""
    return Blaze(num_classes=num_classes, width_mult=width_mult, with_landmarks=with_landmarks, phase=phase)
