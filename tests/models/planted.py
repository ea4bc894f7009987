"""``PlantedMLP``: a deep ReLU MLP with two layers planted to need float, for sensitivity and the accuracy search.

Layers ``src + 1`` for ``src`` in ``planted`` read a feature with bias +1000 (from layer ``src``) that they ignore
(zero weights): their int8 input params crush every other feature, so they must stay float. Used by
``tests/distributed/test_search.py`` (22 layers of 16) and ``benchmarks/scale_search.py`` (24 layers of 128).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PlantedMLP(nn.Module):
    def __init__(self, depth: int, width: int, planted: tuple[int, ...] = (5, 14)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        with torch.no_grad():
            for layer in self.layers:  # He init, small biases: the signal keeps its scale through the layers
                layer.weight.normal_(0.0, (2.0 / width) ** 0.5)
                layer.bias.normal_(0.0, 0.01)
            for src in planted:
                self.layers[src].bias[0] = 1000.0
                self.layers[src + 1].weight[:, 0] = 0.0

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x
