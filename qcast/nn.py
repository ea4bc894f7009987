"""qcast's float building blocks: what fusion passes put into the graph before quantization.

A fused module computes exactly what the float pattern computed (so calibration sees float behaviour)
and tells the kernel registry what it is through ``qcast_op`` and ``qcast_fused``. ``masked_softmax``: the op a
decomposed ``scaled_dot_product_attention`` calls for its mask (``passes/decompose_sdpa.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    None: None,
    "relu": F.relu,
    "relu6": F.relu6,
}

_BASE_OP = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d", nn.Linear: "linear"}


def base_op(conv: nn.Module) -> str:
    """``conv1d`` / ``conv2d`` / ``linear`` for a conv/linear layer, subclasses included."""
    for cls, op in _BASE_OP.items():
        if isinstance(conv, cls):
            return op
    raise TypeError(f"{type(conv).__name__} is not a Conv1d, Conv2d, Conv3d or Linear layer; it cannot be fused")


class FusedConv(nn.Module):
    """``act(conv(x) [+ other])`` for a conv/linear whose BatchNorm is already folded in.

    Attributes: ``conv`` (the folded nn.Conv1d/Conv2d/Linear), ``act`` (None, ``relu`` or ``relu6``),
    ``add`` (whether a residual tensor is added before the activation).
    """

    qcast_leaf = True

    def __init__(self, conv: nn.Module, act: str | None = None, add: bool = False):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported fused activation {act!r}")
        self.conv = conv
        self.act = act
        self.add = add
        self.qcast_op = base_op(conv)

    @property
    def qcast_fused(self) -> tuple[str, ...]:
        return (("add",) if self.add else ()) + ((self.act,) if self.act else ())

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        if self.add:
            y = y + other
        fn = ACTIVATIONS[self.act]
        return fn(y) if fn is not None else y

    def extra_repr(self) -> str:
        return f"fused={'+'.join(self.qcast_fused) or 'none'}"


class FusedBatchNorm(nn.Module):
    """``relu(bn(x))`` for a BatchNorm that could not be folded into a conv (pre-activation blocks: BN -> ReLU ->
    conv). One int8 op whose output params are calibrated on the relu's output, not on the signed BN output."""

    qcast_leaf = True
    qcast_op = "batch_norm"
    qcast_fused = ("relu",)

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(x))


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b): an add followed by a relu, fused by ``passes.fuse`` into one int8 kernel."""
    return torch.relu(a + b)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                   inplace: bool = False) -> torch.Tensor:
    """``softmax(scores + mask, -1)`` as ``F.scaled_dot_product_attention`` applies its mask: a float mask is added,
    a bool mask keeps the True positions (``-inf`` elsewhere), ``causal`` keeps keys ``<= `` the query's position.
    ``inplace``: ``scores`` is a temporary that may be overwritten."""
    if causal:
        L, S = scores.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    elif mask is not None:
        if mask.dtype == torch.bool:  # an additive mask is ~10x cheaper than masked_fill on the larger scores
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
                mask.logical_not(), float("-inf"))
        scores = scores.add_(mask) if inplace and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape \
            else scores + mask
    return torch.softmax(scores, dim=-1)
