"""Passthrough kernels beyond the shape ops of test_ops.py: ``mean`` as global average pooling."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.helpers import assert_sqnr, quantize_small


class ConvMean(nn.Module):
    def __init__(self, keepdim: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.keepdim = keepdim

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y.mean((2, 3), keepdim=True).flatten(1) if self.keepdim else torch.mean(y, dim=[-1, -2])
        return self.fc(y)


@pytest.mark.parametrize("keepdim", [False, True])
def test_global_mean_runs_int8_requantized_between_conv_and_linear(keepdim):
    torch.manual_seed(0)
    r = quantize_small(ConvMean(keepdim), (2, 4, 16, 16))
    rows = {row.op: row for row in r.rows}
    assert rows["mean"].precision == "int8", rows["mean"]
    assert "requantized" in rows["mean"].reason and "global average" in rows["mean"].reason
    assert all(row.precision == "int8" for row in r.rows), r.rows
    # measured 44.9 dB; keeping the input's params instead (a passthrough mean) measured 34.3 dB
    assert_sqnr(r.sqnr, 41.0, f"conv -> mean(keepdim={keepdim}) -> linear")


def test_mean_over_a_short_dim_keeps_the_input_params():
    """Averaging two values is not finer than the input step worth a requantization: a passthrough."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.relu(self.conv(x)).reshape(x.shape[0], 2, 4, x.shape[2], x.shape[3])
            return self.head(y.mean(1))

    torch.manual_seed(0)
    r = quantize_small(M(), (2, 4, 10, 10))
    mean = next(row for row in r.rows if row.op == "mean")
    assert mean.precision == "int8" and "no requantization" in mean.reason, mean
    assert_sqnr(r.sqnr, 38.0, "mean over 2")  # measured 41.7


def test_mean_with_dtype_stays_float_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3), dtype=torch.float64).float()

    torch.manual_seed(0)
    r = quantize_small(M(), (2, 4, 10, 10))
    row = next(row for row in r.rows if row.op == "mean")
    assert row.precision == "float" and "dtype" in row.reason


class ConvPad(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.pad = nn.ZeroPad2d((1, 2, 0, 3))
        self.head = nn.Conv2d(8, 4, 3)
        self.how = how

    def forward(self, x):
        y = self.conv(x)  # signed: the zero point is not 0, padding must still write 0.0
        if self.how == "module":
            y = self.pad(y)
        elif self.how == "functional":
            y = torch.nn.functional.pad(y, (1, 2, 0, 3))
        else:
            y = torch.nn.functional.pad(y, (1, 1, 1, 1), mode="replicate")
        return self.head(y)


@pytest.mark.parametrize("how", ["module", "functional"])
def test_zero_padding_runs_int8(how):
    torch.manual_seed(0)
    r = quantize_small(ConvPad(how), (2, 4, 12, 12))
    pad = next(row for row in r.rows if row.op == "pad")
    assert pad.precision == "int8", pad
    assert_sqnr(r.sqnr, 32.0, f"conv -> pad ({how})")  # measured 35.4


def test_replicate_padding_stays_float_and_says_why():
    torch.manual_seed(0)
    r = quantize_small(ConvPad("replicate"), (2, 4, 12, 12))
    pad = next(row for row in r.rows if row.op == "pad")
    assert pad.precision == "float" and "replicate" in pad.reason, pad
