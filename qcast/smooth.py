"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models"): move the activation outliers of an int8 linear into its weights.

A transformer's linear inputs have a few *outlier channels* (on the real all-MiniLM-L6-v2, the GELU output feeding
``encoder.layer.0.output.dense`` has one channel with max |x| = 24.6 against a median of 0.94). A per-tensor int8 step
sized for that channel rounds every other channel to a handful of levels. Since ``x W^T = (x / s) (W diag(s))^T`` for
any positive per-input-channel ``s``, dividing channel ``j`` of the input by ``s_j`` and multiplying column ``j`` of the
weight by it keeps the float function and moves the difficulty from the activation (per-tensor int8) to the weight
(per-*output*-channel int8, which absorbs a larger column well). The paper's choice, with migration strength ``alpha``:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

How qcast does it:

* ``qcast.passes.smooth`` (prepare time, after ``fuse``) puts a ``Smooth`` module in front of each candidate int8
  linear: ``x -> Smooth(inv_s) -> linear``. ``Smooth`` computes ``x * inv_s`` in float (``inv_s`` all ones until
  calibrated); the plan keeps it float, so the linear's input observer sits after it and sees the smoothed tensor.
  In a post-LN model (BERT) the tensor before the linear also feeds the residual add, so ``1/s`` cannot be folded
  into the LayerNorm before it; the float multiply is what makes the method general.
* ``qcast.calibrate()`` resolves the scales (``migrate``): a first pass over the (materialized) calibration data with
  observers bypassed records the per-channel max |x| at each ``Smooth``; then each linear with outlier channels gets
  ``s`` (its weight columns multiplied in place: the graph is qcast's private copy, never the user's model) and
  ``inv_s = 1/s``; a linear whose input has no outlier channel keeps ``s = 1`` and its ``Smooth`` node is removed
  (max/median of the per-channel max |x| under ``OUTLIER_RATIO``); then the normal calibration pass runs.
* convert keeps each remaining ``Smooth`` as a float op; lowering quantizes after it, before the int8 linear. A
  per-token dynamic linear (``activation="auto"`` on token sequences) has no input observer: its run-time row scale
  is simply taken on the smoothed row, where one outlier channel no longer sets the step of the whole token.

The summary (``SmoothQuant``) goes to ``qmodel.qcast_meta["smoothquant"]``. Measured figures and the default:
docs/design.md ("SmoothQuant").
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

#: a linear is smoothed when the max/median ratio of its input's per-channel max |x| (first calibration pass) is at
#: least this; below it the input has no outlier channel and the linear is left alone (s = 1, node removed).
#: Chosen by measurement (docs/design.md, "SmoothQuant").
OUTLIER_RATIO = 5.0
#: the alpha of ``QuantConfig(smoothquant="auto")``, which smooths only linears on token sequences (inputs of 3+ dims).
#: Chosen by measurement (docs/design.md, "SmoothQuant").
AUTO_ALPHA = 0.5
#: s is clamped to [1 / SCALE_CLAMP, SCALE_CLAMP] (a dead channel, max |x| = 0, would otherwise get s -> 0)
SCALE_CLAMP = 1e4
_EPS = 1e-5  # floor of max |x| and max |w| in the formula (the paper's code uses the same)


class Smooth(nn.Module):
    """``x * inv_s`` over the last dimension, in float: SmoothQuant's per-channel division of a linear's input.

    ``inv_s`` (a buffer, ones until ``qcast.calibrate()`` resolves it) is ``1 / s``; the linear after it has its
    weight columns multiplied by ``s``. ``alpha`` is the migration strength, ``layer`` the display name of that
    linear, ``target`` its module path. While ``recording`` (the first calibration pass) it keeps the per-channel
    max |x| it sees in ``absmax``.
    """

    qcast_leaf = True
    qcast_op = "smooth"

    def __init__(self, channels: int, alpha: float, layer: str = "", target: str = "", inv_s: torch.Tensor | None = None):
        super().__init__()
        self.alpha = float(alpha)
        self.layer = layer
        self.target = target
        self.register_buffer("inv_s", torch.ones(channels) if inv_s is None else inv_s.detach().float().clone())
        self.resolved = inv_s is not None
        self.recording = False
        self.absmax: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording and x.numel():
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        return x * self.inv_s.to(x.dtype)

    # save/load (qcast.serialize): JSON config + tensors, no pickle
    def spec(self) -> tuple[dict, dict]:
        return {"alpha": self.alpha, "layer": self.layer, "target": self.target}, {"inv_s": self.inv_s}

    @classmethod
    def from_spec(cls, config: dict, tensors: dict) -> "Smooth":
        inv_s = tensors["inv_s"]
        return cls(inv_s.numel(), config["alpha"], config.get("layer", ""), config.get("target", ""), inv_s=inv_s)

    def extra_repr(self) -> str:
        state = "resolved" if self.resolved else "not calibrated"
        return f"{self.inv_s.numel()}, alpha={self.alpha}, layer={self.layer!r}, {state}"


