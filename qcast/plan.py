"""The per-node plan: which ops run int8, on which engine, and why the others stay float."""
from __future__ import annotations

import itertools

from dataclasses import dataclass, field

import torch.fx as fx

from .capture import TensorMeta
from .config import QuantConfig
from .backends.context import Ctx, is_int8
from .backends.torch.kernels import Kernel, lookup
from .backends.torch.kernels.registry import declined
from .backends.torch.kernels.base import input_meta
from .backends.torch.kernels.engines import available

HIDDEN_OPS = {"getitem", "size", "dim", "contiguous"}
#: ops whose value is a tuple of tensors (unpacked by getitem nodes) that still get an explain() row
TUPLE_OPS = ("chunk", "split", "unbind", "lstm", "gru")


@dataclass
class Plan:
    """Mutable while prepare decides; frozen into ``OpInfo`` rows by convert."""

    name: str
    op: str
    path: str
    precision: str = "float"
    kind: str = ""
    engine: str = "torch-float"
    reason: str = ""
    fused: tuple[str, ...] = ()
    kernel: Kernel | None = field(default=None, repr=False)
    visible: bool = True
    #: an int8 ``compute`` op whose output no int8 op reads: int8 inputs and weights, fp32 output (no requantize)
    float_out: bool = False
    #: the largest integer of this op's activation inputs' grid: 255 (full u8), 127 where the engine's kernel needs
    #: 7-bit inputs (x86/fbgemm ``reduce_range``); the kernel table decides it, prepare's observers follow it
    input_qmax: int = 255


def plan_graph(gm: fx.GraphModule, config: QuantConfig, opaque: dict[str, str]) -> None:
    """Decide each node's precision; int8 only where a registered kernel accepts it (evidence, not lists)."""
    from .backends.torch.kernels.transformer import keep_residual_stream_float
    keep_residual_stream_float(gm)  # adds/cats feeding a layer_norm stay float (kernels/transformer.py says why)
    ctx = Ctx(gm, config)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        name, op, path = node.meta["qcast_name"], node.meta["qcast_op"], node.meta.get("qcast_path", "")
        mod = ctx.modules.get(node.target) if node.op == "call_module" else None
        fused = tuple(getattr(mod, "qcast_fused", ())) if mod is not None else ()
        if getattr(node.target, "__name__", "") == "add_relu":
            fused = ("relu",)
        p = Plan(name=name, op=op, path=path, fused=fused)
        node.meta["qcast_plan"] = p
        meta = node.meta.get("qcast_val")
        tensor_out = isinstance(meta, TensorMeta) or (op in TUPLE_OPS and isinstance(meta, (tuple, list)))
        # a layer with weights returning a structure (nn.LSTM/GRU: (output, state)) is a row too, with its reason
        weighted = mod is not None and any(True for _ in itertools.chain(mod.parameters(), mod.buffers()))
        p.visible = (tensor_out or weighted) and op not in HIDDEN_OPS
        p.reason = _float_reason(node, p, ctx, opaque, tensor_out) or ""
        if not tensor_out and weighted and p.reason == "produces no tensor":
            p.reason = (f"returns a {type(meta).__name__ if meta is not None else 'structure'}, not one tensor: no "
                        f"int8 kernel for '{op}' on this backend (see `qcast ops`); runs in float")
        if p.reason and node.meta.get("qcast_unfolded"):  # a BatchNorm fold_bn could not fold, kept in float
            p.reason = f"{node.meta['qcast_unfolded']}; runs in float: {p.reason}"
        if not p.reason:
            p.precision = "int8"
            p.kind = p.kernel.impl.kind_of(node, p.kernel.kind)
            if p.kind == "compute" and hasattr(p.kernel.impl, "reduce_range"):
                reduced = p.kernel.impl.reduce_range(p.engine)
                p.input_qmax = 127 if reduced else 255
                p.reason = (getattr(p.kernel.impl, "weights", "per-channel s8 weights") + ", u8 activations"
                            + (" (7-bit, reduce_range)" if reduced else ""))
                if fused or node.meta.get("qcast_folded"):
                    p.reason += "; fused " + "+".join(["bn"] * bool(node.meta.get("qcast_folded")) + list(fused))
                if node.meta.get("qcast_functional_from"):  # passes/functional_layers.py
                    p.reason += f"; written as {node.meta['qcast_functional_from']}, run as the layer"
                if node.meta.get("qcast_engine_note"):
                    p.reason += "; " + node.meta["qcast_engine_note"]
                note = scheme_note(node, p, ctx)
                if note:
                    p.reason += "; " + note
            else:
                p.reason = {"fixed": "fixed output params", "passthrough": "runs on the int8 tensor, no requantization",
                            "weight_only": "int8 weights"}.get(p.kind, "requantized to calibrated output params")
                note = p.kernel.impl.note(node, ctx)
                if note:
                    p.reason += "; " + note
                if fused:  # add_relu: the relu runs inside the int8 add (last, as on convs: '...; fused relu')
                    p.reason += "; fused " + "+".join(fused)
    place_outputs(gm, config.backend)


