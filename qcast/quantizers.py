"""Fake quantizers: the modules qcast inserts on a graph edge or a layer's weight to quantize it, the user's own
included.

``qcast.FakeQuantizer`` is the base of every quantizer: an ``nn.Module`` whose ``forward(x)`` returns ``x``
fake-quantized (same shape and dtype, float values on a grid). It may own parameters and buffers (a learnable
scale). ``@qcast.register_quantizer("name")`` makes it a scheme ``QuantConfig(weight=/activation="name")`` accepts,
globally or per layer: prepare puts one instance on each edge (or weight) the config names it for, without
rewriting any layer (docs/qat.md). A quantizer that declares its integer grid (``grid()``: bits, scale, zero point)
runs on the int8 kernels after convert; one that does not is simulated (its fake-quant in float around a float op)
and ``explain()`` says so.

The built-in trainable quantizers for QAT (``ActivationFakeQuant``, ``WeightFakeQuant``) live here too: the
straight-through estimator, optionally learned scales (LSQ, Esser et al. 2020).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import ConfigError, QcastError
from .schemes import SCHEMES, Scheme, pow2_up


@dataclass(frozen=True)
class Grid:
    """The integer grid a quantizer's output lies on: ``real = scale * (q - zero_point)``.

    ``scale`` / ``zero_point``: a number (per tensor) or a 1-d tensor (one per output channel of a weight).
    ``signed``: ints in ``[-2^(bits-1), 2^(bits-1)-1]`` (weights must be signed and symmetric, zero point 0);
    else ``[0, 2^bits - 1]``."""

    bits: int
    scale: float | torch.Tensor
    zero_point: int | torch.Tensor = 0
    signed: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def __repr__(self) -> str:
        per = f"{self.scale.numel()} channels" if isinstance(self.scale, torch.Tensor) else f"scale={self.scale:.4g}"
        return f"Grid({self.bits}-bit {'signed' if self.signed else 'unsigned'}, {per})"


class FakeQuantizer(nn.Module):
    """Base class of every quantizer qcast inserts (subclass it, register it with ``@qcast.register_quantizer``).

    Override ``forward(x)`` (return ``x`` fake-quantized: same shape and dtype, finite; in QAT with a gradient path
    to ``x``, e.g. a straight-through estimator ``x + (q - x).detach()``). Override ``grid(x)`` to declare the
    integer grid of the output (``x``: the weight for a weight quantizer; None for an activation quantizer, which
    must know its range from its own state) so convert runs the layer on int8 kernels; without it the layer is
    simulated. ``observe(x)`` is called on each calibration batch (PTQ) and on each training step until observers
    are frozen (QAT); the default keeps a running ``min_val`` / ``max_val`` (buffers) for ``forward`` to use.

    Class attributes: ``applies_to`` (``"weight"``, ``"activation"`` or ``"both"``), ``bits`` (for ``explain``).
    """

    applies_to = "both"
    bits = 8
    qcast_leaf = True
    #: the registered name (set by ``register_quantizer``)
    scheme_name = ""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.min_val = torch.minimum(self.min_val.to(x.device), x.min().float())
        self.max_val = torch.maximum(self.max_val.to(x.device), x.max().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - the subclass's
        raise NotImplementedError(f"{type(self).__name__}.forward(x) must return x fake-quantized")

    def grid(self, x: torch.Tensor | None = None) -> Grid | None:
        return None

    @classmethod
    def declares_grid(cls) -> bool:
        return cls.grid is not FakeQuantizer.grid


def register_quantizer(name: str):
    """Class decorator: ``@qcast.register_quantizer("name")`` on a ``FakeQuantizer`` subclass makes ``name`` a
    scheme ``QuantConfig(weight=..., activation=...)`` accepts (as ``cls.applies_to`` allows)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_quantizer needs a non-empty name, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, FakeQuantizer)):
            raise ConfigError(f"@register_quantizer({name!r}) decorates a subclass of qcast.FakeQuantizer, got {cls!r}")
        existing = SCHEMES.get(name)
        if existing is not None and not existing.custom:
            raise ConfigError(f"register_quantizer({name!r}): {name!r} is a built-in scheme; pick another name")
        if cls.applies_to not in ("weight", "activation", "both"):
            raise ConfigError(f"{cls.__name__}.applies_to={cls.applies_to!r} must be 'weight', 'activation' or 'both'")
        cls.scheme_name = name
        SCHEMES[name] = Scheme(name, cls.applies_to, int(cls.bits), quantizer=cls, doc=(cls.__doc__ or "").strip())
        return cls
    return deco


