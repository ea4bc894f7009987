"""The OpenVINO backend: qcast's QDQ graph, compiled by OpenVINO's CPU plugin.

Lowering (``lower``): every int8 conv/linear weight, already on its per-channel symmetric grid after ``to_qdq``,
is wrapped in ``torch.fake_quantize_per_channel_affine`` with that grid's scales (a parametrization, so a
FusedConv's inner conv is covered too); the activation ``QDQ`` points already are
``torch.fake_quantize_per_tensor_affine``. ``openvino.convert_model`` turns both into FakeQuantize nodes and the CPU
plugin's low-precision transformations compile each quantized conv/linear to a u8 x i8 kernel that requantizes to
the next QDQ's params: the same arithmetic as qcast's QDQ simulation (measured in docs/design.md).

Per-token dynamic linears (``activation="auto"`` on token sequences: float in, float out in the QDQ graph, no
activation QDQ) get their weight as an int8 constant times its per-channel scale (``CompressedWeight``). OpenVINO's
CPU plugin compiles that pattern to a weight-compressed FullyConnected and, with ``DYNAMIC_QUANTIZATION_GROUP_SIZE``,
quantizes its activations at run time to int8 per token and group of input channels, then runs a u8 x i8 GEMM: the
engine's own dynamic quantization, the counterpart of the torch backend's per-token kernel (measured in
docs/design.md). The fake-quant weight of the static linears would not do: without an activation FakeQuantize the
low-precision transformations fold it into an f32 weight, and the linear runs in f32.

Non-int8 parts run with ``INFERENCE_PRECISION_HINT=f32``: OpenVINO's default on CPUs with bf16 support would run
them in bf16 and drift from the simulation. Threads: ``torch.get_num_threads()`` at convert time.

Residual adds (``settings``): a conv whose add qcast fused (``FusedConv(add=True)``) reaches OpenVINO as conv -> add
(other) -> relu -> FakeQuantize, with no FakeQuantize between the conv and the add (qcast requantizes only the sum).
With static shapes the CPU plugin's snippets tokenizer then takes the add + FakeQuantize as an eltwise ``Subgraph`` of
its own wherever ``other`` has a second reader (every identity shortcut: ResNet-18 5 of 8 adds, MobileNetV2 10 of 10,
BlazeFace 4 of 12): its marking pass counts an add as a conv's only when a FakeQuantize sits between them (NNCF's
pattern) or the other operand's conv has no other reader. Each such conv writes its sum input in f32 and a separate
pass reads it back; NNCF's model fuses all of them. ``SNIPPETS_MODE=DISABLE`` leaves those adds to the plugin's own
conv + sum fusion, which takes them all, with the same arithmetic (OpenVINO 2026.4.1: no ``Subgraph:u8`` layer left
in the three models, output SQNR vs float within 0.2 dB, benchmarks/run.py --study openvino); it is set only for
graphs with such convs, since other graphs (transformers' norms and activations) use snippets for their float chains.

``openvino`` is imported only inside ``lower``: importing qcast does not load it.
"""
from __future__ import annotations

import copy
import inspect
import re
import threading
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from ...capture import WEIGHTED_OPS
from ...quantized import OpInfo
from .. import check_traceable, dynamic_linears, register_backend
from ..regions import unconverted
from ..structure import FlatIO, flat_inputs, flatten, shape_error, traced_sizes, unflatten

#: OpenVINO quantizes a weight-compressed linear's activations at run time, per token and per this many input
#: channels (its own scale for each group; 0 turns it off and the linear runs in f32 on the decompressed weight).
#: Measured on DeiT-tiny's linears (K = 192 / 768), see docs/design.md.
DYNAMIC_GROUP = 32
#: function calls whose compiled layers explain() reads back by their TorchScript name (``aten::matmul``)
FUNCTION_OPS = ("matmul", "bmm", "softmax")
#: compile settings besides the thread count (see the module docstring)
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": DYNAMIC_GROUP}
#: added for graphs with a conv whose residual add is fused into it (see the module docstring: residual adds)
CONV_ADD_CONFIG = {"SNIPPETS_MODE": "DISABLE"}
#: OpenVINO runtime layer types that carry a conv/linear's weights
WEIGHTED_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