def scheme_note(node, p: Plan, ctx: Ctx) -> str:
    """What explain() says of a conv/linear whose weight or activation scheme is not the default int8: how its grid
    reaches the int8 kernels."""
    notes = []
    if weight_layer(node, ctx) is not None:
        scheme, bits, group = ctx.config.weight_scheme(p.name, p.op, p.path)
        if scheme.custom:
            notes.append(f"weight quantizer {scheme.name!r} (its declared grid) stored on the int8 grid")
        elif scheme.pow2:
            notes.append(f"{bits}-bit weights with power-of-two scales stored on the int8 grid")
        elif bits < 8 or group:
            notes.append(f"{scheme.name if scheme.name != 'int8' else f'{bits}-bit'} weights (ints in "
                         f"[-{2 ** (bits - 1) - 1}, {2 ** (bits - 1) - 1}]"
                         + (f", a scale per {group} inputs, re-rounded per channel" if group else "")
                         + ") stored on the int8 grid")
        if notes:
            notes[-1] += ", run on the int8 kernels"
    act = ctx.config.activation_scheme(p.name, p.op, p.path)
    if act is not None:
        notes.append(f"activation quantizer {act.name!r} (its declared grid)" if act.custom else
                     f"{act.name} activations" + (" (zero point 0: the uint8 grid centred at 128)" if act.symmetric
                                                  else "") + (" (power-of-two scales)" if act.pow2 else ""))
    return "; ".join(notes)


FLOAT_OUT_NOTE = "fp32 output (no int8 op reads it)"
#: on an engine without an fp32-output kernel for the op (``Backend.float_out``)
INT8_OUT_NOTE = "int8 output, dequantized after it (no int8 op reads it, but the {backend} backend has no fp32-output int8 {op})"


def _int8_reader(node: fx.Node, smooths: set) -> bool:
    """Whether an int8 op reads ``node``'s value as a quantized input. A SmoothQuant ``Smooth`` in front of an int8
    linear counts as that linear: calibration drops it where the linear's input has no outlier channel, and the
    linear then reads this value itself."""
    return any((is_int8(u) and node in Ctx.plan(u).kernel.impl.quant_inputs(u))
               or (u in smooths and _int8_reader(u, smooths)) for u in node.users)


