"""Quantization schemes by name: what ``QuantConfig(weight=..., activation=...)`` accepts.

A scheme is a frozen ``Scheme`` (the grid it puts a tensor on: bits, signedness, symmetric or affine, per channel,
group size, power-of-two scales), or a user's ``qcast.FakeQuantizer`` subclass registered with
``@qcast.register_quantizer("name")`` (``qcast/quantizers.py``). Both live in one registry, ``SCHEMES``, filled by
``register_scheme`` (a decorator on a function returning the scheme, so built-ins and users' schemes are declared
the same way).

Every built-in runs on the int8 kernels: activations are always stored as uint8 (a symmetric grid is the uint8 grid
with zero point 128, which is the int8 grid shifted), and weights as per-channel symmetric int8, fewer-bit or
power-of-two weights on their own grid inside it (``explain()`` says so on each layer).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Scheme:
    """A named grid. ``applies_to``: ``"weight"``, ``"activation"`` or ``"both"``.

    Attributes:
        bits: integer width of the grid (weights: ints in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``).
        symmetric: zero point 0 (activations: the uint8 grid centred at 128).
        pow2: scales rounded up to a power of two (shift-only rescaling in fixed-point hardware).
        group_size: weights only: one scale per ``group_size`` consecutive inputs of an output channel (None: one
            per channel). Stored re-rounded onto the per-channel int8 grid for the int8 kernels.
        quantizer: a registered ``FakeQuantizer`` subclass (a custom scheme), else None.
    """

    name: str
    applies_to: str = "both"
    bits: int = 8
    symmetric: bool = False
    pow2: bool = False
    group_size: int | None = None
    quantizer: type | None = None
    doc: str = ""

    def __repr__(self) -> str:
        if self.quantizer is not None:
            return f"Scheme({self.name!r}, custom {self.quantizer.__qualname__})"
        parts = [f"{self.bits}-bit", "symmetric" if self.symmetric else "affine"]
        if self.pow2:
            parts.append("power-of-two scales")
        if self.group_size:
            parts.append(f"groups of {self.group_size}")
        return f"Scheme({self.name!r}, {self.applies_to}: {', '.join(parts)})"

    @property
    def custom(self) -> bool:
        return self.quantizer is not None

    def weight_qmax(self) -> int:
        """Largest int of this scheme's symmetric weight grid (127 at 8 bits, 7 at 4 bits)."""
        return 2 ** (self.bits - 1) - 1


#: name -> Scheme: built-ins and registered ones (``register_scheme``, ``qcast.register_quantizer``)
SCHEMES: dict[str, Scheme] = {}
#: activation settings that are not schemes but modes of the existing pipeline (config.ACTIVATION_SCHEMES)
ACTIVATION_MODES = ("auto", "float", "dynamic")


def register_scheme(name: str) -> Callable:
    """Decorator on a function returning a ``Scheme`` (called once, registered under ``name``)."""
    def deco(fn: Callable[[], Scheme]):
        scheme = fn()
        if not isinstance(scheme, Scheme) or scheme.name != name:
            raise ConfigError(f"register_scheme({name!r}): the function must return a Scheme named {name!r}")
        SCHEMES[name] = scheme
        return fn
    return deco


@register_scheme("int8")
def _int8() -> Scheme:
    return Scheme("int8", "both", 8, doc="weights per-channel symmetric int8; activations uint8 affine (default)")


@register_scheme("uint8")
def _uint8() -> Scheme:
    return Scheme("uint8", "activation", 8, doc="activations uint8 affine, calibrated range (what 'int8' means for "
                                                 "activations)")


@register_scheme("int8_sym")
def _int8_sym() -> Scheme:
    return Scheme("int8_sym", "activation", 8, symmetric=True,
                  doc="symmetric activations, zero point 0 (what TensorRT requires)")


@register_scheme("int4")
def _int4() -> Scheme:
    return Scheme("int4", "weight", 4, symmetric=True,
                  doc="weights per-channel symmetric 4-bit (QuantConfig.weight_group_size: per group), stored in int8")