class WeightGrid(nn.Module):
    """Parametrization: ``w`` -> ``fake_quantize_per_channel_affine(w)`` on the layer's int8 grid (axis 0, zero point
    0). ``w`` is already on that grid, so the values do not change; the op tells OpenVINO the weight is int8."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", torch.zeros(scale.shape[0], dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, 0, -128, 127)


class TensorGrid(nn.Module):
    """Parametrization: ``w`` -> ``fake_quantize_per_tensor_affine(w)`` on a transposed conv's per-tensor int8 grid
    (``max|w| / 127``, zero point 0); ``w`` is already on it."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        from ...observers import tensor_grid
        self.scale = tensor_grid(w)[1]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(w, self.scale, 0, -128, 127)


class CompressedWeight(nn.Module):
    """Parametrization: the weight as ``int8 constant * per-channel scale`` (the grid of the torch backend's per-token
    kernel, ``QLinearDynamic.from_float``: ``max|w| / 127``). OpenVINO keeps the int8 constant and compiles the
    linear as a weight-compressed FullyConnected whose activations it quantizes at run time (module docstring)."""

    def __init__(self, w: torch.Tensor, qmax: int = 127):
        super().__init__()
        from ...observers import weight_scales

        scale = weight_scales(w, qmax)
        self.register_buffer("weight_int8", torch.round(w.detach().float() / scale[:, None]).clamp_(-qmax, qmax)
                             .to(torch.int8))
        self.register_buffer("scale", scale[:, None].float())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.weight_int8.to(torch.float32) * self.scale


def mark_int8_weights(qdq: fx.GraphModule) -> fx.GraphModule:
    """A copy of the QDQ graph whose int8 conv/linear weights are fake-quantized per channel when read, and whose
    per-token dynamic linears read an int8 constant (``CompressedWeight``)."""
    from ..context import int8_layers, transposed_layers
    from ...observers import weight_scales

    gm = copy.deepcopy(qdq)
    for conv in int8_layers(gm).values():
        # qcast_weight_qmax < 127 for weight_bits < 8: the grid's step is max|w| / qmax, its ints fit [-128, 127]
        scale = weight_scales(conv.weight, conv.qcast_weight_qmax)
        parametrize.register_parametrization(conv, "weight", WeightGrid(scale), unsafe=True)
    for conv in transposed_layers(gm).values():  # per-tensor weights (kernels/conv_transpose.py)
        parametrize.register_parametrization(conv, "weight", TensorGrid(conv.weight), unsafe=True)
    for linear in dynamic_linears(gm).values():
        parametrize.register_parametrization(linear, "weight", CompressedWeight(linear.weight), unsafe=True)
    return gm


