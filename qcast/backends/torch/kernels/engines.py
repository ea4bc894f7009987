"""PyTorch's int8 engines and how qcast picks one per layer without touching global state.

``quantized::conv2d`` / ``quantized::linear`` dispatch on the packed-weight object, not on the global
``torch.backends.quantized.engine``: weights packed under onednn run onednn kernels whatever the global
setting is at call time. So qcast packs each layer under the engine chosen for it (``engine_scope``
restores the global setting) and never changes the process-wide engine.

Accuracy first: onednn takes full-range 8-bit activations (u8 x s8 without int16 saturation);
x86/fbgemm saturate with full range and need ``reduce_range`` (7-bit activations), which costs accuracy.
So ``auto`` means onednn wherever its kernel accepts the layer, else x86 with 7-bit inputs.
"""
from __future__ import annotations

import contextlib

import torch

REDUCE_RANGE = {"onednn": False, "x86": True, "fbgemm": True, "qnnpack": False}


def available() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


@contextlib.contextmanager
def engine_scope(engine: str):
    """Temporarily set the global quantized engine (e.g. while packing weights); always restored."""
    old = torch.backends.quantized.engine
    if engine not in available():
        raise RuntimeError(f"int8 engine {engine!r} is not available in this PyTorch build ({available()})")
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def auto_order() -> list[str]:
    order = [e for e in ("onednn", "x86", "fbgemm", "qnnpack") if e in available()]
    return order