def place_outputs(gm: fx.GraphModule, backend: str = "torch") -> None:
    """Placement: an int8 op's inputs are quantized; its output is requantized only where an int8 op reads it,
    directly or through int8 passthrough ops. Walking the graph backwards (readers are decided before what they
    read), an int8 op whose output no int8 op reads:

    * ``compute`` with a float-output kernel (conv/linear, global average, matmul): stays int8 (int8 inputs and
      weights) and writes fp32 (``Plan.float_out``: no observer, no QDQ after it);
    * any other (passthrough, fixed, add/mul/cat, hardswish, softmax, norms): runs in float. Its int8 result
      would only be dequantized, and its own inputs then need no requantization either (unless another int8 op
      reads them), so the float region at a model's outputs is computed from fp32 conv/linear outputs.

    Model outputs and values read only by float ops therefore stay float (docs/design.md, "Placement").

    ``backend``: the backend the model is planned for (``QuantConfig.backend``); a conv/linear whose fp32-output kernel
    that engine lacks (``Backend.float_out``: ONNX Runtime's QLinearConv) keeps its requantized output instead, which
    the engine dequantizes after it (BlazeFace's heads on ONNX Runtime: QLinearConv, not a float Conv).
    """
    from .smooth import Smooth
    writes_float = None
    if backend not in ("torch", "auto"):
        from .backends import get_backend
        writes_float = get_backend(backend).writes_float
    smooths = {n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Smooth)}
    for node in reversed(list(gm.graph.nodes)):
        p = Ctx.plan(node)
        if not is_int8(node) or _int8_reader(node, smooths):
            continue
        if p.kind == "compute" and p.kernel.impl.float_output(node) and writes_float and not writes_float(p.op):
            head, sep, fused = p.reason.partition("; fused ")
            p.reason = f"{head}; {INT8_OUT_NOTE.format(backend=backend, op=p.op)}{sep}{fused}"
        elif p.kind == "compute" and p.kernel.impl.float_output(node):
            p.float_out = True
            head, sep, fused = p.reason.partition("; fused ")  # 'fused ...' stays last, as on every row
            p.reason = f"{head}; {FLOAT_OUT_NOTE}{sep}{fused}"
        else:
            p.precision, p.kind, p.engine, p.float_out = "float", "", "torch-float", False
            p.reason = "no int8 op reads its output, so it runs in float (an int8 result would only be dequantized)"


def _wants_dynamic(node, ctx: Ctx) -> bool:
    """``activation="dynamic"``, or ``"auto"`` on a token sequence: an input of 3 or more dims (batch, tokens,
    features), where transformers put outlier tokens that one static range cannot serve (measured on the real
    MiniLM: sentence-embedding cosine 0.96 static vs 0.997 per-token, docs/design.md)."""
    setting = ctx.setting(node, "activation")
    if setting == "dynamic":
        return True
    meta = input_meta(node, ctx) if setting == "auto" else None
    return meta is not None and len(meta.shape) >= 3


def weight_layer(node, ctx: Ctx):
    """The conv/linear module a ``call_module`` node runs (a FusedConv's inner one), else None."""
    import torch.nn as nn
    from .nn import FusedConv
    mod = ctx.modules.get(node.target) if node.op == "call_module" else None
    mod = mod.conv if isinstance(mod, FusedConv) else mod
    return mod if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) else None


def _simulated(node, p: Plan, ctx: Ctx) -> str | None:
    """A registered quantizer that declares no integer grid (``FakeQuantizer.grid``) cannot run on int8 kernels:
    the ops it is named for run in float; a conv/linear is simulated (its inputs and weight fake-quantized by it,
    ``node.meta['qcast_simulate']``, prepare inserts them)."""
    act = ctx.config.activation_scheme(p.name, p.op, p.path)
    act = act if act is not None and act.custom and not act.quantizer.declares_grid() else None
    layer = weight_layer(node, ctx)
    weight = ctx.config.weight_scheme(p.name, p.op, p.path)[0] if layer is not None else None
    weight = weight if weight is not None and weight.custom and not weight.quantizer.declares_grid() else None
    # an activation grid of fewer than 8 bits: the int8 kernels (and the engines' QuantizeLinear) requantize their
    # outputs onto the full uint8 range, so nothing would clamp to it; simulated, the layer computes the declared grid
    narrow = ctx.config.activation_scheme(p.name, p.op, p.path)
    narrow = narrow if act is None and narrow is not None and narrow.custom and narrow.bits < 8 else None
    if act is None and weight is None and narrow is None:
        return None
    names = " and ".join(f"{kind} quantizer {s.name!r}" for kind, s in (("activation", act), ("weight", weight)) if s)
    why = f"{names} declare{'s' if ' and ' not in names else ''} no integer grid (FakeQuantizer.grid)" if names else (
        f"activation quantizer {narrow.name!r} declares {narrow.bits}-bit activations, which the int8 kernels do "
        "not clamp to (they requantize onto 8 bits)")
    if layer is None:
        return f"{why}, so it runs in float (not simulated: not a conv/linear)"
    node.meta["qcast_simulate"] = {"activation": act or narrow, "weight": weight}
    return (f"simulated: {why}, so the layer runs in float with its " + " and ".join(
        w for w, s in (("inputs", act or narrow), ("weight", weight)) if s) + " fake-quantized")