class OpenVINOModule(nn.Module):
    """Runs a compiled OpenVINO model on torch tensors: inputs bound like the float model's forward, flattened,
    fed as numpy; outputs returned as torch tensors in the float model's output structure. One infer request,
    guarded by a lock (calls from several threads run one at a time)."""

    #: input shapes that get a compile of their own with static shapes (the first ones seen); later shapes run on the
    #: dynamic-shape compile. OpenVINO plans a known shape better: MobileNetV2 at 224, batch 1, 3.78 -> 2.37 ms
    #: (ResNet-18 unchanged), docs/design.md.
    MAX_STATIC = 4

    def __init__(self, compiled, signature: inspect.Signature, in_spec, out_spec, layers: dict[str, str],
                 names: dict[str, str], model=None, settings: dict | None = None, dynamic: frozenset = frozenset(),
                 paths: dict | None = None, run_time: frozenset = frozenset()):
        super().__init__()
        self.run_time = run_time  # explain() row names of ops the torch backend quantizes at run time (weight_only)
        self.signature, self.in_spec, self.out_spec = signature, in_spec, out_spec
        self.layers = layers  # runtime layer name -> runtime precision ("u8", "i8", "f32", ...) per weighted layer
        self.names = names    # explain() row name -> module path of its call_module node
        self.dynamic = dynamic  # module paths of the per-token dynamic linears (weight-compressed, CompressedWeight)
        self.paths = paths or {}  # original layer name -> module path, for a model read from ONNX (to_openvino)
        self._model, self._settings = model, settings  # the dynamic-shape ov.Model and its compile settings
        self._compiled = compiled  # the dynamic-shape compile: made when first needed (None until then)
        self._request = None
        self._static: dict[tuple, tuple] = {}  # input shapes -> (compiled model, infer request)
        self._lock = threading.Lock()
        if compiled is None and model is None:
            raise ValueError("OpenVINOModule needs a compiled model or an ov.Model to compile")

    @property
    def compiled(self):
        """The dynamic-shape compile (batch and spatial sizes free), compiled on first use (``lower`` does, for
        ``explain()``'s read-back)."""
        if self._compiled is None:
            import openvino as ov
            self._compiled = ov.Core().compile_model(self._model, "CPU", self._settings)
        return self._compiled

    def _inputs(self):
        """The model's inputs with their free dims (no compile needed)."""
        return self._model.inputs if self._model is not None else self.compiled.inputs

    def static_compile(self, tensors):
        """The static-shape compile for these inputs (made now if not yet, within ``MAX_STATIC``), or None."""
        with self._lock:
            got = self._for_shapes(tensors, dynamic=False)
        return None if got is None else got[0]

    def _for_shapes(self, tensors, dynamic: bool = True) -> tuple:
        """(compiled model, infer request) for these inputs: a static-shape compile (made on the first call of a shape,
        up to ``MAX_STATIC``), else the dynamic one. Called under the lock."""
        key = tuple(tuple(t.shape) for t in tensors)
        got = self._static.get(key)
        if got is None and self._model is not None and len(self._static) < self.MAX_STATIC:
            import openvino as ov
            static = self._model.clone()
            static.reshape({i: ov.PartialShape(list(shape)) for i, shape in zip(static.inputs, key)})
            compiled = ov.Core().compile_model(static, "CPU", self._settings)
            got = self._static[key] = (compiled, compiled.create_infer_request())
        if got is None and dynamic:
            if self._request is None:
                self._request = self.compiled.create_infer_request()
            got = (self.compiled, self._request)
        return got

    def forward(self, *args, **kwargs):
        tensors = flat_inputs(self.signature, self.in_spec, args, kwargs, "OpenVINO")
        feed = [t.detach().cpu().contiguous().numpy() for t in tensors]
        # checked here: on one thread, OpenVINO 2026.4 returned an empty output for a 4-channel input to a
        # 3-channel conv instead of raising
        if not all(i.get_partial_shape().compatible(_shape(t)) for i, t in zip(self._inputs(), tensors)):
            raise self._shape_error(tensors, "")
        with self._lock:
            try:
                compiled, request = self._for_shapes(tensors)
                results = request.infer(feed)
            except RuntimeError as e:
                raise self._shape_error(tensors, str(e).splitlines()[0]) from None
            outs = [torch.from_numpy(results[o].copy()) for o in compiled.outputs]
        return unflatten(self.out_spec, outs)

    def _shape_error(self, tensors, detail: str):
        return shape_error("OpenVINO", ", ".join(str(i.get_partial_shape()) for i in self._inputs()), tensors,
                           "batch and spatial sizes are free, the channels are those of the calibration data", detail)

    def extra_repr(self) -> str:
        return "openvino: " + ", ".join(str(i.get_partial_shape()) for i in self._inputs())

    @property
    def dynamic_group(self) -> int:
        """The compiled model's ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` (0: weight-compressed linears run in f32)."""
        try:
            compiled = next(iter(self._static.values()))[0] if self._static else self.compiled
            return int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))
        except RuntimeError:  # an OpenVINO without the property has no dynamic quantization
            return 0


def _shape(t: torch.Tensor):
    import openvino as ov
    return ov.PartialShape(list(t.shape))


def read_back(compiled) -> dict[str, tuple[str, str]]:
    """Original (framework) layer name -> (runtime layer type, runtime precision) of the compiled model.

    OpenVINO's runtime model keeps, on each executed layer, the names of the layers fused into it
    (``originalLayersNames``): a conv carries its FakeQuantize, bias add, relu and residual add.
    """
    out = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in ("", "Const", "Input", "Output", "Reorder"):
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
        for name in info["originalLayersNames"].astype(str).split(","):
            out[name] = (kind, precision)
    return out


