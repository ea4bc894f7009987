"""What the engine backends' tests share: a small CNN calibrated once, and the several-threads check."""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

import qcast


class Small(nn.Module):
    """conv+bn+relu, a residual add, a strided conv and a linear head: every kind of int8 op the engines fuse."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + x
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def small_observed(config=None):
    """``(float model, calibrated ObservedModel)`` of ``Small`` on 4 random batches of 2 (seeded)."""
    torch.manual_seed(0)
    model = Small().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(4)]
    observed = qcast.prepare(model, data[0], config)
    qcast.calibrate(observed, data, progress=False)
    return model, observed


def assert_threads_agree(qmodel) -> None:
    """Calls from several threads at once give what serial calls give (the engine wrappers serialize them)."""
    xs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [qmodel(x) for x in xs]
    got = [None] * len(xs)

    def run(i):
        for _ in range(5):
            got[i] = qmodel(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
