"""Is the int8 model faster than the float one? Measured on a calibration input when ``quantize`` finishes.

int8 kernels pay a per-call overhead (~30-40 µs per quantized op on PyTorch's engines, docs/design.md) that small
inputs do not amortize: an attention block at (1, 16, 128) runs at 0.35-0.4x the speed of float. A user who
quantizes for speed must hear it from qcast, with the figures and what to try, not find it in production.

The two models are timed interleaved (float, int8, float, ...) on the same input and compared by their fastest
call, the estimate least disturbed by other work on the machine; the measurement is bounded in time.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.nn as nn

from ..timing import time_interleaved


class SlowerThanFloatWarning(UserWarning):
    """The quantized model ran slower than the float model on the calibration input."""


@dataclass(frozen=True)
class SpeedCheck:
    """Latency of the float and the int8 model on one input (fastest of ``repeats`` interleaved calls each)."""

    float_ms: float
    int8_ms: float
    repeats: int
    input: str

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"float_ms": self.float_ms, "int8_ms": self.int8_ms, "repeats": self.repeats, "input": self.input,
                "speedup": self.speedup}

    def __repr__(self) -> str:
        return (f"SpeedCheck(float {self.float_ms:.3f} ms, int8 {self.int8_ms:.3f} ms, {self.speedup:.2f}x, "
                f"{self.input}, fastest of {self.repeats})")


#: int8 slower than float by more than this fraction is reported (below it, timing noise on a busy machine)
TOLERANCE = 0.05


def speed_check(model: nn.Module, qmodel: nn.Module, args: tuple, kwargs: dict, described: str) -> SpeedCheck:
    """Time ``model`` and ``qmodel`` interleaved on one call."""
    best, repeats = time_interleaved({"float": model, "int8": qmodel}, args, kwargs)
    return SpeedCheck(best["float"], best["int8"], repeats, described)


def warn_if_slower(check: SpeedCheck) -> None:
    if check.int8_ms <= check.float_ms * (1.0 + TOLERANCE):
        return
    warnings.warn(
        f"the int8 model is slower than the float model on the calibration input {check.input}: "
        f"{check.int8_ms:.3f} ms vs {check.float_ms:.3f} ms ({check.speedup:.2f}x, fastest of {check.repeats} "
        "interleaved calls each). Each int8 op costs a fixed ~30-40 µs per call, which a small input does not "
        "amortize. What to try: a larger batch or input; qcast.explain(qmodel) to find float ops between int8 ones "
        "(each boundary costs a quantize/dequantize); QuantConfig(skip=[...]) for the smallest layers; or keep this "
        "model in float at this size. Figures in qmodel.qcast_meta['speed'].", SlowerThanFloatWarning, stacklevel=3)
