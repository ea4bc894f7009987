"""The OpenVINO backend: qcast's QDQ graph, compiled by OpenVINO's CPU plugin.

Lowering (``lower``): every int8 conv/linear weight, already on its per-channel symmetric grid after ``to_qdq``,
is wrapped in ``torch.fake_quantize_per_channel_affine`` with that grid's scales (a parametrization, so a
FusedConv's inner conv is covered too); the activation ``QDQ`` points already are
``torch.fake_quantize_per_tensor_affine``. ``openvino.convert_model`` turns both into FakeQuantize nodes and the CPU
plugin's low-precision transformations compile each quantized conv/linear to a u8 x i8 kernel that requantizes to
the next QDQ's params: the same arithmetic as qcast's QDQ simulation (measured in docs/design.md).

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
import threading
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from ...quantized import OpInfo
from .. import check_traceable, register_backend
from ..structure import FlatIO, flat_inputs, flatten, shape_error, unflatten

#: compile settings besides the thread count (see the module docstring)
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
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


def mark_int8_weights(qdq: fx.GraphModule) -> fx.GraphModule:
    """A copy of the QDQ graph whose int8 conv/linear weights are fake-quantized per channel when read."""
    from ...convert import int8_layers
    from ...observers import weight_scales

    gm = copy.deepcopy(qdq)
    for conv in int8_layers(gm).values():
        # qcast_weight_qmax < 127 for weight_bits < 8: the grid's step is max|w| / qmax, its ints fit [-128, 127]
        scale = weight_scales(conv.weight, conv.qcast_weight_qmax)
        parametrize.register_parametrization(conv, "weight", WeightGrid(scale), unsafe=True)
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
                 names: dict[str, str], model=None, settings: dict | None = None):
        super().__init__()
        self.compiled, self.signature, self.in_spec, self.out_spec = compiled, signature, in_spec, out_spec
        self.layers = layers  # runtime layer name -> runtime precision ("u8", "i8", "f32", ...) per weighted layer
        self.names = names    # explain() row name -> module path of its call_module node
        self._request = compiled.create_infer_request()
        self._model, self._settings = model, settings  # the dynamic-shape ov.Model and its compile settings
        self._static: dict[tuple, tuple] = {}  # input shapes -> (compiled model, infer request)
        self._lock = threading.Lock()

    def _for_shapes(self, tensors) -> tuple:
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
        return got or (self.compiled, self._request)

    def forward(self, *args, **kwargs):
        tensors = flat_inputs(self.signature, self.in_spec, args, kwargs, "OpenVINO")
        feed = [t.detach().cpu().contiguous().numpy() for t in tensors]
        # checked here: on one thread, OpenVINO 2026.4 returned an empty output for a 4-channel input to a
        # 3-channel conv instead of raising
        if not all(i.get_partial_shape().compatible(_shape(t)) for i, t in zip(self.compiled.inputs, tensors)):
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
        return shape_error("OpenVINO", ", ".join(str(i.get_partial_shape()) for i in self.compiled.inputs), tensors,
                           "batch and spatial sizes are free, the channels are those of the calibration data", detail)

    def extra_repr(self) -> str:
        return "openvino: " + ", ".join(str(i.get_partial_shape()) for i in self.compiled.inputs)


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


def _module_path(layer_name: str) -> str | None:
    """``'__module.gm.layer1.0.conv2.conv/aten::_convolution/Convolution'`` -> ``'layer1.0.conv2.conv'``."""
    head = layer_name.split("/")[0]
    return head[len("__module.gm."):] if head.startswith("__module.gm.") else None


def explain(lowered: OpenVINOModule, rows) -> tuple[OpInfo, ...]:
    """explain() rows as OpenVINO compiled them. A row of a module call (conv, linear, pooling...) gets the runtime
    precision of the compiled layer whose original names include that module (for a conv/linear: its
    convolution/matmul, a FusedConv's inner ``.conv``). Rows of function calls (``x + y``, ``torch.cat``) cannot be
    matched: TorchScript, which OpenVINO's converter traces, names those ``aten::add`` without the fx node's name, so
    they report engine ``openvino`` and the planned precision."""
    by_path: dict[str, set[tuple[str, str]]] = {}
    for name, layer in lowered.layers.items():
        path = _module_path(name)
        if path is not None:
            by_path.setdefault(path, set()).add(layer)
    out = []
    for r in rows:
        target = lowered.names.get(r.name)
        found = (by_path.get(target, set()) | by_path.get(f"{target}.conv", set())) if target else set()
        if r.op in ("conv1d", "conv2d", "linear"):
            found = {layer for layer in found if layer[0] in WEIGHTED_LAYERS}
        precisions = sorted({p for _, p in found})
        if not precisions:
            out.append(OpInfo(r.name, r.op, r.precision, "openvino" if r.precision == "int8" else "openvino-float",
                              r.reason))
        elif len(precisions) > 1:
            out.append(OpInfo(r.name, r.op, r.precision, "openvino:" + "/".join(precisions),
                              r.reason + "; OpenVINO compiled its parts (or call sites) to different precisions"))
        elif precisions[0] in ("u8", "i8") or r.precision != "int8":
            out.append(OpInfo(r.name, r.op, r.precision, f"openvino:{precisions[0]}", r.reason))
        else:
            out.append(OpInfo(r.name, r.op, "float", f"openvino:{precisions[0]}",
                              f"planned int8 ({r.reason}), but OpenVINO compiled it in {precisions[0]}: its "
                              "low-precision transformations did not take this op's FakeQuantize pattern"))
    return tuple(out)


def to_openvino(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict):
    """The QDQ graph as an ``openvino.Model`` (every input dim dynamic), with what running it needs:
    ``(model, signature, in_spec, out_spec)``."""
    import openvino as ov

    check_traceable(qdq, "openvino")
    gm = mark_int8_weights(qdq)
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*example_args, **example_kwargs)
    bound.apply_defaults()
    tensors, in_spec = flatten(bound.args)
    with torch.no_grad():
        _, out_spec = flatten(gm(*bound.args))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings about the QDQ graph's Python
            model = ov.convert_model(FlatIO(gm, in_spec).eval(), example_input=tuple(tensors))
    model.reshape({i: free_dims(t) for i, t in zip(model.inputs, tensors)})
    return model, signature, in_spec, out_spec


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


@register_backend("openvino", requires="openvino", install_hint='pip install "qcast[openvino]"', explain=explain)
def lower(qdq: fx.GraphModule, config, example_args: tuple, example_kwargs: dict) -> OpenVINOModule:
    import openvino as ov

    from ...plan import Ctx

    model, signature, in_spec, out_spec = to_openvino(qdq, example_args, example_kwargs)
    config = settings(qdq, torch.get_num_threads())
    compiled = ov.Core().compile_model(model, "CPU", config)
    names = {n.meta["qcast_name"]: n.target for n in qdq.graph.nodes
             if n.op == "call_module" and Ctx.plan(n) is not None and "qcast_name" in n.meta}
    return OpenVINOModule(compiled, signature, in_spec, out_spec, read_back(compiled), names, model, config)