def _float_reason(node, p: Plan, ctx: Ctx, opaque: dict[str, str], tensor_out: bool) -> str | None:
    if node.op == "call_module" and node.target in opaque:
        return f"not capturable, runs in float: {opaque[node.target]}"
    if node.meta.get("qcast_float_reason"):
        return node.meta["qcast_float_reason"]
    if not tensor_out:
        return "produces no tensor"
    pattern = ctx.config.skipped_by(p.name, p.op, p.path)
    if pattern:
        return f"kept in float by QuantConfig.skip pattern {pattern!r}"
    if ctx.setting(node, "activation") == "float":
        return "kept in float by QuantConfig activation='float'"
    simulated = _simulated(node, p, ctx)
    if simulated:
        return simulated
    if _wants_dynamic(node, ctx):  # a per-token dynamic kernel where the op has one (kernels/dynamic.py)
        dynamic = lookup(f"{p.op}:dynamic", ctx.kernels)
        if dynamic is not None and not dynamic.impl.check(node, ctx):
            p.kernel, p.engine = dynamic, "native"
            return None
    kernel = lookup(p.op, ctx.kernels)
    if kernel is None:
        return declined(p.op, ctx.kernels) or (
            f"no int8 kernel for '{p.op}' on the {ctx.config.backend} backend (see `qcast ops`); runs in float "
            "with dequantize/quantize around it")
    p.kernel = kernel
    reason = kernel.impl.check(node, ctx)
    if reason:
        return reason
    if kernel.kind == "weight_only":  # int8 weights, float in and out: nothing to observe
        p.engine = kernel.impl.engine(node, ctx)
        return None
    inputs = kernel.impl.quant_inputs(node)
    if not inputs:
        return "has no tensor input to quantize"
    for inp in inputs:  # only floating-point tensors are observed and quantized (never a number argument)
        meta = inp.meta.get("qcast_val")
        if meta is None or (isinstance(meta, TensorMeta) and not meta.is_float):
            what = "not a tensor (a number or other value)" if meta is None else f"a {meta.dtype} tensor"
            return (f"its operand {inp.meta.get('qcast_name', inp.name)} is {what}, not a floating-point tensor; "
                    "only floating-point tensors are quantized, so it runs in float")
    passthrough = kernel.impl.kind_of(node, kernel.kind) in ("passthrough", "fixed")
    if passthrough and not all(is_int8(i) for i in inputs):
        src = next(i for i in inputs if not is_int8(i))
        return f"its input ({src.meta.get('qcast_name', src.name)}) is float, so it runs in float too"
    if kernel.impl.needs_int8_input and not any(is_int8(i) for i in inputs):
        return "none of its inputs is int8; a lone op is not worth a quantize/dequantize pair"
    if kernel.kind == "compute" and hasattr(kernel.impl, "reduce_range"):
        try:
            p.engine = kernel.impl.engine(node, ctx)
        except RuntimeError as e:
            return _no_engine_reason(node, ctx, str(e))
    else:
        p.engine = "native"
    return None


def _no_engine_reason(node, ctx: Ctx, error: str) -> str:
    """The reason a layer no engine accepts runs in float: the engines' errors, or (when there are none to
    show) what the config asked for and what this PyTorch build has. Never empty."""
    if error.strip() and not error.rstrip().endswith("()"):
        return error
    wanted = ctx.setting(node, "engine")
    fused = getattr(ctx.modules.get(node.target), "qcast_fused", ()) if node.op == "call_module" else ()
    return (f"no int8 engine can run this layer: the config asks for engine={wanted!r}"
            + (" and its fused residual add (conv2d_add) exists only on onednn" if "add" in fused else "")
            + f"; int8 engines in this PyTorch build: {available()}. Pick another with QuantConfig(engine=...) "
            "or per_layer, or keep the layer in float with skip=[...]; runs in float")