def check_output(q: nn.Module, x: torch.Tensor, y, where: str, need_grad: bool = False, finite: bool = True):
    """QcastError naming the quantizer and the layer for an output of the wrong type, shape or dtype, a non-finite
    one (``finite``: checked on the first calls, a device sync) or, in QAT (``need_grad``), one with no gradient
    path back to ``x``."""
    name = getattr(q, "scheme_name", "") or type(q).__name__
    if not isinstance(y, torch.Tensor):
        raise QcastError(f"quantizer {name!r} at {where} returned {type(y).__name__}, not a tensor: forward(x) must "
                         "return x fake-quantized")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise QcastError(f"quantizer {name!r} at {where} returned {tuple(y.shape)} {y.dtype} for an input of "
                         f"{tuple(x.shape)} {x.dtype}: forward(x) must return the same shape and dtype (fake-quantized "
                         "values, not integers)")
    if finite and not bool(torch.isfinite(y).all()):
        raise QcastError(f"quantizer {name!r} at {where} returned NaN/Inf for a finite input: check its scale (a zero "
                         "or negative scale divides by zero)")
    if need_grad and x.requires_grad and (not y.requires_grad or not _reaches(x, y)):
        raise QcastError(f"quantizer {name!r} at {where} returned a tensor with no gradient path to its input, so "
                         "training cannot update what it reads: use a straight-through estimator, "
                         "`x + (q(x) - x).detach()`, instead of torch.round alone or .detach()")