def _onnx_path(layer_name: str, paths: dict[str, str]) -> str | None:
    """The module path of an original layer name from an ONNX node (``paths``), or of a node OpenVINO derived from one
    (``'/gm/fc/Gemm/WithoutBiases/DequantizationMultiply'`` -> ``'/gm/fc/Gemm'``)."""
    name = layer_name
    while name:
        if name in paths:
            return paths[name]
        name = name.rpartition("/")[0]
    return None


def _module_path(layer_name: str) -> str | None:
    """``'__module.gm.layer1.0.conv2.conv/aten::_convolution/Convolution'`` -> ``'layer1.0.conv2.conv'``."""
    head = layer_name.split("/")[0]
    return head[len("__module.gm."):] if head.startswith("__module.gm.") else None


def explain(lowered: OpenVINOModule, rows) -> tuple[OpInfo, ...]:
    """explain() rows as OpenVINO compiled them. A row of a module call (conv, linear, pooling...) gets the runtime
    precision of the compiled layer whose original names include that module (for a conv/linear: its
    convolution/matmul, a FusedConv's inner ``.conv``). Rows of function calls (``x + y``, ``torch.cat``) cannot be
    matched: TorchScript, which OpenVINO's converter traces, names those ``aten::add`` without the fx node's name, so
    they report engine ``openvino`` and the planned precision, except the attention's ``matmul``/``bmm``/``softmax``:
    when every ``aten::matmul`` (...) layer of the compiled model runs in f32 (OpenVINO puts q @ k^T, softmax and
    attn @ v into one f32 MHA ``Subgraph`` and applies their FakeQuantize as rounding in f32), such rows say float."""
    by_aten: dict[str, set[tuple[str, str]]] = {}
    for name, layer in lowered.layers.items():
        for op in FUNCTION_OPS:
            if f"/aten::{op}/" in name:
                by_aten.setdefault(op, set()).add(layer)
    by_path: dict[str, set[tuple[str, str]]] = {}
    paths = getattr(lowered, "paths", {})
    unnamed: set[tuple[str, str]] = set()  # weighted runtime layers no original name maps to a module (model outputs)
    for name, layer in lowered.layers.items():
        path = _onnx_path(name, paths) or _module_path(name)
        if path is not None:
            by_path.setdefault(path, set()).add(layer)
        elif layer[0] in WEIGHTED_LAYERS:
            unnamed.add(layer)
    out = []
    for r in rows:
        if r.name in lowered.run_time and lowered.names.get(r.name) not in lowered.dynamic:  # dynamic: run int8 below
            found = {layer for layer in by_path.get(lowered.names.get(r.name), set()) if layer[0] not in PLUMBING}
            int8 = sorted({f"{k} in {p}" for k, p in found if p in ("u8", "i8")})
            if int8:  # read back: the engine compiled it int8 after all
                out.append(OpInfo(r.name, r.op, "int8", "openvino:" + "/".join(sorted({p for _, p in found})),
                                  f"{r.reason}; OpenVINO compiled it as {', '.join(int8)}"))
            else:
                out.append(run_time_row(r, "OpenVINO", "openvino", ", ".join(sorted(f"{k} in {p}" for k, p in found))))
            continue
        target = lowered.names.get(r.name)
        found = (by_path.get(target, set()) | by_path.get(f"{target}.conv", set())) if target else set()
        if r.op in WEIGHTED_OPS:
            found = {layer for layer in found if layer[0] in WEIGHTED_LAYERS}
        precisions = sorted({p for _, p in found})
        compiled = by_aten.get(r.op, set()) if target is None and r.precision == "int8" else set()
        if compiled and not {p for _, p in compiled} & {"u8", "i8"}:
            kinds = "/".join(sorted({k for k, _ in compiled}))
            out.append(OpInfo(r.name, r.op, "float", f"openvino:{kinds}",
                              f"planned int8 ({r.reason}), but OpenVINO compiled every {r.op} of this model into "
                              f"{kinds} in f32: its FakeQuantize points only round the values"))
        elif not precisions and r.op in WEIGHTED_OPS and r.precision == "int8" and any(
                p not in ("u8", "i8") for _, p in unnamed):
            # OpenVINO renamed the layer (e.g. after the model output it writes) and some such unnamed layer runs in
            # float: do not claim int8 for what cannot be read back
            kinds = "/".join(sorted({f"{k} {p}" for k, p in unnamed}))
            out.append(OpInfo(r.name, r.op, "float", "openvino:unnamed",
                              f"planned int8 ({r.reason}), but OpenVINO's runtime model does not name this layer and "
                              f"its unnamed weighted layers run as {kinds}: reported float"))
        elif not precisions:
            out.append(OpInfo(r.name, r.op, r.precision, "openvino" if r.precision == "int8" else "openvino-float",
                              r.reason))
        elif len(precisions) > 1:
            out.append(OpInfo(r.name, r.op, r.precision, "openvino:" + "/".join(precisions),
                              r.reason + "; OpenVINO compiled its parts (or call sites) to different precisions"))
        elif target in lowered.dynamic and precisions == ["i8"]:
            # a weight-compressed FullyConnected reports i8 whether or not the engine quantizes its activations: the
            # compiled group size says which (0: f32 GEMM on the decompressed weight)
            group = lowered.dynamic_group
            if group:
                out.append(OpInfo(r.name, r.op, "int8", "openvino:i8", f"int8 weights; OpenVINO quantizes its "
                                  f"activations at run time, per token and group of {group} input channels"))
            else:
                out.append(OpInfo(r.name, r.op, "float", "openvino:f32", "int8 weights decompressed to f32: this "
                                  "OpenVINO runs no dynamic quantization (DYNAMIC_QUANTIZATION_GROUP_SIZE=0)"))
        elif precisions[0] in ("u8", "i8") or r.precision != "int8":
            out.append(OpInfo(r.name, r.op, r.precision, f"openvino:{precisions[0]}", r.reason))
        else:
            out.append(OpInfo(r.name, r.op, "float", f"openvino:{precisions[0]}",
                              f"planned int8 ({r.reason}), but OpenVINO compiled it in {precisions[0]}: its "
                              "low-precision transformations did not take this op's FakeQuantize pattern"))
    return tuple(out)


