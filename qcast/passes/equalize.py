"""Cross-layer equalization (CLE): rescale consecutive conv/linear layers so their per-channel weight ranges match.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction". For a pair

    A (conv1d|conv2d|linear) -> [ops that commute with a positive per-channel scale] -> B (conv1d|conv2d|linear)

where every value on the way feeds only the next op, ``f(x) / s == f(x / s)`` for ``s > 0`` lets channel ``i`` of A's
output be divided by ``s_i`` (A's weight row ``i`` and bias ``i``) and B's input channel ``i`` be multiplied by it
(B's weight column ``i``; for a grouped conv, column ``i % (C_in / groups)`` of the output rows of group
``i // (C_in / groups)``; for a depthwise conv, its own row) without changing the function. With ``r1_i`` the range
(max |w|) of A's output channel ``i`` and ``r2_i`` that of B's input channel ``i``, ``s_i = sqrt(r1_i * r2_i) / r2_i``
makes both ``sqrt(r1_i * r2_i)``. Chains (conv1x1 -> dw3x3 -> conv1x1, MobileNetV2) share layers between pairs, so
all pairs are swept until the scales stop moving (``TOLERANCE``, at most ``MAX_SWEEPS`` sweeps).

Ops allowed between A and B (positively homogeneous, per channel): relu, leaky_relu, max/avg pooling (adaptive too),
zero padding, interpolate, an unfolded eval-mode BatchNorm (its running mean and bias are divided by ``s``: exact),
a flatten of ``(N, C, 1, ...)`` into ``(N, C)`` (a conv feeding a linear through a global pool), ``contiguous``.
Spatial ops only where the channel axis is dim 1 (A a conv). ReLU6 does not commute (``relu6(z) / s != relu6(z / s)``
when the clip fires): ``RELU6`` says what is done with it (see its comment for the measurement behind the choice).

Skipped, with the reason in the returned ``Equalization.skipped``: a value on the way with several consumers, a
layer called at several places, a parameter shared with another module or read by a ``get_attr`` (tied weights:
rescaling it would change the other user), a layer the config keeps in float, mismatched channel counts.
The pass runs on qcast's private copy of the model (``prepare`` deep-copies it); the user's model is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import TensorMeta
from ..config import QuantConfig
from ._util import call_sites, finish

#: what a relu6 (or hardtanh(0, 6)) between A and B does to the pair:
#: ``"skip"``: the pair is not equalized (the float function is kept exactly);
#: ``"relu"``: the relu6 becomes a relu and the pair is equalized (AIMET's choice; changes the function wherever the
#: pre-activation exceeds 6).
#: "skip", by measurement (benchmarks/equalize.py, docs/design.md "Calibration"): on a MobileNetV2 trained on the
#: digits the clip fires on 0.003% of the values but in 8% of the channels, and relu6 -> relu alone leaves the float
#: model at 30.7 dB SQNR against the original, so the int8 model falls from 36.8 ("skip") to 30.5 dB; where the
#: clip never fires (zoo MobileNetV2, random weights) "relu" gains 0.8 dB over "skip" (42.6 vs 41.8 dB).
RELU6 = "skip"
RELU6_POLICIES = ("skip", "relu")
#: a sweep changes no scale by more than this relative amount -> converged
TOLERANCE = 1e-4
MAX_SWEEPS = 50

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class EqualizedPair:
    """One equalized pair: ``first`` -> ``through`` -> ``second`` (display names) and the range of the scales
    ``s`` its channels got (A's output channel divided by ``s``, B's input channel multiplied)."""

    first: str
    second: str
    through: tuple[str, ...]
    scale_min: float
    scale_max: float

    def __repr__(self) -> str:
        via = f" via {'+'.join(self.through)}" if self.through else ""
        return f"EqualizedPair({self.first} -> {self.second}{via}, s in [{self.scale_min:.3g}, {self.scale_max:.3g}])"


@dataclass(frozen=True)
class Equalization:
    """What ``equalize`` did: the pairs it rescaled, the pairs it left alone (``(first, second, reason)``) and
    how many sweeps the scales took to converge."""

    pairs: tuple[EqualizedPair, ...] = ()
    skipped: tuple[tuple[str, str, str], ...] = ()
    sweeps: int = 0
    relu6: str = RELU6
    relu6_replaced: tuple[str, ...] = field(default=())

    def summary(self) -> dict:
        """A JSON-friendly summary (what ``qmodel.qcast_meta["equalization"]`` holds)."""
        lo = min((p.scale_min for p in self.pairs), default=1.0)
        hi = max((p.scale_max for p in self.pairs), default=1.0)
        return {"pairs": len(self.pairs), "skipped": len(self.skipped), "sweeps": self.sweeps,
                "scale_min": float(lo), "scale_max": float(hi), "relu6": self.relu6,
                "relu6_replaced": len(self.relu6_replaced)}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Equalization({s['pairs']} pairs, {s['skipped']} skipped, {s['sweeps']} sweeps, "
                f"s in [{s['scale_min']:.3g}, {s['scale_max']:.3g}])")


@dataclass
class _Pair:
    a: fx.Node
    b: fx.Node
    through: list[fx.Node]
    bns: list[nn.Module]
    relu6: list[fx.Node]
    total: torch.Tensor | None = None  # accumulated scale per channel (float64)


# -------------------------------------------------------------------------------------------------
# which ops commute with a positive per-channel scale
# -------------------------------------------------------------------------------------------------
_RELU_FNS = (F.relu, torch.relu, torch.relu_)
_LEAKY_FNS = (F.leaky_relu,)
_POOL_FNS = (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
             F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
             torch.adaptive_avg_pool1d)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("qcast_val")
    return len(meta.shape) if isinstance(meta, TensorMeta) else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("qcast_val")
    return tuple(meta.shape) if isinstance(meta, TensorMeta) else None


def _is_relu6(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0))
    if node.op == "call_function":
        if node.target is F.relu6:
            return True
        if node.target is F.hardtanh:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return (lo, hi) == (0.0, 6.0)
    return False


def _extra_nodes(node: fx.Node) -> bool:
    """Whether ``node`` reads another graph value besides its first argument."""
    rest = list(node.args[1:]) + list(node.kwargs.values())
    found = []
    fx.map_arg(rest, lambda n: found.append(n))
    return bool(found)


def _step(node: fx.Node, src: fx.Node, axis: int, modules) -> tuple[str, int] | None:
    """If ``node`` applied to ``src`` commutes with a positive scale of channel ``axis``: (kind, axis after it)."""
    if not node.args or node.args[0] is not src or _extra_nodes(node):
        return None
    ndim = _ndim(src)
    spatial = axis == 1 and ndim is not None and ndim >= 3  # channels first, spatial dims after
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU or type(m) is nn.LeakyReLU:
            return "elementwise", axis
        if _is_relu6(node, modules):
            return "relu6", axis
        if isinstance(m, _POOL_MODULES) and spatial and not getattr(m, "return_indices", False):
            return "spatial", axis
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d)) and spatial:
            return "spatial", axis
        if isinstance(m, nn.Upsample) and spatial:
            return "spatial", axis
        if type(m) is nn.Flatten and axis == 1 and m.start_dim == 1 and m.end_dim == -1:
            return ("flatten", 1) if _flattens_channels(src) else None
        if (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and axis == 1 and m.track_running_stats
                and m.running_mean is not None and not m.training):
            return "batch_norm", axis
        return None
    if node.op == "call_function":
        t = node.target
        if t in _RELU_FNS or t in _LEAKY_FNS:
            return "elementwise", axis
        if _is_relu6(node, modules):
            return "relu6", axis
        if t in _POOL_FNS and spatial and not node.kwargs.get("return_indices", False):
            return "spatial", axis
        if t is F.interpolate and spatial:
            return "spatial", axis
        if t is F.pad and spatial:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
            if mode == "constant" and value in (None, 0, 0.0) and isinstance(pad, (tuple, list)) \
                    and len(pad) <= 2 * (ndim - 2):
                return "spatial", axis
            return None
        if t is torch.flatten and axis == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return ("flatten", 1) if start == 1 and end == -1 and _flattens_channels(src) else None
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_", "contiguous") and len(node.args) == 1 and not node.kwargs:
            return "elementwise", axis
        if node.target == "flatten" and axis == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return ("flatten", 1) if start == 1 and end == -1 and _flattens_channels(src) else None
    return None


def _flattens_channels(src: fx.Node) -> bool:
    """A flatten from dim 1 keeps channel ``i`` at feature ``i`` only when every dim after the channels is 1."""
    shape = _shape(src)
    return shape is not None and len(shape) >= 2 and all(d == 1 for d in shape[2:])


# -------------------------------------------------------------------------------------------------
# per-channel weight ranges and rescaling
# -------------------------------------------------------------------------------------------------
def _out_ranges(a: nn.Module) -> torch.Tensor:
    w = a.weight.detach().double()
    return w.reshape(w.shape[0], -1).abs().amax(dim=1)


def _in_ranges(b: nn.Module) -> torch.Tensor:
    w = b.weight.detach().double()
    if isinstance(b, nn.Linear):
        return w.abs().amax(dim=0)
    g = b.groups
    o, cin_g = w.shape[0], w.shape[1]
    return w.reshape(g, o // g, cin_g, -1).abs().amax(dim=(1, 3)).reshape(-1)


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def _apply(pair: _Pair, a: nn.Module, b: nn.Module, s: torch.Tensor) -> None:
    """A's output channel i / s_i, B's input channel i * s_i, BatchNorms on the way: mean and bias / s_i."""
    wa = a.weight.detach().double()
    _set(a.weight, wa / s.reshape(-1, *([1] * (wa.dim() - 1))))
    if a.bias is not None:
        _set(a.bias, a.bias.detach().double() / s)
    for bn in pair.bns:
        with torch.no_grad():
            bn.running_mean.copy_((bn.running_mean.double() / s).to(bn.running_mean.dtype))
            if bn.bias is not None:
                bn.bias.copy_((bn.bias.detach().double() / s).to(bn.bias.dtype))
    wb = b.weight.detach().double()
    if isinstance(b, nn.Linear):
        _set(b.weight, wb * s.reshape(1, -1))
    else:
        g = b.groups
        o, cin_g = wb.shape[0], wb.shape[1]
        view = wb.reshape(g, o // g, cin_g, -1) * s.reshape(g, 1, cin_g, 1)
        _set(b.weight, view.reshape(wb.shape))


def _scales(a: nn.Module, b: nn.Module) -> torch.Tensor:
    r1, r2 = _out_ranges(a), _in_ranges(b)
    ok = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
    s = torch.ones_like(r1)
    s[ok] = torch.sqrt(r1[ok] * r2[ok]) / r2[ok]  # both ranges become sqrt(r1 * r2)
    return s


# -------------------------------------------------------------------------------------------------
# the pass
# -------------------------------------------------------------------------------------------------
def equalize(gm: fx.GraphModule, config: QuantConfig | None = None) -> Equalization:
    """Equalize every eligible pair of ``gm`` in place (needs ``node.meta['qcast_val']`` from shape propagation)."""
    config = config or QuantConfig()
    policy = RELU6
    if policy not in RELU6_POLICIES:
        raise ValueError(f"equalize.RELU6={policy!r} is not one of {RELU6_POLICIES}")
    modules = dict(gm.named_modules())
    sites = call_sites(gm)
    shared = _shared_tensors(gm)
    name = lambda n: n.meta.get("qcast_name", str(n.target))  # noqa: E731
    pairs: list[_Pair] = []
    skipped: list[tuple[str, str, str]] = []
    for a_node in gm.graph.nodes:
        if a_node.op != "call_module" or not isinstance(modules[a_node.target], LAYERS):
            continue
        found = _follow(a_node, modules)
        if found is None:
            continue
        b_node, through, kinds, why = found
        if b_node is None:
            if why:
                skipped.append((name(a_node), why[0], why[1]))
            continue
        reason = _why_not(a_node, b_node, through, kinds, modules, sites, shared, config, policy)
        if reason:
            skipped.append((name(a_node), name(b_node), reason))
            continue
        pairs.append(_Pair(a_node, b_node, through,
                           [modules[n.target] for n, k in zip(through, kinds) if k == "batch_norm"],
                           [n for n, k in zip(through, kinds) if k == "relu6"]))

    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1 if pairs else 1):
        moved = 0.0
        for p in pairs:
            a, b = modules[p.a.target], modules[p.b.target]
            s = _scales(a, b)
            _apply(p, a, b, s)
            p.total = s if p.total is None else p.total * s
            moved = max(moved, float((s - 1).abs().max()))
        if moved < TOLERANCE:
            break

    replaced = []
    for p in pairs:
        for r6 in p.relu6:  # policy "relu": the clip at 6 goes (see RELU6)
            with gm.graph.inserting_before(r6):
                relu = gm.graph.call_function(F.relu, (r6.args[0],))
            relu.meta.update(r6.meta)
            relu.meta["qcast_op"] = "relu"
            relu.meta["qcast_replaced_relu6"] = True
            r6.replace_all_uses_with(relu)
            gm.graph.erase_node(r6)
            replaced.append(name(relu))
        for n in (p.a, p.b):
            n.meta["qcast_equalized"] = True
    finish(gm)
    out = []
    for p in pairs:
        t = p.total if p.total is not None else torch.ones(1, dtype=torch.float64)
        out.append(EqualizedPair(name(p.a), name(p.b), tuple(name(n) for n in p.through),
                                 float(t.min()), float(t.max())))
    return Equalization(tuple(out), tuple(skipped), sweeps if pairs else 0, policy, tuple(replaced))


def _follow(a_node: fx.Node, modules):
    """Walk forward from A over commuting ops: (B or None, ops on the way, their kinds, (B's name, why) or None);
    None when A's output reaches no conv/linear at all (nothing to report)."""
    a = modules[a_node.target]
    axis = 1 if not isinstance(a, nn.Linear) else (_ndim(a_node) or 2) - 1
    node, through, kinds = a_node, [], []
    while True:
        users = list(node.users)
        if len(users) != 1:
            nxt = [u for u in users if u.op == "call_module" and isinstance(modules.get(u.target), LAYERS)]
            if nxt and len(users) > 1:
                who = nxt[0].meta.get("qcast_name", str(nxt[0].target))
                return None, through, kinds, (who, f"the output of {node.meta.get('qcast_name', node.name)} has "
                                                   f"{len(users)} consumers")
            return None
        user = users[0]
        if user.op == "call_module" and isinstance(modules.get(user.target), LAYERS):
            if user.args and user.args[0] is node and not _extra_nodes(user):
                b = modules[user.target]
                ndim = _ndim(node)
                want = 1 if not isinstance(b, nn.Linear) else (ndim - 1 if ndim else None)
                if want != axis:
                    return None
                return user, through, kinds, None
            return None
        step = _step(user, node, axis, modules)
        if step is None:
            return None
        kind, axis = step
        through.append(user)
        kinds.append(kind)
        node = user


def _why_not(a_node, b_node, through, kinds, modules, sites, shared, config, policy) -> str | None:
    a, b = modules[a_node.target], modules[b_node.target]
    for n in (a_node, b_node, *[t for t, k in zip(through, kinds) if k == "batch_norm"]):
        if sites.get(n.target, 0) != 1:
            return f"'{n.target}' is called at several places"
    out_ch = a.weight.shape[0]
    in_ch = b.in_features if isinstance(b, nn.Linear) else b.in_channels
    if out_ch != in_ch:
        return f"{out_ch} output channels feed {in_ch} input channels"
    for n, m in ((a_node, a), (b_node, b), *[(t, modules[t.target]) for t, k in zip(through, kinds)
                                             if k == "batch_norm"]):
        tensors = [t for t in (getattr(m, "weight", None), getattr(m, "bias", None), getattr(m, "running_mean", None))
                   if isinstance(t, torch.Tensor)]
        if any(id(t) in shared for t in tensors) or id(m) in shared:
            return f"'{n.target}' shares a parameter with another module (tied weights)"
        if not all(t.dtype.is_floating_point for t in tensors):
            return f"'{n.target}' has non-floating-point weights"
    for n in (a_node, b_node, *through):
        nm, op, path = n.meta.get("qcast_name", ""), n.meta.get("qcast_op", ""), n.meta.get("qcast_path", "")
        if config.skipped_by(nm, op, path) or config.setting("activation", nm, op, path) == "float":
            return f"'{nm}' is kept in float by the config"
    if "relu6" in kinds and policy == "skip":
        return "relu6 between them does not commute with the scaling"
    return None


def _shared_tensors(gm: fx.GraphModule) -> set[int]:
    """ids of tensors and modules reachable under more than one name, or read by a get_attr node."""
    count: dict[int, int] = {}
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        count[id(t)] = count.get(id(t), 0) + 1
    for _, m in gm.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
    shared = {k for k, v in count.items() if v > 1}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = gm
            try:
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            shared.add(id(obj))
    return shared


__all__ = ["equalize", "Equalization", "EqualizedPair", "RELU6", "RELU6_POLICIES"]
