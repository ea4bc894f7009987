"""Range estimators for activations and the quantization parameters they produce.

An ``Observer`` sits on one tensor edge of the prepared graph, passes the tensor through unchanged and
records statistics. ``qparams()`` turns them into a frozen ``QParams`` with the chosen estimator:

* ``minmax``      running min / max over all batches
* ``ema``         exponential moving average of per-batch min / max
* ``percentile``  clip at the given percentile of a running histogram (both tails)
* ``mse``         clip range that minimises the expected squared quantization error on the histogram

Weights are quantized per output channel, symmetric int8 (``quantize_weight``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import NotCalibratedError

ESTIMATORS: dict[str, type["Observer"]] = {}
BINS = 2048


def register_estimator(name: str):
    def deco(cls):
        cls.estimator = name
        ESTIMATORS[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class QParams:
    """Affine per-tensor quantization: ``real = scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int = 0
    qmax: int = 255
    dtype: str = "quint8"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def range(self) -> tuple[float, float]:
        return (self.scale * (self.qmin - self.zero_point), self.scale * (self.qmax - self.zero_point))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax,
                "dtype": self.dtype}

    def __repr__(self) -> str:
        lo, hi = self.range
        return f"QParams(scale={self.scale:.4g}, zero_point={self.zero_point}, range=[{lo:.4g}, {hi:.4g}], {self.dtype})"


def qparams_from_range(lo: float, hi: float, qmin: int = 0, qmax: int = 255) -> QParams:
    """Asymmetric uint8 params covering [lo, hi] (always including 0, so zero is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError(f"non-finite range [{lo}, {hi}]")
    scale = max((hi - lo) / (qmax - qmin), 1e-8)
    zp = int(round(qmin - lo / scale))
    zp = max(qmin, min(qmax, zp))
    return QParams(scale=float(scale), zero_point=zp, qmin=qmin, qmax=qmax)


class Observer(nn.Module):
    """Records the range of the tensor that flows through it (identity in the forward pass)."""

    estimator = "minmax"
    qcast_leaf = True

    def __init__(self, name: str = "", qmax: int = 255, percentile: float = 99.99):
        super().__init__()
        self.name = name  # display name of the value's producer, for errors and summaries
        self.qmin, self.qmax = 0, qmax
        self.percentile = percentile
        self.batches = 0
        self.min_val = math.inf
        self.max_val = -math.inf

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            x_d = x.detach()
            lo, hi = torch.aminmax(x_d)
            lo, hi = float(lo), float(hi)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                from .errors import CalibrationError
                raise CalibrationError(f"{self.name}: produced NaN/Inf during calibration (range [{lo}, {hi}]); "
                                       "check the inputs and the float model on this batch")
            self.update(x_d, lo, hi)
            self.min_val, self.max_val = min(self.min_val, lo), max(self.max_val, hi)
            self.batches += 1
        return x

    def update(self, x: torch.Tensor, lo: float, hi: float) -> None:  # estimator-specific statistics
        pass

    @property
    def calibrated(self) -> bool:
        return self.batches > 0

    def clip_range(self) -> tuple[float, float]:
        return self.min_val, self.max_val

    def qparams(self) -> QParams:
        if not self.calibrated:
            raise NotCalibratedError(
                f"{self.name or 'an observer'} has seen no calibration data. Run "
                "qcast.calibrate(observed, data) (or pass calibration data to qcast.quantize) before convert(); "
                "if this layer is never reached by your data, keep it in float with QuantConfig(skip=[...]).")
        lo, hi = self.clip_range()
        return qparams_from_range(lo, hi, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"{self.estimator}, name={self.name!r}, batches={self.batches}, range=[{self.min_val:.4g}, {self.max_val:.4g}]"


@register_estimator("minmax")
class MinMaxObserver(Observer):
    pass


@register_estimator("ema")
class EMAObserver(Observer):
    momentum = 0.1

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ema = None

    def update(self, x, lo, hi):
        if self.ema is None:
            self.ema = (lo, hi)
        else:
            m = self.momentum
            self.ema = (self.ema[0] * (1 - m) + lo * m, self.ema[1] * (1 - m) + hi * m)

    def clip_range(self):
        return self.ema


class HistogramObserver(Observer):
    """Keeps a histogram over the running [min, max]; when the range grows, old counts are re-binned."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("hist", torch.zeros(BINS, dtype=torch.float64), persistent=False)
        self.h_lo, self.h_hi = 0.0, 0.0

    def update(self, x, lo, hi):
        new_lo, new_hi = min(lo, self.h_lo if self.batches else lo), max(hi, self.h_hi if self.batches else hi)
        if new_hi - new_lo < 1e-12:
            new_hi = new_lo + 1e-6
        if self.batches and (new_lo < self.h_lo or new_hi > self.h_hi):
            self.hist = self._rebin(self.hist, self.h_lo, self.h_hi, new_lo, new_hi)
        self.h_lo, self.h_hi = new_lo, new_hi
        h = torch.histc(x.float().flatten(), bins=BINS, min=new_lo, max=new_hi)
        self.hist += h.double()

    @staticmethod
    def _rebin(hist, lo, hi, new_lo, new_hi):
        width = (hi - lo) / BINS
        centers = lo + (torch.arange(BINS, dtype=torch.float64) + 0.5) * width
        idx = ((centers - new_lo) / (new_hi - new_lo) * BINS).long().clamp(0, BINS - 1)
        out = torch.zeros(BINS, dtype=torch.float64)
        out.index_add_(0, idx, hist)
        return out

    def _centers(self):
        width = (self.h_hi - self.h_lo) / BINS
        return self.h_lo + (torch.arange(BINS, dtype=torch.float64) + 0.5) * width