def run_time_ops(qdq: fx.GraphModule) -> frozenset:
    """explain() row names of the ops planned int8 of kind ``weight_only`` (per-token dynamic linears, embeddings): the
    torch backend's kernel quantizes them at run time; the QDQ graph has no quantize/dequantize for them."""
    from ..context import Ctx

    return frozenset(p.name for n in qdq.graph.nodes if (p := Ctx.plan(n)) is not None and p.precision == "int8"
                     and p.kind == "weight_only")


#: OpenVINO runtime layer types that move or shape data around an op's computation (not what explain() reports)
PLUMBING = frozenset({"Reshape", "Broadcast", "Gather", "ShapeOf", "Concatenation", "Transpose", "Reorder", "Input",
                      "Output", "Const", "Convert"})


def run_time_row(r: OpInfo, engine: str, tag: str, compiled: str = "") -> OpInfo:
    """The explain() row of a ``run_time_ops`` op on an engine, which runs it in float (``compiled``: what the engine's
    compiled model says it runs it as, read back: ``RNNSeq in f32``)."""
    hint = ("QuantConfig(activation='int8') gives it static int8 activations, which engines run int8" if r.op == "linear"
            else "backend='torch' runs it int8")
    seen = f"; read back: {engine} runs it as {compiled}" if compiled else ""
    return OpInfo(r.name, r.op, "float", f"{tag}-float",
                  f"planned int8 for the torch backend ({r.reason}), whose kernel quantizes it at run time; the QDQ "
                  f"graph has no quantize/dequantize for it, so {engine} runs it in float{seen} ({hint})")


def to_openvino(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict):
    """The QDQ graph as an ``openvino.Model`` (every input dim free but the channels), with what running it needs:
    ``(model, signature, in_spec, out_spec, paths)``; ``paths``: original layer name -> module path, where the names
    are not TorchScript's ``__module.gm.<path>`` (``explain``). Read from the canonical QDQ ONNX
    (``model_from_onnx``), else converted from the QDQ graph by OpenVINO's TorchScript front end."""
    check_traceable(qdq, "openvino")
    got = model_from_onnx(qdq, example_args, example_kwargs) if _onnx_front_end(qdq) else None
    if got is None:
        got = (*model_from_torch(qdq, example_args, example_kwargs), {})
    model, signature, in_spec, out_spec, paths = got
    bound = signature.bind(*example_args, **example_kwargs)
    bound.apply_defaults()
    tensors, _ = flatten(bound.args)
    model.reshape({i: free_dims(t) for i, t in zip(model.inputs, tensors)})
    return model, signature, in_spec, out_spec, paths


