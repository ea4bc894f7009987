"""Small models of the layer families issue 13 brought to int8: functional conv/linear/matmul with model-owned
weights, transposed convs and 3-D convs (tests/passes/test_functional_layers.py, tests/backends/test_coverage.py)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantization_decorator(func):
    """Seed 003's shape: a user's own quantization hook wrapped around a custom layer's forward."""
    @functools.wraps(func)
    def wrapper(self, x):
        return func(self, x)
    return wrapper


class Conv2d(nn.Conv2d):
    """Seed 003's custom layer: an nn.Conv2d subclass whose forward calls ``F.conv2d`` with its own weight."""

    @quantization_decorator
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalConvNet(nn.Module):
    """Custom functional conv layers (BN after one, relu after both) and a functional 1x1 conv on a buffer."""

    def __init__(self):
        super().__init__()
        self.c1 = Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = Conv2d(16, 16, 3, padding=1, groups=4, stride=2)
        self.register_buffer("proj", torch.randn(8, 16, 1, 1) * 0.25)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return F.conv2d(x, self.proj)


class FunctionalMLP(nn.Module):
    """An MLP written with ``F.linear`` on its own parameters."""

    def __init__(self, sizes=(32, 64, 64, 10)):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(o, i) / i ** 0.5) for i, o in zip(sizes, sizes[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.randn(o) * 0.1) for o in sizes[1:]])

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = F.linear(x, w, b)
            if i < len(self.weights) - 1:
                x = F.gelu(x) if i else F.relu(x)
        return x


class MatmulBuffer(nn.Module):
    """``x @ self.w`` on a buffer, ``torch.matmul(x, self.v.t())`` and ``x @ self.u.T`` on parameters, and an
    attention-like product of two activations (not a layer: it stays the matmul kernel's)."""

    def __init__(self, d=24):
        super().__init__()
        self.register_buffer("w", torch.randn(d, 32) / d ** 0.5)
        self.v = nn.Parameter(torch.randn(32, 32) / 32 ** 0.5)
        self.u = nn.Parameter(torch.randn(16, 32) / 32 ** 0.5)
        self.shift = nn.Parameter(torch.full((32,), 0.1))

    def forward(self, x):
        h = torch.relu(x @ self.w)
        # a parameter, not a literal: ONNX Runtime leaves a linear reading ``x + 0.1`` (an int8 add whose params are
        # derived, no Q/DQ after it) as a float Gemm (docs/design.md, known limits)
        h = torch.matmul(h, self.v.t()) + self.shift
        return h @ self.u.T, h @ h.transpose(0, 1)


class RunTimeWeight(nn.Module):
    """A conv whose weight is computed from an input (a dynamic filter): there is nothing to quantize ahead of time."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, kernel):
        return F.conv2d(self.conv(x), kernel, padding=1)


class TinyDecoder(nn.Module):
    """An encoder conv and a ConvTranspose2d decoder (BN folded into the first, relu after), a ConvTranspose1d head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.head = nn.ConvTranspose1d(4, 2, 3, stride=2)

    def forward(self, x):
        x = F.relu(self.enc(x))
        x = F.relu(self.bn(self.up1(x)))
        y = self.up2(x)
        return y, self.head(y.mean(dim=2))


class TinyVideo(nn.Module):
    """A video classifier: Conv3d + BatchNorm3d + relu, a strided (1, 3, 3) Conv3d, a functional temporal conv3d on
    a parameter, global pooling and a linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv3d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 16, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.temporal = nn.Parameter(torch.randn(16, 16, 3, 1, 1) * 0.15)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        x = F.relu(F.conv3d(x, self.temporal, None, 1, (1, 0, 0)))
        return self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))


def with_random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics (a fresh BN folds to an identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


#: name -> (model builder, calibration/test input shape)
MODELS = {
    "functional_conv": (lambda: with_random_bn(FunctionalConvNet()), (2, 3, 16, 16)),
    "functional_mlp": (FunctionalMLP, (4, 32)),
    "matmul_buffer": (MatmulBuffer, (6, 24)),  # (batch, features): static int8 linears (3-D inputs are per token)
    "decoder": (lambda: with_random_bn(TinyDecoder()), (2, 3, 16, 16)),
    "video": (lambda: with_random_bn(TinyVideo()), (2, 3, 4, 12, 12)),
}
