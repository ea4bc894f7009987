"""VGG float reference models.

* ``vgg16(...)`` -- torchvision-exact ``VGG`` (seed 001: a user calling
  ``torchvision.models.vgg16(pretrained=True)``): ``features`` Sequential of
  Conv2d/ReLU(inplace=True)/MaxPool2d (plus BatchNorm2d for the ``_bn``
  variants), ``avgpool = AdaptiveAvgPool2d((7, 7))``, ``torch.flatten(x, 1)``
  and ``classifier`` = Linear/ReLU(True)/Dropout x2 + Linear.  Module indices
  inside ``features`` / ``classifier`` match torchvision exactly (e.g.
  ``features.28`` is the last conv of vgg16, ``classifier.6`` the last Linear).
* ``cifar_vgg(...)`` -- the seed-003 user's ``Cifar_VGG`` (``make_layers`` with
  ``batch_norm=True``, ``AdaptiveAvgPool2d((1, 1))``, ``x.view(x.size(0), -1)``,
  ``classifier`` = two Linear layers with NO activation in between) for 32x32
  inputs.  The user's leftover QuantStub/DeQuantStub are *not* reproduced here
  (these are float references); ``custom.py`` covers leftover stubs.
"""
from __future__ import annotations

from typing import Dict, List, Union

import torch
import torch.nn as nn

__all__ = ["VGG", "make_layers", "cfgs", "vgg11", "vgg16", "vgg16_bn", "Cifar_VGG", "cifar_vgg", "cifar_cfgs"]


class VGG(nn.Module):
    def __init__(
        self,
        features: nn.Module,
        num_classes: int = 1000,
        init_weights: bool = True,
        dropout: float = 0.5,
        hidden: int = 4096,
        last_channels: int = 512,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_layers(cfg: List[Union[str, int]], batch_norm: bool = False, width_div: int = 1) -> nn.Sequential:
    layers: List[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = max(1, int(v) // width_div)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


cfgs: Dict[str, List[Union[str, int]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _vgg(cfg: str, batch_norm: bool, num_classes: int, width_div: int, dropout: float) -> VGG:
    return VGG(
        make_layers(cfgs[cfg], batch_norm=batch_norm, width_div=width_div),
        num_classes=num_classes,
        dropout=dropout,
        hidden=max(1, 4096 // width_div),
        last_channels=max(1, 512 // width_div),
    )


def vgg16(num_classes: int = 1000, width_div: int = 1, batch_norm: bool = False, dropout: float = 0.5) -> VGG:
    """torchvision ``vgg16`` (``batch_norm=True`` -> ``vgg16_bn``).  ``width_div``
    divides every conv width and the 4096-wide classifier hidden size."""
    return _vgg("D", batch_norm, num_classes, width_div, dropout)


def vgg16_bn(num_classes: int = 1000, width_div: int = 1, dropout: float = 0.5) -> VGG:
    return _vgg("D", True, num_classes, width_div, dropout)


def vgg11(num_classes: int = 1000, width_div: int = 1, batch_norm: bool = False, dropout: float = 0.5) -> VGG:
    return _vgg("A", batch_norm, num_classes, width_div, dropout)


# --------------------------------------------------------------------------------------
# Seed 003: user's Cifar_VGG (32x32 input, BN after every conv, 2-Linear classifier).
# --------------------------------------------------------------------------------------
cifar_cfgs: Dict[str, List[Union[str, int]]] = {
    "RA": [512, "M", 512, "M", 512, 512, "M", 512, 512, "M", 512, 512, "M"],
    **cfgs,
}


class Cifar_VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True, last_channels: int = 512):
        super(Cifar_VGG, self).__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels, last_channels),
            nn.Linear(last_channels, num_classes),
        )
        if init_weights:
            self._initialize_weights()

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def cifar_vgg(cfg: Union[str, List[Union[str, int]]] = "RA", batch_norm: bool = True, num_classes: int = 10,
              width_div: int = 1) -> Cifar_VGG:
    """Seed-003 ``cifar_rvgg11_bn`` by default (cfg ``"RA"``, BN).  ``cfg`` may be
    a key of ``cifar_cfgs`` ("RA", "A", "B", "D", "E") or an explicit list.
    The seed's default ``num_classes`` was 1000; a CIFAR model realistically has
    10, which is used here."""
    layer_cfg = cifar_cfgs[cfg] if isinstance(cfg, str) else list(cfg)
    features = make_layers(layer_cfg, batch_norm=batch_norm, width_div=width_div)
    last = [v for v in layer_cfg if v != "M"][-1]
    return Cifar_VGG(features, num_classes=num_classes, last_channels=max(1, int(last) // width_div))