#: ops whose OpenVINO layers ``explain()`` reads back by TorchScript names only (token linears' weight-compressed
#: FullyConnected layers, the attention Subgraph): graphs with them take the TorchScript front end
TORCHSCRIPT_OPS = frozenset({"matmul", "bmm", "softmax", "masked_softmax", "layer_norm", "embedding"})


def _onnx_front_end(qdq: fx.GraphModule) -> bool:
    """Whether OpenVINO reads this graph from the shared ONNX export: CNN-like graphs (measured: same compiled layers,
    latency and agreement as the TorchScript front end), not transformer graphs (per-token dynamic linears, attention,
    whose read-back in ``explain()`` is mapped and tested for TorchScript's layer names)."""
    from ..context import Ctx

    def needs_torchscript(n: fx.Node) -> bool:
        op = n.meta.get("qcast_op")
        if op != "softmax":
            return op in TORCHSCRIPT_OPS
        # a float softmax (a CNN's classification head: BlazeFace) has no row to read back; an int8 one belongs to an
        # attention, whose rows are mapped for TorchScript's names
        return (p := Ctx.plan(n)) is not None and p.precision == "int8"

    return not dynamic_linears(qdq) and not any(needs_torchscript(n) for n in qdq.graph.nodes)


def model_from_onnx(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict):
    """``(ov.Model, signature, in_spec, out_spec, paths)`` read by OpenVINO's ONNX front end from the canonical QDQ ONNX
    the ONNX Runtime backend runs (``onnxruntime.export.export_graph``, exported once for both under
    ``backend='auto'``), or None where ``onnx`` is missing or the export could not leave the spatial sizes free.
    Measured against the TorchScript front end: the same compiled layers (u8 convolutions and FullyConnected) and
    latency on ResNet-18, MobileNetV2 and BlazeFace, the same agreement with the simulation (42.3 vs 42.2 dB on
    ResNet-18), in 0.4-0.5 instead of 2.4-3.4 CPU s (plus the export ONNX Runtime needs anyway, 0.6-0.9 s)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        return None
    import openvino as ov

    from ...errors import UnsupportedError
    from ..onnxruntime.export import export_graph
    try:
        exported = export_graph(qdq, example_args, example_kwargs)
    except UnsupportedError:
        return None
    if not exported.spatial_free:
        return None
    # read_model, not convert_model: the same compiled layers and outputs (BlazeFace: 46 u8 convolutions, outputs
    # bit-identical), without the converter's preprocessing and MOC passes that compile_model repeats (0.3-0.4 s
    # instead of 3.3-5.3 s on BlazeFace, the machine loaded)
    model = ov.Core().read_model(exported.model.SerializeToString(), b"")
    return model, exported.signature, exported.in_spec, exported.out_spec, onnx_paths(exported.model, qdq)


def onnx_paths(model, qdq: fx.GraphModule) -> dict[str, str]:
    """ONNX node name -> module path of the QDQ graph: a conv/gemm by its weight initializer (``<path>.weight_int8``
    through a DequantizeLinear, or a float ``<path>.weight``), another node by its scope name (``/gm/conv1.0/conv/Conv``
    -> ``conv1.0.conv``) where that names a module."""
    modules = {name for name, _ in qdq.named_modules()}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(n.input) > 1:
            weight = dq.get(n.input[1], n.input[1])
            for suffix in (".weight_int8", ".weight"):
                path = weight[:-len(suffix)] if weight.endswith(suffix) else ""
                path = path[len("gm."):] if path.startswith("gm.") else path
                if path in modules and path:
                    out[n.name] = path
                    break
        scope = ".".join(n.name.strip("/").split("/")[1:-1])  # '/gm/<scopes>/<op>'
        if n.name not in out and scope in modules and scope:
            out[n.name] = scope
    return out


def model_from_torch(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict):
    """``(ov.Model, signature, in_spec, out_spec)`` converted by OpenVINO's TorchScript front end (``convert_model`` on
    the QDQ graph with its int8 weights marked, ``mark_int8_weights``)."""
    import openvino as ov

    gm = mark_int8_weights(qdq)
    traced_sizes(gm, "openvino")
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*example_args, **example_kwargs)
    bound.apply_defaults()
    tensors, in_spec = flatten(bound.args)
    with torch.no_grad():
        _, out_spec = flatten(gm(*bound.args))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings about the QDQ graph's Python
            try:
                model = ov.convert_model(_decoder(FlatIO(gm, in_spec).eval(), tuple(tensors)))
            except Exception as e:  # noqa: BLE001 - OpenVINO's OpConversionFailure and others
                lacked = re.search(r"No conversion rule found for operations: ([^\n]*)", str(e))
                if lacked is None:
                    raise
                # convert runs these ops in torch between OpenVINO stages (regions.py)
                raise unconverted("OpenVINO", re.findall(r"aten::\w+", lacked.group(1)), "no conversion rule") from None
    return model, signature, in_spec, out_spec


def _decoder(module: nn.Module, example: tuple):
    """OpenVINO's TorchScript decoder for ``module``, traced without ``torch.jit.trace``'s check: the check runs the
    module twice more and compares the outputs (importing ``torch.distributed.tensor`` on the way), which cost 2.5 of
    the 4.5 CPU seconds convert_model took on ResNet-18 (the QDQ graph's output is compared with the simulation by
    ``backend='auto'``, and tested, anyway)."""
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    return TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})


def free_dims(example: torch.Tensor):
    """The input shape OpenVINO compiles for: batch and spatial sizes free (any size, as on the torch backend),
    channels (dim 1 of a float input of rank >= 2: NC, NCL, NCHW) fixed to the example's. With every dim dynamic
    (convert_model's default) OpenVINO ran a 3-channel conv on a 4-channel input without complaint."""
    import openvino as ov

    dims = [-1] * example.dim()
    if example.dtype.is_floating_point and example.dim() >= 2:
        dims[1] = example.shape[1]
    return ov.PartialShape(dims)


def settings(qdq: fx.GraphModule, threads: int) -> dict:
    """The compile settings for this QDQ graph: ``COMPILE_CONFIG``, the thread count, and ``CONV_ADD_CONFIG`` when a
    conv runs with its residual add fused (the module docstring says why)."""
    from ...nn import FusedConv

    out = dict(COMPILE_CONFIG, INFERENCE_NUM_THREADS=threads)
    if any(isinstance(m, FusedConv) and m.add for m in qdq.modules()):
        out.update(CONV_ADD_CONFIG)
    return out


#: ops OpenVINO is not given (``Backend.torch_ops``): its ONNX front end rejects the Loop torch.onnx exports for an
#: EmbeddingBag ("node not found in graph cache", OpenVINO 2026.4); they run in torch between its stages
TORCH_OPS = ("embedding_bag",)


@register_backend("openvino", requires="openvino", install_hint='pip install "qcast[openvino]"', explain=explain,
                  weight_only=("linear:dynamic",), torch_ops=TORCH_OPS)
def lower(qdq: fx.GraphModule, config, example_args: tuple, example_kwargs: dict) -> OpenVINOModule:
    import openvino as ov

    from ..context import Ctx

    model, signature, in_spec, out_spec, paths = to_openvino(qdq, example_args, example_kwargs)
    core = ov.Core()
    config = settings(qdq, torch.get_num_threads())
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" not in core.get_property("CPU", "SUPPORTED_PROPERTIES"):
        del config["DYNAMIC_QUANTIZATION_GROUP_SIZE"]  # older OpenVINO: explain() then reports those linears f32
    names = {n.meta["qcast_name"]: n.target for n in qdq.graph.nodes
             if n.op == "call_module" and Ctx.plan(n) is not None and "qcast_name" in n.meta}
    module = OpenVINOModule(None, signature, in_spec, out_spec, {}, names, model, config,
                            frozenset(dynamic_linears(qdq)), paths, run_time_ops(qdq))
    # the calibration shape's static compile (what auto times) and the dynamic one, whose runtime model explain()
    # reads back: the static compile's renames fused layers (per-token FullyConnected, functional linears), so read
    # back from it, 25 of 36 MiniLM token linears and two coverage-model linears lost their runtime precision
    example = flat_inputs(signature, in_spec, example_args, example_kwargs, "OpenVINO")
    module.static_compile(example)
    module.layers = read_back(module.compiled)
    return module
