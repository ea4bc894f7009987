"""Range estimators for activations and the quantization parameters they produce.

An ``Observer`` sits on one tensor edge of the prepared graph, passes the tensor through unchanged and
records statistics. ``qparams()`` turns them into a frozen ``QParams`` with the chosen estimator:

* ``minmax``      running min / max over all batches
* ``ema``         exponential moving average of per-batch min / max
* ``percentile``  clip at the given percentile of a running histogram (both tails)
* ``mse``         clip range that minimises the expected squared quantization error on the histogram
* ``kl``          entropy calibration (TensorRT-style): the clip threshold whose 8-bit quantized histogram is
                  closest in KL divergence to the clipped reference histogram

Weights are quantized per output channel, symmetric int8 (``quantize_weight``).
"""
from __future__ import annotations

import contextlib
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
    #: class-wide switch: while True every observer passes tensors through without recording (``observers_bypassed``)
    bypass = False
    #: the activation ``Scheme`` whose grid ``qparams()`` returns (None: uint8 affine over the clip range)
    scheme = None

    def __init__(self, name: str = "", qmax: int = 255, percentile: float = 99.99):
        super().__init__()
        self.name = name  # display name of the value's producer, for errors and summaries
        self.qmin, self.qmax = 0, qmax
        self.percentile = percentile
        self.batches = 0
        self.min_val = math.inf
        self.max_val = -math.inf

    def forward(self, x):
        if Observer.bypass:
            return x
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
        if self.scheme is not None:  # QuantConfig(activation="int8_sym" / "pow2" / ...): that scheme's grid
            from .schemes import activation_range_params
            scale, zp = activation_range_params(self.scheme, lo, hi, self.qmin, self.qmax)
            return QParams(scale=scale, zero_point=zp, qmin=self.qmin, qmax=self.qmax)
        return qparams_from_range(lo, hi, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"{self.estimator}, name={self.name!r}, batches={self.batches}, range=[{self.min_val:.4g}, {self.max_val:.4g}]"


@contextlib.contextmanager
def observers_bypassed():
    """Run the observed model with every observer as a plain identity (SmoothQuant's first calibration pass records
    its own statistics; the observers must see only the smoothed tensors of the second pass)."""
    previous, Observer.bypass = Observer.bypass, True
    try:
        yield
    finally:
        Observer.bypass = previous


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

    bins = BINS

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("hist", torch.zeros(self.bins, dtype=torch.float64), persistent=False)
        self.h_lo, self.h_hi = 0.0, 0.0

    def update(self, x, lo, hi):
        new_lo, new_hi = min(lo, self.h_lo if self.batches else lo), max(hi, self.h_hi if self.batches else hi)
        if new_hi - new_lo < 1e-12:
            new_hi = new_lo + 1e-6
        if self.batches and (new_lo < self.h_lo or new_hi > self.h_hi):
            self.hist = self._rebin(self.hist, self.h_lo, self.h_hi, new_lo, new_hi)
        self.h_lo, self.h_hi = new_lo, new_hi
        h = torch.histc(x.float().flatten(), bins=self.bins, min=new_lo, max=new_hi)
        self.hist += h.double()

    @staticmethod
    def _rebin(hist, lo, hi, new_lo, new_hi):
        bins = hist.numel()
        width = (hi - lo) / bins
        centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * width
        idx = ((centers - new_lo) / (new_hi - new_lo) * bins).long().clamp(0, bins - 1)
        out = torch.zeros(bins, dtype=torch.float64)
        out.index_add_(0, idx, hist)
        return out

    def _centers(self):
        width = (self.h_hi - self.h_lo) / self.bins
        return self.h_lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width

    def clip_range(self):
        """``_search()``'s range, computed once per amount of data seen (searches cost up to ~0.1 s, and the
        calibration summary and convert both ask)."""
        cached = getattr(self, "_clip_cache", None)
        if cached is not None and cached[0] == self.batches:
            return cached[1]
        result = self._search()
        self._clip_cache = (self.batches, result)
        return result

    def _search(self) -> tuple[float, float]:
        return self.min_val, self.max_val


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

    def _search(self) -> tuple[float, float]:
        """Expected squared error of every candidate ``[a, b]`` at once, from prefix sums over the histogram:
        values below ``a`` cost ``(c - a)^2``, above ``b`` cost ``(c - b)^2``, inside cost ``scale^2 / 12``."""
        centers, counts = self._centers(), self.hist
        lo, hi = min(self.min_val, 0.0), max(self.max_val, 0.0)
        fracs = torch.linspace(0.2, 1.0, 81, dtype=torch.float64)
        levels = self.qmax - self.qmin
        a = lo * fracs if lo < 0 else torch.full((1,), lo, dtype=torch.float64)  # [A]
        b = hi * fracs  # [B]
        zero = torch.zeros(1, dtype=torch.float64)
        s0 = torch.cat([zero, torch.cumsum(counts, 0)])  # s_k[i] = sum over bins < i of n * c^k
        s1 = torch.cat([zero, torch.cumsum(counts * centers, 0)])
        s2 = torch.cat([zero, torch.cumsum(counts * centers * centers, 0)])
        ia = torch.searchsorted(centers, a, right=False)  # bins with c < a
        ib = torch.searchsorted(centers, b, right=True)  # bins with c <= b
        below = s2[ia] - 2 * a * s1[ia] + a * a * s0[ia]  # [A]
        above = (s2[-1] - s2[ib]) - 2 * b * (s1[-1] - s1[ib]) + b * b * (s0[-1] - s0[ib])  # [B]
        inside = (s0[ib][None, :] - s0[ia][:, None]).clamp_min(0)  # [A, B]
        scale = ((b[None, :] - a[:, None]) / levels).clamp_min(1e-12)
        err = below[:, None] + above[None, :] + scale * scale / 12.0 * inside
        i = int(torch.argmin(err))
        return float(a[i // len(b)]), float(b[i % len(b)])


@register_estimator("kl")
class KLObserver(HistogramObserver):
    """Entropy calibration: the clip range whose quantized histogram loses the least information.

    For each candidate range ``[a, b]`` (TensorRT's recipe, on the histogram of ``x``):

    * the reference ``P`` is the histogram restricted to ``[a, b]`` with the clipped tails folded into its
      first / last bin;
    * ``Q`` quantizes the *unclipped* slice onto the ``qmax - qmin + 1`` grid points of ``[a, b]`` (each grid cell's
      mass spread evenly over the cell's non-empty bins), so clipping mass shows up as a mismatch at the edges;
    * the range with least ``KL(P || Q)`` wins.

    All-non-negative tensors (post-relu) search the upper end only (``[0, b]``). Signed tensors search one
    threshold ``T`` on ``|x|`` (``[max(min, -T), min(max, T)]``), as TensorRT does. A candidate must span at least
    as many histogram bins as there are grid cells (below that the histogram cannot see rounding error and KL
    would reward clipping everything); hence the finer histogram (``bins = 2 * BINS``). Tensors with fewer than
    ``MIN_SAMPLES`` values, or a histogram too narrow to search, keep the full range.
    """

    bins = 2 * BINS
    candidates = 256
    MIN_SAMPLES = 512

    def _search(self) -> tuple[float, float]:
        lo, hi = min(self.min_val, 0.0), max(self.max_val, 0.0)
        total = float(self.hist.sum())
        width = (self.h_hi - self.h_lo) / self.bins
        levels = self.qmax - self.qmin
        if total < self.MIN_SAMPLES or hi - lo <= (levels + 1) * width or hi - lo < 1e-12:
            return lo, hi
        centers, p = self._centers(), self.hist / total
        t_max = max(-lo, hi)
        t_min = min(t_max, max((levels + 1) * width / 2, 1e-12))
        t = torch.logspace(math.log10(t_min), math.log10(t_max), self.candidates, dtype=torch.float64)
        t = torch.cat([t, torch.tensor([t_max], dtype=torch.float64)])
        a = torch.maximum(torch.full_like(t, lo), -t) if lo < 0 else torch.zeros_like(t)
        b = torch.minimum(torch.full_like(t, hi), t)
        ok = (b - a) >= (levels + 1) * width  # enough bins per grid cell to measure rounding
        ok[-1] = True
        a, b = a[ok], b[ok]
        zero_bin = None
        if self.h_lo <= 0.0 <= self.h_hi:
            zero_bin = min(int((0.0 - self.h_lo) / width), self.bins - 1)
        kl = self._kl(centers, p, a, b, levels, zero_bin)
        if not torch.isfinite(kl).any():
            return lo, hi
        i = int(torch.argmin(kl))
        return float(a[i]), float(b[i])

    #: a bin is a spike when it holds this share of all values and this many times its neighbourhood's average
    SPIKE_SHARE, SPIKE_RATIO, MAX_SPIKES = 1e-3, 16.0, 64

    @staticmethod
    def _spikes(p: torch.Tensor, zero_bin: int | None) -> torch.Tensor:
        window = 17
        kernel = torch.ones(1, 1, window, dtype=p.dtype)
        kernel[0, 0, window // 2] = 0.0
        local = torch.nn.functional.conv1d(p.view(1, 1, -1), kernel, padding=window // 2).view(-1) / (window - 1)
        spike = (p > KLObserver.SPIKE_SHARE) & (p > KLObserver.SPIKE_RATIO * local)
        if zero_bin is not None:
            spike[zero_bin] = True
        idx = spike.nonzero().flatten()
        if len(idx) > KLObserver.MAX_SPIKES:
            idx = idx[p[idx].argsort(descending=True)[:KLObserver.MAX_SPIKES]]
        return idx

    @staticmethod
    def _kl(centers: torch.Tensor, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: int,
            zero_bin: int | None = None, chunk: int = 64) -> torch.Tensor:
        """KL(P || Q) for each candidate range ``[a[k], b[k]]`` (vectorised in chunks of candidates).

        Spikes (the bin holding 0.0, and bins holding far more than their neighbourhood: the zeros of a post-relu
        tensor, a BatchNorm after a relu mapping them to one constant per channel) are cells of their own: a spike
        is one value, rounded to one grid point with no loss of information, but TensorRT's Q would smear it over
        its grid cell's bins, and KL would then shrink the range just to narrow that cell (CREPE tiny, whose
        BatchNorms follow relus: output SQNR 22.8 dB without the spike cells, 24.4 dB with them; its heavy tails
        are still clipped harder than by ``mse``, 35.4 dB).
        """
        spikes = KLObserver._spikes(p, zero_bin)
        out = []
        bins = p.numel()
        cdf = torch.cumsum(p, 0)
        for s in range(0, a.numel(), chunk):
            ak, bk = a[s:s + chunk, None], b[s:s + chunk, None]
            k = ak.shape[0]
            half = (centers[1] - centers[0]) / 2 if bins > 1 else 0.0
            inside = (centers[None, :] >= ak - half) & (centers[None, :] <= bk + half)  # [K, B]: bins [a, b] touches
            first = inside.float().argmax(1)  # first / last inside bin of each candidate
            last = bins - 1 - inside.flip(1).float().argmax(1)
            below = torch.where(first > 0, cdf[(first - 1).clamp_min(0)], torch.zeros_like(first, dtype=p.dtype))
            above = cdf[-1] - cdf[last]
            sliced = p[None, :] * inside
            ref = sliced.clone()
            ref.scatter_add_(1, first[:, None], below[:, None])
            ref.scatter_add_(1, last[:, None], above[:, None])
            scale = (bk - ak) / levels
            cell = torch.round((centers[None, :] - ak) / scale).clamp(0, levels).long()
            cells = levels + 1 + len(spikes)
            if len(spikes):  # a spike lands on one grid point whatever the range: a cell of its own, never smeared
                cell[:, spikes] = levels + 1 + torch.arange(len(spikes))
            flat = (cell + torch.arange(k)[:, None] * cells).flatten()
            mass = torch.zeros(k * cells, dtype=p.dtype).index_add_(0, flat, sliced.flatten())
            nz = (sliced > 0).to(p.dtype)
            count = torch.zeros(k * cells, dtype=p.dtype).index_add_(0, flat, nz.flatten())
            q = (mass[flat] / count[flat].clamp_min(1.0)).view(k, bins) * nz
            ref = ref / ref.sum(1, keepdim=True)
            q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
            # a reference bin that Q leaves empty (an edge bin that only holds folded tails): smoothed, not infinite
            q = torch.where(ref > 0, q.clamp_min(1e-8), q)
            terms = torch.where(ref > 0, ref * torch.log(ref / q), torch.zeros_like(ref))
            # a range that holds none of the histogram (data far from 0, e.g. a constant 3.0) is no candidate
            out.append(torch.where(sliced.sum(1) > 0, terms.sum(1), torch.full_like(terms[:, 0], math.inf)))
        return torch.cat(out)


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


class ChannelMean:
    """Running per-channel mean of a conv/linear input (for bias correction), plus the spatial size it was seen at.

    Channels are dim 1 of a conv input ``[N, C, *spatial]`` and the last dim of a linear input ``[..., C]``.
    One reduction per batch, in float64; the spatial size is the first batch's (used to account for zero padding).
    """

    def __init__(self, channel_dim: int):
        self.channel_dim = channel_dim
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.spatial: tuple[int, ...] | None = None

    def update(self, x: torch.Tensor) -> None:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
            return
        x = x.detach()
        if self.channel_dim == 1:
            dims = [d for d in range(x.dim()) if d != 1]
            if self.spatial is None:
                self.spatial = tuple(x.shape[2:])
        else:
            dims = list(range(x.dim() - 1))
        s = x.sum(dim=dims, dtype=torch.float64) if dims else x.double()
        if self.sum is not None and s.shape != self.sum.shape:
            raise ValueError(f"input channels changed between batches: {tuple(self.sum.shape)} -> {tuple(s.shape)}")
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.numel() // s.numel()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def bias_shift(layer: nn.Module, w: torch.Tensor, w_q: torch.Tensor, stats: ChannelMean) -> torch.Tensor:
    """Mean output error from weight rounding, ``E[(W_q - W) x]``, per output channel (float64).

    Linear: ``(W_q - W) @ E[x]``. Conv: the layer's own conv of a constant image ``E[x]`` (per channel, at the
    calibration input size, with the layer's zero padding, stride, dilation and groups) by ``W_q - W``, averaged
    over output positions: border outputs see padding zeros, not ``E[x]``, and this accounts for it exactly.
    """
    dw = (w_q.double() - w.double())
    mean = stats.mean
    if isinstance(layer, nn.Linear):
        return dw @ mean
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[dw.dim()]
    img = mean.view(1, -1, *([1] * len(stats.spatial))).expand(1, mean.numel(), *stats.spatial)
    out = conv(img, dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return out.mean(dim=[0] + list(range(2, out.dim())))


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def weight_scales(w: torch.Tensor, qmax: int | torch.Tensor = 127) -> torch.Tensor:
    """Per-output-channel symmetric scales (max |w| / qmax; ``qmax = 2^(bits-1) - 1``, 127 for 8-bit weights).

    ``qmax`` may be one int per output channel: the largest int each channel of a weight already on a grid uses
    (power-of-two or learned scales leave a channel's largest int below the grid's end; ``to_qdq`` records it as
    ``qcast_weight_qmax`` so every backend recovers the very scales the weight was quantized with)."""
    amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1).float()
    q = qmax.float() if isinstance(qmax, torch.Tensor) else float(qmax)
    return (amax / q).clamp_min(1e-12)


def qmax_bound(qmax: int | torch.Tensor) -> int:
    """The largest int of a weight grid whose ``qmax`` may be per channel (``weight_scales``)."""
    return int(qmax.max()) if isinstance(qmax, torch.Tensor) else int(qmax)


def qmax_to_json(qmax: int | torch.Tensor):
    return qmax.tolist() if isinstance(qmax, torch.Tensor) else int(qmax)


def qmax_from_json(value) -> int | torch.Tensor:
    return torch.tensor(value, dtype=torch.long) if isinstance(value, list) else int(value)


def quantize_weight(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-channel symmetric qint8 tensor of ``w`` (axis 0), ints in ``[-qmax, qmax]`` (fewer-bit weights are stored
    in int8, so every kernel still runs int8). ``w`` already on such a grid (a fake-quantized or AdaRound weight,
    whose max |w| is ``qmax`` steps) comes back exactly."""
    scales = weight_scales(w, qmax)
    zps = torch.zeros(w.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(w.detach().float(), scales.float(), zps, 0, torch.qint8)


def fake_quant_weight(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    return quantize_weight(w, qmax).dequantize()


def tensor_grid(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, float]:
    """``(int8 weight, scale)`` per tensor, symmetric, ``scale = max|w| / qmax`` (transposed convs: no int8 engine
    takes per-channel weights for them). A weight already on that grid comes back exactly."""
    amax = float(w.detach().abs().max())
    scale = amax / qmax if amax > 0 else 1.0
    return torch.round(w.detach().float() / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def fake_quant_tensor(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    wq, scale = tensor_grid(w, qmax)
    return wq.float() * scale