@register_estimator("percentile")
class PercentileObserver(HistogramObserver):
    def clip_range(self):
        cdf = torch.cumsum(self.hist, 0)
        total = float(cdf[-1])
        tail = (100.0 - self.percentile) / 100.0 * total
        centers = self._centers()
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(total - tail, dtype=torch.float64)))
        lo = float(centers[min(lo_idx, BINS - 1)]) if self.min_val < 0 else 0.0
        hi = float(centers[min(hi_idx, BINS - 1)])
        return max(lo, self.min_val), min(hi, self.max_val)


@register_estimator("mse")
class MSEObserver(HistogramObserver):
    """Searches clip ranges [a*lo, b*hi] and keeps the one with least expected squared error."""

    def clip_range(self):
        centers, counts = self._centers(), self.hist
        lo, hi = min(self.min_val, 0.0), max(self.max_val, 0.0)
        fracs = torch.linspace(0.2, 1.0, 81, dtype=torch.float64)
        levels = self.qmax - self.qmin
        best, best_err = (lo, hi), math.inf
        lo_fracs = fracs if lo < 0 else torch.ones(1, dtype=torch.float64)
        for lf in lo_fracs:
            a = lo * float(lf)
            b = hi * fracs  # all hi candidates at once
            scale = ((b - a) / levels).clamp_min(1e-12)  # [F]
            c = centers[None, :]
            clipped = torch.minimum(torch.maximum(c, torch.full_like(c, a)), b[:, None])
            err = ((c - clipped) ** 2 + (scale[:, None] ** 2) / 12.0 * ((c >= a) & (c <= b[:, None]))) @ counts
            i = int(torch.argmin(err))
            if float(err[i]) < best_err:
                best_err, best = float(err[i]), (a, float(b[i]))
        return best


def make_observer(estimator: str, name: str, qmax: int = 255, percentile: float = 99.99) -> Observer:
    return ESTIMATORS[estimator](name=name, qmax=qmax, percentile=percentile)


class FixedQParamsObserver(Observer):
    """For ops whose int8 kernel has fixed output params (sigmoid: [0, 1], tanh: [-1, 1])."""

    estimator = "fixed"

    def __init__(self, name: str, qp: QParams):
        super().__init__(name=name)
        self.fixed = qp

    @property
    def calibrated(self) -> bool:
        return True

    def qparams(self) -> QParams:
        return self.fixed


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 scales (max |w| / 127)."""
    amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1).float()
    return (amax / 127.0).clamp_min(1e-12)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric qint8 tensor of ``w`` (axis 0)."""
    scales = weight_scales(w)
    zps = torch.zeros(w.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(w.detach().float(), scales.float(), zps, 0, torch.qint8)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    return quantize_weight(w).dequantize()