def _reaches(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether any gradient of ``y`` reaches ``x`` (``torch.round`` alone has a gradient of zero everywhere)."""
    (g,) = torch.autograd.grad(y.float().sum(), x, retain_graph=True, allow_unused=True)
    return g is not None and bool(g.ne(0).any())


# ------------------------------------------------------------------------------------------------
# the built-in trainable quantizers (QAT)
# ------------------------------------------------------------------------------------------------
class _PerTensorSTE(torch.autograd.Function):
    """Per-tensor (or, with a ``(rows, 1)`` scale, per-row) fake quantization with the straight-through estimator (gradient 1 inside the grid, 0 outside) and,
    when ``scale`` needs a gradient, LSQ's for the scale (Esser et al. 2020: ``round(x/s) - x/s`` inside, the
    clipped end ``qmin - zp`` / ``qmax - zp`` outside, times ``grad_factor``).

    Values as ``torch.fake_quantize_per_tensor_affine`` computes them (``zp + round(x * (1/s))``, round half to
    even); written as a few in-place elementwise ops because those ATen kernels (``_cachemask_tensor_qparams`` and
    the learnable variant's backward) measured 40-60 ms per 1M-element activation on this machine's one thread, as
    long as the conv that produced it (``benchmarks/qat_step.py``, cifar_cnn)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        inv = 1.0 / scale
        # five passes over x, ATen's formula: q = round(x * inv) (zp + q on the grid, zp an integer), clamped to
        # [qmin - zp, qmax - zp] into a copy, the mask where clamping changed nothing (inside the grid), times scale
        q = (x * inv).round_()
        y = q.clamp(qmin - zero_point, qmax - zero_point)
        mask = q.eq_(y)
        y.mul_(scale)
        ctx.grad_factor = grad_factor
        lsq = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if lsq else None, y if lsq else None, inv if lsq else None, mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, inv, mask = ctx.saved_tensors
        gx = grad * mask
        gs = None
        if ctx.needs_input_grad[1]:
            # y / s = clamp(q) - zp: inside, minus x / s gives round(x/s) - x/s; outside it is the clipped end itself
            # (summed to the scale's shape: one per tensor, or one per row of a weight; ``inv`` is constant there)
            if inv.numel() == 1:  # per tensor: two dot products, no tensor the size of x allocated
                gs = (torch.dot(grad.reshape(-1), y.reshape(-1)) - torch.dot(gx.reshape(-1), x.reshape(-1)))
                gs = gs.reshape(inv.shape) * (inv * ctx.grad_factor)
            else:
                gs = (gx.mul(x).neg_().add_(grad * y)).sum_to_size(inv.shape) * (inv * ctx.grad_factor)
        return gx, gs, None, None, None, None


class ActivationFakeQuant(FakeQuantizer):
    """Per-tensor fake quantization on the uint8 grid ``[qmin, qmax]`` (``scheme``: symmetric, power of two).

    The range is observed (running min/max, then an exponential moving average) while ``observing``; the fake-quant
    is the straight-through estimator (``torch.fake_quantize_per_tensor_affine``: gradient 1 inside the range, 0
    outside). ``learnable`` (LSQ): the scale is a parameter, initialised from the range observed on the first batch,
    and trained by LSQ's gradient (``_PerTensorSTE``, values and gradients as
    ``torch._fake_quantize_learnable_per_tensor_affine``); the zero point stays where the observed range put it."""

    applies_to = "activation"
    momentum = 0.01

    def __init__(self, qmin: int = 0, qmax: int = 255, scheme: Scheme | None = None, learnable: bool = False):
        super().__init__()
        self.qmin, self.qmax, self.scheme, self.learnable = qmin, qmax, scheme, learnable
        self.observing = True
        self.register_buffer("seen", torch.tensor(0, dtype=torch.long))
        self._seen: int | None = 0  # mirrors ``seen`` (None: not read since a state_dict was loaded)
        self.register_buffer("zero_point", torch.tensor([0.0]))  # 1-element: what the LSQ op takes
        if learnable:
            self.scale = nn.Parameter(torch.tensor([1.0]))
        else:
            self.register_buffer("scale", torch.tensor([1.0]))

    def observe(self, x: torch.Tensor) -> None:
        """Update the range and (unless learned) the scale and zero point, in tensor ops only: no device sync, which
        would cost a training step more than the fake-quant itself on a small model."""
        lo, hi = torch.aminmax(x.detach().float())
        if torch.compiler.is_compiling():
            # the count stays in the buffer (a Python int would be a recompile per step); the first batch selected
            # in tensor ops (prepare_qat has observed one already, so LSQ's scale is initialised)
            first, m = self.seen == 0, self.momentum
            self.min_val.copy_(torch.where(first, lo, self.min_val * (1 - m) + m * lo))
            self.max_val.copy_(torch.where(first, hi, self.max_val * (1 - m) + m * hi))
            if not self.learnable:
                self._set_params()
            self.seen += 1
            self._seen = None
            return
        first = self._seen == 0 if self._seen is not None else int(self.seen) == 0
        if first:
            self.min_val.copy_(lo), self.max_val.copy_(hi)
        else:
            m = self.momentum
            self.min_val.mul_(1 - m).add_(m * lo)
            self.max_val.mul_(1 - m).add_(m * hi)
        if not self.learnable or first:
            self._set_params()
        self.seen += 1
        self._seen = (self._seen if self._seen is not None else int(self.seen) - 1) + 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None  # read from the loaded buffer when next needed

    def _set_params(self) -> None:
        """``schemes.activation_range_params`` in tensor ops (float32)."""
        scheme = self.scheme or SCHEMES["uint8"]
        qmin, qmax = self.qmin, self.qmax
        lo, hi = self.min_val.clamp(max=0.0), self.max_val.clamp(min=0.0)
        with torch.no_grad():
            if scheme.symmetric:
                zp = torch.full_like(lo, float((qmin + qmax + 1) // 2))
                scale = torch.maximum(torch.maximum(-lo, hi) / (qmax - zp), -lo / (zp - qmin)).clamp_min(1e-8)
            else:
                scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
            if scheme.pow2:
                scale = pow2_up(scale)
            if not scheme.symmetric:
                zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
            self.scale.copy_(scale.reshape(1))
            self.zero_point.copy_(zp.reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        cpu = xf.device.type == "cpu"
        # the fused STE / LSQ below: in training; for LSQ always (ATen's learnable fake-quant has no fake-tensor
        # kernel, a torch.compile break); on the CPU always, also for an edge no gradient reaches (the model's input):
        # ATen's CPU fake-quant took 88-155 ms per 1M elements on this machine, the fused one 0.7 ms
        if self.learnable or cpu or (torch.is_grad_enabled() and xf.requires_grad):
            scale = self.scale.abs().clamp_min(1e-8) if self.learnable else self.scale
            grad = 1.0 / math.sqrt(max(x.numel(), 1) * self.qmax)
            # on the CPU the zero point as a number: a clamp to tensor bounds took 7x a clamp to numbers (0.7 vs
            # 0.09 ms per 1M elements); elsewhere, and compiled, a tensor (reading it would be a device sync / break)
            zp = self.zero_point
            if cpu and not torch.compiler.is_compiling():
                zp = float(zp)
            return _PerTensorSTE.apply(xf, scale, zp, self.qmin, self.qmax, grad).to(x.dtype)
        y = torch.fake_quantize_per_tensor_affine(xf, self.scale, self.zero_point.to(torch.int32), self.qmin,
                                                  self.qmax)
        return y.to(x.dtype)

    def grid(self, x=None) -> Grid:
        bits = int(round(math.log2(self.qmax - self.qmin + 1)))
        return Grid(bits, float(self.scale.detach().abs().clamp_min(1e-8)), int(self.zero_point), signed=False)

    def extra_repr(self) -> str:
        return (f"{'LSQ, ' if self.learnable else ''}{self.scheme.name if self.scheme else 'uint8'}, "
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}")


class WeightFakeQuant(FakeQuantizer):
    """Per-channel (or per-group) symmetric fake quantization of a weight, ints in ``[-qmax, qmax]``.

    Scales follow the weight (``max|w| / qmax`` per row, a power of two for ``pow2``) and the gradient reaches the
    weight by the straight-through estimator; ``learnable`` (LSQ): one scale parameter per row, initialised from
    the first weight seen and trained with LSQ's gradient. Grouped (``group_size``): the groups' values are then
    re-rounded onto the per-channel int8 grid the kernels take, as convert does (``grid()`` declares that grid)."""

    applies_to = "weight"

    def __init__(self, scheme: Scheme, qmax: int, group_size: int | None = None, learnable: bool = False):
        super().__init__()
        self.scheme, self.qmax, self.group_size, self.learnable = scheme, int(qmax), group_size, learnable
        self.bits = int(math.log2(qmax + 1)) + 1
        self.scale = nn.Parameter(torch.empty(0)) if learnable else None

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.reshape(w.shape[0], -1)
        return rows.reshape(-1, self.group_size) if self.group_size else rows

    def _scales(self, rows: torch.Tensor) -> torch.Tensor:
        scale = (rows.detach().abs().amax(dim=1).float() / self.qmax).clamp_min(1e-12)
        return pow2_up(scale) if self.scheme.pow2 else scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        rows = self._rows(w).float()
        if self.learnable:
            if self.scale.numel() == 0:
                with torch.no_grad():
                    self.scale = nn.Parameter(self._scales(rows))
            # the fused STE / LSQ (one scale per row): ATen's learnable per-channel backward has no inductor lowering
            grad = 1.0 / math.sqrt(rows.shape[1] * self.qmax)
            y = _PerTensorSTE.apply(rows, self.scale.abs().clamp_min(1e-12).unsqueeze(1), 0.0, -self.qmax, self.qmax,
                                    grad)
        else:  # the same STE with a constant scale per row (ATen's per-channel kernel: 0.38 vs 0.05 ms per 74k weights)
            y = _PerTensorSTE.apply(rows, self._scales(rows).unsqueeze(1), 0.0, -self.qmax, self.qmax, 1.0)
        if self.group_size:
            # the int8 kernels take one scale per channel, so convert re-rounds grouped weights onto the per-channel
            # int8 grid (convert.scheme_weight): train on that very grid (STE), so the converted model computes what
            # was trained (converted vs QAT simulation, digits CNN: 44-46 dB with the re-rounding left to convert)
            y = self._kernel_grid(y.reshape(w.shape[0], -1))
        return y.reshape(w.shape).to(w.dtype)

    @staticmethod
    def _int8_scales(channels: torch.Tensor) -> torch.Tensor:
        """``observers.weight_scales(y, 127)``: what convert quantizes a grouped weight's channels with."""
        return (channels.detach().abs().amax(dim=1).float() / 127).clamp_min(1e-12)

    def _kernel_grid(self, channels: torch.Tensor) -> torch.Tensor:
        return _PerTensorSTE.apply(channels, self._int8_scales(channels).unsqueeze(1), 0.0, -127, 127, 1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "scale"
        if self.learnable and key in state_dict and state_dict[key].shape != self.scale.shape:
            self.scale = nn.Parameter(torch.empty_like(state_dict[key]))  # LSQ scales made on the first forward
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def grid(self, w: torch.Tensor | None = None) -> Grid:
        if self.group_size:  # the output is on the per-channel int8 grid (forward re-rounds the groups onto it)
            with torch.no_grad():
                y = self(w)
            return Grid(8, self._int8_scales(y.reshape(y.shape[0], -1).float()), 0, signed=True)
        if self.learnable and self.scale.numel():
            scale = self.scale.detach().abs().clamp_min(1e-12)
        else:
            scale = self._scales(self._rows(w))
        return Grid(self.bits, scale, 0, signed=True)

    def extra_repr(self) -> str:
        return (f"{'LSQ, ' if self.learnable else ''}{self.scheme.name}, ints in [-{self.qmax}, {self.qmax}]"
                + (f", groups of {self.group_size}" if self.group_size else ""))


# ------------------------------------------------------------------------------------------------
# a quantizer on a graph edge
# ------------------------------------------------------------------------------------------------
from .observers import Observer, QParams  # noqa: E402  (below the quantizers it holds)


class QuantizerPoint(Observer):
    """An observer point that holds a ``FakeQuantizer`` (``fq``): where the config names a registered quantizer for
    activations (PTQ), and on every edge of a QAT model (``qcast.prepare_qat``).

    While ``observing``, each batch goes to ``fq.observe`` (calibration, or QAT's steps before the observers are
    frozen). ``active``: the edge is fake-quantized by ``fq`` (QAT and ``simulate``); inactive it passes tensors
    through like any observer (PTQ calibration). ``qparams()``: the grid ``fq`` declares, on the uint8 grid the int8
    kernels read (a signed grid shifted by 128), what convert's QDQ point gets."""

    estimator = "quantizer"
    #: the first calls of each point check the quantizer's output (shape, dtype, finiteness, gradient path)
    CHECKED_CALLS = 2

    def __init__(self, name: str, fq: FakeQuantizer, qmax: int = 255):
        super().__init__(name=name, qmax=qmax)
        self.fq = fq
        self.active = False
        self.observing = True
        self.checked = 0
        self.grad_checked = False

    def forward(self, x):
        if Observer.bypass or not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
            return x
        if self.observing and (self.training or not self.active):
            self.fq.observe(x)
            if not torch.compiler.is_compiling():  # an int attribute: a recompile per count (prepare_qat counted)
                self.batches += 1
        if not self.active:
            return x
        y = self.fq(x)
        if torch.compiler.is_compiling():  # checked eagerly by prepare_qat / calibration (a graph break, a sync)
            return y
        need_grad = self.training and torch.is_grad_enabled() and x.requires_grad
        if self.checked < self.CHECKED_CALLS or (need_grad and not self.grad_checked):
            check_output(self.fq, x, y, self.name, need_grad=need_grad)
            self.checked += 1
            self.grad_checked = self.grad_checked or need_grad
        return y

    @property
    def calibrated(self) -> bool:
        return self.batches > 0

    def qparams(self) -> QParams:
        name = self.fq.scheme_name or type(self.fq).__name__
        g = self.fq.grid(None)
        if g is None:
            raise QcastError(f"{self.name}: quantizer {name!r} declares no grid (grid() returned None), so its edge "
                             "cannot run on int8 kernels; declare the grid, or let the layer be simulated")
        if isinstance(g.scale, torch.Tensor) and g.scale.numel() != 1:
            raise QcastError(f"{self.name}: activation quantizer {name!r} declares {g.scale.numel()} scales; an "
                             "activation grid has one scale and one zero point (per tensor)")
        scale, zp = float(g.scale), int(g.zero_point)
        shift = 2 ** (g.bits - 1) if g.signed else 0
        qmin, qmax = g.qmin + shift, g.qmax + shift
        if g.bits > 8 or qmax > self.qmax or not scale > 0 or not math.isfinite(scale):
            raise QcastError(f"{self.name}: quantizer {name!r} declares {g!r} (scale {scale}), which the int8 kernels "
                             f"cannot take here (at most {self.qmax + 1} levels, a positive finite scale)")
        return QParams(scale=scale, zero_point=zp + shift, qmin=qmin, qmax=qmax)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {'active' if self.active else 'observing'}, batches={self.batches}"