@dataclass(frozen=True)
class SmoothedLayer:
    """What calibration decided for one linear: ``ratio`` is the max/median of its input's per-channel max |x|;
    ``smoothed`` False with ``reason`` when it was left alone; ``s_min``/``s_max`` the range of its scales."""

    layer: str
    alpha: float
    ratio: float
    smoothed: bool
    s_min: float = 1.0
    s_max: float = 1.0
    reason: str = ""

    def __repr__(self) -> str:
        what = f"s in [{self.s_min:.3g}, {self.s_max:.3g}]" if self.smoothed else f"left alone: {self.reason}"
        return f"SmoothedLayer({self.layer}, alpha={self.alpha}, max/median={self.ratio:.3g}, {what})"


@dataclass(frozen=True)
class SmoothQuant:
    """The layers SmoothQuant smoothed or left alone in one calibration (``qmodel.qcast_meta["smoothquant"]`` holds
    ``summary()``)."""

    layers: tuple[SmoothedLayer, ...] = ()
    outlier_ratio: float = OUTLIER_RATIO

    def summary(self) -> dict:
        return {"smoothed": sum(r.smoothed for r in self.layers), "left_alone": sum(not r.smoothed for r in self.layers),
                "outlier_ratio": self.outlier_ratio,
                "layers": [{"layer": r.layer, "alpha": r.alpha, "ratio": _finite(r.ratio), "smoothed": r.smoothed,
                            "s_min": r.s_min, "s_max": r.s_max, "reason": r.reason} for r in self.layers]}

    def __repr__(self) -> str:
        s = self.summary()
        return f"SmoothQuant({s['smoothed']} smoothed, {s['left_alone']} left alone)"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -------------------------------------------------------------------------------------------------
# the scales
# -------------------------------------------------------------------------------------------------
def outlier_ratio(absmax: torch.Tensor) -> float:
    """max / median of the per-channel max |x| (inf when the median channel is zero but some channel is not)."""
    med, top = float(absmax.median()), float(absmax.max())
    if top <= 0:
        return 1.0
    return top / med if med > 0 else math.inf