@register_scheme("pow2")
def _pow2() -> Scheme:
    return Scheme("pow2", "both", 8, symmetric=False, pow2=True, doc="power-of-two scales (8-bit grid)")


def known(kind: str) -> list[str]:
    """The names ``kind`` (``"weight"`` / ``"activation"``) accepts, activation modes included."""
    names = [n for n, s in SCHEMES.items() if s.applies_to in (kind, "both")]
    return (list(ACTIVATION_MODES) + names) if kind == "activation" else names


def check_name(field: str, value, kind: str) -> None:
    """ConfigError unless ``value`` is a scheme ``kind`` accepts: the known names, the close match, and where a
    name is a scheme for the other kind, that."""
    allowed = known(kind)
    if value in allowed:
        return
    hint = ""
    if isinstance(value, str):
        other = SCHEMES.get(value)
        if other is not None:
            hint = f"; {value!r} is an {other.applies_to} scheme, not a {kind} one" if other.applies_to == "activation" else f"; {value!r} is a {other.applies_to} scheme, not an {kind} one"
        else:
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            digits = value.lstrip("iunt")
            if kind == "weight" and digits.isdigit() and digits not in ("8", "4"):
                hint += f"; for {digits}-bit weights use weight_bits={digits} (stored in int8)"
    raise ConfigError(f"QuantConfig.{field}={value!r} is not one of {allowed}{hint} (other schemes can be registered "
                      "with @qcast.register_quantizer)")


def get(name: str) -> Scheme:
    return SCHEMES[name]


# ------------------------------------------------------------------------------------------------
# the grids of the built-in schemes
# ------------------------------------------------------------------------------------------------
def pow2_up(scale: float | torch.Tensor):
    """The smallest power of two >= ``scale`` (so the range still covers what was calibrated)."""
    if isinstance(scale, torch.Tensor):
        return torch.exp2(torch.ceil(torch.log2(scale.clamp_min(1e-30))))
    return 2.0 ** math.ceil(math.log2(max(scale, 1e-30)))


def activation_range_params(scheme: Scheme, lo: float, hi: float, qmin: int, qmax: int) -> tuple[float, int]:
    """``(scale, zero_point)`` on the uint8 grid ``[qmin, qmax]`` covering ``[lo, hi]`` under ``scheme``.

    Symmetric: zero point at the middle of the grid (128 for the full uint8 grid, which is int8 with zero point 0),
    scale ``max|x| / (qmax - zp)``. Power of two: the affine scale rounded up to a power of two, the zero point
    recomputed for it (clamped to the grid)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if scheme.symmetric:
        zp = (qmin + qmax + 1) // 2
        amax = max(-lo, hi)
        scale = max(amax / (qmax - zp), -lo / (zp - qmin) if zp > qmin else 0.0, 1e-8)
    else:
        scale = max((hi - lo) / (qmax - qmin), 1e-8)
        zp = None
    if scheme.pow2:
        scale = pow2_up(scale)
    if zp is None:
        zp = max(qmin, min(qmax, int(round(qmin - lo / scale))))
    return float(scale), int(zp)


def weight_grid(w: torch.Tensor, scheme: Scheme, qmax: int, group_size: int | None = None, where: str = ""
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake-quantized weight, per-row scales)`` of ``w`` (output channel first) on ``scheme``'s symmetric grid
    with ints in ``[-qmax, qmax]``: one scale per output channel, or per ``group_size`` consecutive inputs."""
    w = w.detach().float()
    rows = w.reshape(w.shape[0], -1)
    if group_size:
        if rows.shape[1] % group_size:
            raise ConfigError(f"{where or 'a layer'}: weight_group_size={group_size} does not divide its {rows.shape[1]} "
                              "inputs per output channel; pick a divisor, or set weight_group_size for this layer "
                              "through per_layer (None: one scale per channel)")
        rows = rows.reshape(-1, group_size)
    scale = (rows.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    if scheme.pow2:
        scale = pow2_up(scale)
    q = torch.clamp(torch.round(rows / scale[:, None]), -qmax, qmax)
    return (q * scale[:, None]).reshape(w.shape), scale