def smooth_scales(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (float64), clamped to ``[1/SCALE_CLAMP, SCALE_CLAMP]``."""
    x = absmax.double().clamp_min(_EPS)
    w = weight.detach().abs().amax(0).double().clamp_min(_EPS)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(1.0 / SCALE_CLAMP, SCALE_CLAMP)


# -------------------------------------------------------------------------------------------------
# calibration: resolve the scales
# -------------------------------------------------------------------------------------------------
def smooth_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, Smooth]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, Smooth):
                out.append((n, m))
    return out


def unresolved(observed) -> list[tuple[fx.Node, Smooth]]:
    """The ``Smooth`` nodes of an ObservedModel whose scales calibration has not chosen yet."""
    return [(n, m) for n, m in smooth_nodes(observed.gm) if not m.resolved]


@contextlib.contextmanager
def _recording(smooths: list[Smooth]):
    for m in smooths:
        m.recording, m.absmax = True, None
    try:
        yield
    finally:
        for m in smooths:
            m.recording = False


def _linear(gm: fx.GraphModule, target: str) -> tuple[fx.Node | None, nn.Linear | None]:
    from .nn import FusedConv

    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target), None)
    if node is None:
        return None, None
    mod = gm.get_submodule(target)
    mod = mod.conv if isinstance(mod, FusedConv) else mod
    return node, mod if isinstance(mod, nn.Linear) else None


def migrate(observed, calls: list, run: Callable[[int, tuple, dict], None], progress: bool = False) -> SmoothQuant:
    """Choose the scales of every unresolved ``Smooth`` of ``observed`` (module docstring): one pass over ``calls``
    (``(args, kwargs)`` pairs, run by ``run(i, args, kwargs)``) with observers bypassed records each input's
    per-channel max |x|; linears with outlier channels get ``W[:, j] *= s_j`` and ``inv_s = 1/s``, the others lose
    their ``Smooth`` node. The result is stored on ``observed.gm.meta['qcast_smoothquant']``."""
    from .observers import observers_bypassed

    from .distributed import group

    pending = unresolved(observed)
    if not pending or (not calls and not group.active()):  # under a process group a rank with no data still reduces
        return observed.gm.meta.get("qcast_smoothquant", SmoothQuant())
    bar = None
    if progress and group.is_main():
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(calls), desc="qcast smoothquant", unit="batch", leave=False, file=sys.stderr)
        except ImportError:
            bar = None
    try:
        with group.collective("SmoothQuant's first calibration pass"), torch.no_grad(), observers_bypassed(), \
                _recording([m for _, m in pending]):
            for i, (args, kwargs) in enumerate(calls):
                run(i, args, kwargs)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    # under torch.distributed: each channel's max over every rank's shard, as one process would have recorded it
    for (_, sm), absmax in zip(pending, group.all_reduce_optional([sm.absmax for _, sm in pending], "max")):
        sm.absmax = absmax
    gm = observed.gm
    rows = []
    # linears reading the same tensor (a transformer's query/key/value) get one joint scale, the SmoothQuant paper's
    # choice: max |W| over all their weight columns. Their inputs stay one tensor, so per-token kernels can share
    # one GEMM (kernels/dynamic.py, fuse_siblings)
    siblings: dict[fx.Node, list[nn.Linear]] = {}
    for node, sm in pending:
        lin_node, lin = _linear(gm, sm.target)
        plan = lin_node.meta.get("qcast_plan") if lin_node is not None else None
        if lin is not None and plan is not None and plan.precision == "int8" and isinstance(node.args[0], fx.Node):
            siblings.setdefault(node.args[0], []).append(lin)
    joint: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for node, sm in pending:
            lin_node, lin = _linear(gm, sm.target)
            ratio = outlier_ratio(sm.absmax) if sm.absmax is not None else math.nan
            reason = ""
            plan = lin_node.meta.get("qcast_plan") if lin_node is not None else None
            if lin is None or plan is None or plan.precision != "int8":  # static int8, or per-token dynamic
                reason = "the linear runs in float"
            elif sm.absmax is None:
                reason = "not reached by the calibration data"
            elif not ratio >= OUTLIER_RATIO:
                reason = f"no outlier channel (max/median {ratio:.3g} < {OUTLIER_RATIO})"
            if reason:
                rows.append(SmoothedLayer(sm.layer, sm.alpha, ratio, False, reason=reason))
                _drop(gm, node)
                continue
            group = siblings.get(node.args[0], [lin])
            key = (node.args[0], sm.alpha)
            if key not in joint:  # before any sibling's columns are rescaled
                joint[key] = smooth_scales(sm.absmax, torch.cat([m.weight.detach() for m in group]), sm.alpha)
            s = joint[key]
            lin.weight.copy_((lin.weight.double() * s).to(lin.weight.dtype))
            sm.inv_s.copy_((1.0 / s).to(sm.inv_s.dtype))
            sm.resolved = True
            rows.append(SmoothedLayer(sm.layer, sm.alpha, ratio, True, float(s.min()), float(s.max())))
        for _, sm in pending:
            sm.absmax = None
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    result = SmoothQuant(tuple(rows))
    gm.meta["qcast_smoothquant"] = result
    return result


def _drop(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a ``Smooth`` node left at ``s = 1`` (before the normal calibration pass). Its input ``x`` takes its
    place. The linear's input observer (``x -> Smooth -> observer -> linear``) is kept on ``x`` when ``x`` is a float
    value nothing else observes, and removed when ``x`` is already an int8 value (its own observer's params serve the
    linear, as without smoothing)."""
    from .plan import is_int8
    from .prepare import _origin

    x = node.args[0]
    for user in list(node.users):
        if "qcast_observes" not in user.meta:
            user.replace_input_with(node, x)
            continue
        obs = gm.get_submodule(user.target)
        if isinstance(x, fx.Node) and ("qcast_observes" in x.meta or is_int8(x)):
            origin = _origin(x) if is_int8(x) else x
            own = origin if "qcast_observes" in origin.meta else next(
                (u for u in origin.users if "qcast_observes" in u.meta), None)
            if own is not None:  # a 7-bit (reduce_range) linear makes the value it reads 7-bit, as prepare does
                other = gm.get_submodule(own.target)
                other.qmax = min(other.qmax, obs.qmax)
            user.replace_all_uses_with(x)
            gm.graph.erase_node(user)
        else:
            user.args = (x,)
            user.meta["qcast_observes"] = x
            obs.name = x.meta.get("qcast_name", x.name) if isinstance(x, fx.Node) else obs.name
    gm.graph.erase_node(node)


def mirror(float_gm: fx.GraphModule, quantized_gm: nn.Module) -> int:
    """Give a float graph captured with the same config (``compare()``'s, whose ``Smooth`` nodes are identities) the
    scales of a quantized model's ``Smooth`` modules, matched by the linear they serve: same float function, and the
    float input of each smoothed linear is then the tensor its int8 kernel quantizes (compare's isolated SQNR).
    Returns how many were mirrored."""
    scales = {m.target: m.inv_s for m in quantized_gm.modules() if isinstance(m, Smooth)}
    # a per-token dynamic kernel applies its linear's scales itself (kernels/dynamic.py): it sits at the linear's path
    for path, m in quantized_gm.named_modules():
        if getattr(m, "input_scale", None) is not None:  # a stack of linears (query/key/value) shares its scales
            for target in getattr(m, "members", None) or [path]:
                scales.setdefault(target, m.input_scale)
    count = 0
    with torch.no_grad():
        for _, sm in smooth_nodes(float_gm):
            inv_s = scales.get(sm.target)
            _, lin = _linear(float_gm, sm.target)
            if inv_s is None or lin is None or inv_s.shape != sm.inv_s.shape:
                continue  # left alone at calibration (s = 1): the identity it already is
            sm.inv_s.copy_(inv_s)
            sm.resolved = True
            lin.weight.copy_((lin.weight.double() / inv_s.double()).to(lin.weight.dtype))
            count += 1
    return count
