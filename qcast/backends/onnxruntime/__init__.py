"""The ONNX Runtime backend: qcast's QDQ graph as canonical QDQ ONNX (``export.py``, ``canonical.py``), run by an
``onnxruntime.InferenceSession`` on the CPU with all graph optimizations, so that ORT's QDQ fusions turn each int8
conv/linear into QLinearConv / QGemm / ... (its own int8 kernels).

Session: ``intra_op_num_threads = torch.get_num_threads()`` at convert time, one inter-op thread, sequential
execution, ``ORT_ENABLE_ALL``, ``CPUExecutionProvider``. ``explain()`` reads which nodes ORT fused from the
optimized model it writes (``SessionOptions.optimized_model_filepath``).

``onnx`` and ``onnxruntime`` are imported only inside functions: importing qcast does not load them.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import threading

import torch
import torch.fx as fx
import torch.nn as nn

from ...capture import WEIGHTED_OPS
from ...quantized import OpInfo
from .. import dynamic_linears, register_backend
from ..openvino import run_time_ops, run_time_row
from ..structure import flat_inputs, shape_error, unflatten
from .export import export_qdq_onnx, to_onnx

#: ORT's int8 kernels that carry a conv/linear's weights (contrib ops of its QDQ fusions on CPU)
FUSED_WEIGHTED = ("QLinearConv", "QLinearConvTranspose", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                  "DynamicQuantizeMatMul", "QAttention")
#: float ORT ops a conv/linear ends up in when its pattern did not fuse
FLOAT_WEIGHTED = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm", "NchwcConv", "ConvTranspose")
#: suffix of an int8 weight initializer (``canonical``): ``<module path>.weight_int8``
WEIGHT = ".weight_int8"
#: suffix of its scale initializer: what is left to find a linear by once ORT folded the transpose of its weight into
#: a new initializer (a linear on a token sequence becomes MatMulIntegerToFloat reading ``<path>.weight_scale``)
WEIGHT_SCALE = ".weight_scale"
#: ORT's int8 matmuls (the attention's q @ k^T and attn @ v are these when its QDQ fusion takes them)
INT8_MATMULS = ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul")


def session_options(threads: int, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting after a run: a spinning pool taxes torch (and other sessions) in the same process
    # (benchmarks/peers.py measured ResNet-18 int8 6.1 -> 14 ms with two spinning sessions interleaved)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # the warning that an ORT_ENABLE_ALL model file is CPU-specific: that is what we read
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def optimized_session(model_bytes: bytes, threads: int):
    """(InferenceSession, ORT's optimized ``onnx.ModelProto``) for a serialized ONNX model."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qcast-ort-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session = ort.InferenceSession(model_bytes, session_options(threads, path), providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    return session, optimized


#: ORT op types that compute on int8 operands (how explain() tells an int8 node from a float one, read back)
#: ONNX op types that move or shape data around an op's computation (not what explain() reports)
PLUMBING = frozenset({"Transpose", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "ConstantOfShape", "Reshape",
                      "Cast", "Slice", "Expand", "Identity"})
INT8_PREFIXES = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize", "QAttention", "QEmbed")


def scoped_ops(optimized, qdq) -> dict[str, tuple[str, ...]]:
    """Module path -> the op types of the nodes of ORT's optimized model under that module's scope
    (``/gm/lstm/LSTM`` -> ``'lstm': ('LSTM', ...)``), for the ops explain() reads back by scope (run-time-quantized
    layers: LSTM, GRU, embeddings)."""
    modules = {name for name, _ in qdq.named_modules() if name}
    out: dict[str, list[str]] = {}
    for node in optimized.graph.node:
        scope = ".".join(node.name.strip("/").split("/")[1:-1])
        if scope in modules:
            out.setdefault(scope, []).append(node.op_type)
    return {k: tuple(v) for k, v in out.items()}


def fused_layers(optimized) -> dict[str, str]:
    """Module path -> ORT op type of every conv/linear in ORT's optimized model, found by its weight initializer
    (``<path>.weight_int8``, named by ``canonical``) or, where ORT folded a transpose into a renamed copy of that
    initializer (a linear on token sequences: ``MatMulIntegerToFloat``), by its weight scale (``<path>.weight_scale``):
    ``{'layer1.0.conv1.conv': 'QLinearConv', 'fc': 'Conv'...}``."""
    out = {}
    for node in optimized.graph.node:
        if node.op_type in FUSED_WEIGHTED + FLOAT_WEIGHTED:
            for name in node.input:
                if name.endswith(WEIGHT):
                    out[_path(name)] = node.op_type
                elif name.endswith(WEIGHT_SCALE) and node.op_type in FUSED_WEIGHTED:
                    out[_path(name[:-len(WEIGHT_SCALE)] + WEIGHT)] = node.op_type
    return out


def activation_matmuls(optimized) -> int:
    """How many int8 matmuls of ORT's optimized model multiply two activations (no weight initializer)."""
    return sum(1 for n in optimized.graph.node if n.op_type in INT8_MATMULS
               and not any(i.endswith(WEIGHT) or i.endswith(WEIGHT_SCALE) for i in n.input))


def _path(weight: str) -> str:
    """``'gm.layer1.0.conv1.conv.weight_int8'`` (``FlatIO`` holds the graph as ``gm``) -> ``'layer1.0.conv1.conv'``."""
    name = weight[:-len(WEIGHT)] if weight.endswith(WEIGHT) else weight[:-len(WEIGHT_SCALE)]
    return name[len("gm."):] if name.startswith("gm.") else name


def weight_of(optimized) -> dict[str, str]:
    """Output tensor name -> input tensor name of ORT's DequantizeLinear nodes (a float conv reads its int8 weight
    through one)."""
    return {n.output[0]: n.input[0] for n in optimized.graph.node if n.op_type == "DequantizeLinear"}


def layer_ops(optimized) -> dict[str, str]:
    """``fused_layers``, plus the float convs/gemms that read their weight through a DequantizeLinear."""
    out = fused_layers(optimized)
    dq = weight_of(optimized)
    for node in optimized.graph.node:
        if node.op_type in FLOAT_WEIGHTED and len(node.input) > 1 and dq.get(node.input[1], "").endswith(WEIGHT):
            out.setdefault(_path(dq[node.input[1]]), node.op_type)
    return out


class ONNXRuntimeModule(nn.Module):
    """Runs an ONNX Runtime session on torch tensors: inputs bound like the float model's forward, flattened, fed
    as numpy; outputs returned as torch tensors in the float model's output structure. Calls from several threads
    run one at a time (a lock: the session's intra-op pool is sized for one call)."""

    def __init__(self, session, signature: inspect.Signature, in_spec, out_spec, layers: dict[str, str],
                 names: dict[str, str], residual: frozenset = frozenset(), dynamic: frozenset = frozenset(),
                 matmuls: int = 0, run_time: frozenset = frozenset(), scoped: dict | None = None):
        super().__init__()
        self.scoped = scoped or {}  # module path -> op types of ORT's optimized nodes in its scope (scoped_ops)
        self.matmuls = matmuls  # int8 matmuls of two activations in ORT's optimized model (activation_matmuls)
        self.dynamic = dynamic  # module paths of the per-token dynamic linears (float MatMuls here)
        self.run_time = run_time  # explain() row names of ops the torch backend quantizes at run time (weight_only)
        self.residual = residual  # module paths of convs fused with a residual add (FusedConv(add=True))
        self.session, self.signature, self.in_spec, self.out_spec = session, signature, in_spec, out_spec
        self.layers = layers  # module path -> ORT op type (QLinearConv, QGemm, Conv...) of each conv/linear
        self.names = names    # explain() row name -> module path of its call_module node
        self._inputs = session.get_inputs()
        self._lock = threading.Lock()

    def forward(self, *args, **kwargs):
        tensors = flat_inputs(self.signature, self.in_spec, args, kwargs, "ONNX Runtime")
        if not all(_fits(i.shape, t.shape) for i, t in zip(self._inputs, tensors)):
            raise self._shape_error(tensors, "")
        feed = {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(self._inputs, tensors)}
        with self._lock:
            try:
                results = self.session.run(None, feed)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own exception classes
                raise self._shape_error(tensors, str(e).splitlines()[0]) from None
        return unflatten(self.out_spec, [torch.from_numpy(r) for r in results])

    def _shape_error(self, tensors, detail: str):
        return shape_error("ONNX Runtime", ", ".join(_shape_str(i.shape) for i in self._inputs), tensors,
                           "the batch size and every size of an integer input (token ids, masks) are free, the "
                           "other sizes are those of the calibration data", detail)

    def extra_repr(self) -> str:
        return "onnxruntime: " + ", ".join(_shape_str(i.shape) for i in self._inputs)


def _fits(declared, shape) -> bool:
    return len(declared) == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(declared, shape))


def _shape_str(declared) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in declared) + "]"


def explain(lowered: ONNXRuntimeModule, rows) -> tuple[OpInfo, ...]:
    """explain() rows as ONNX Runtime runs them: a conv/linear row gets the op ORT's optimized model runs it with
    (``onnxruntime:QLinearConv``...), found by its weight initializer; an int8-planned conv that ORT left as a float
    Conv is reported in float with the reason. Other rows keep the plan, with engine ``onnxruntime``."""
    out = []
    planned = sum(1 for r in rows if r.op in ("matmul", "bmm") and r.precision == "int8")
    for r in rows:
        if r.name in lowered.run_time and lowered.names.get(r.name) not in lowered.dynamic:  # dynamic: below
            ops = lowered.scoped.get(lowered.names.get(r.name), ())
            int8 = [op for op in ops if op.startswith(INT8_PREFIXES)]
            if int8:  # read back: ORT's optimized model runs it on an int8 op after all
                out.append(OpInfo(r.name, r.op, "int8", f"onnxruntime:{'/'.join(int8)}", r.reason))
            else:
                main = sorted({op for op in ops if op not in PLUMBING})
                out.append(run_time_row(r, "ONNX Runtime", "onnxruntime", "/".join(main) + " (float)" if main else ""))
            continue
        target = lowered.names.get(r.name)
        if r.op in ("matmul", "bmm") and r.precision == "int8" and lowered.matmuls < planned:
            # function calls: ORT's model does not say which matmul is which, only how many it fused
            why = (f"ONNX Runtime fused {lowered.matmuls} of the {planned} int8-planned matmuls of two activations"
                   if lowered.matmuls else "ONNX Runtime's QDQ fusion took none of the int8-planned matmuls (their "
                   "inputs reach them through Split/Squeeze/Transpose): they run as float MatMuls on dequantized "
                   "inputs")
            out.append(OpInfo(r.name, r.op, "float" if not lowered.matmuls else r.precision,
                              "onnxruntime-float" if not lowered.matmuls else "onnxruntime",
                              f"planned int8 ({r.reason}); {why}"))
            continue
        kind = (lowered.layers.get(target) or lowered.layers.get(f"{target}.conv")) if target else None
        if target in lowered.dynamic and r.precision == "int8":
            out.append(OpInfo(r.name, r.op, "float", "onnxruntime-float",
                              "planned per-token dynamic int8, but ONNX Runtime has no per-token int8 linear (its "
                              "dynamic quantization, DynamicQuantizeLinear + MatMulInteger, takes one range per "
                              "tensor): it runs as a float MatMul; backend='openvino' or 'torch' run it int8, or "
                              "QuantConfig(activation='int8') makes it static int8 here"))
            continue
        if r.op not in WEIGHTED_OPS or kind is None:
            out.append(OpInfo(r.name, r.op, r.precision, "onnxruntime" if r.precision == "int8" else "onnxruntime-float",
                              r.reason))
        elif kind in FUSED_WEIGHTED or r.precision != "int8":
            out.append(OpInfo(r.name, r.op, r.precision, f"onnxruntime:{kind}", r.reason))
        else:
            why = ("its output goes into a residual add fused into it, which ORT has no int8 kernel for: prepare with "
                   "QuantConfig(backend='onnxruntime') to quantize the conv output and the add separately"
                   if target in lowered.residual else "its QDQ fusion did not take this op's Q/DQ pattern")
            out.append(OpInfo(r.name, r.op, "float", f"onnxruntime:{kind}",
                              f"planned int8 ({r.reason}), but ONNX Runtime runs it as a float {kind} on dequantized "
                              f"weights: {why}"))
    return tuple(out)


#: ops ONNX Runtime is not given (``Backend.torch_ops``): torch.onnx exports an EmbeddingBag as a Loop that ONNX
#: Runtime rejects ("Nodes in a graph must be topologically sorted", onnxruntime 1.32); they run in torch between its
#: stages
TORCH_OPS = ("embedding_bag",)


@register_backend("onnxruntime", requires="onnxruntime", install_hint='pip install "qcast[onnxruntime]"', conv_add=False,
                  float_out=("linear",), explain=explain, weight_only=(), torch_ops=TORCH_OPS)
def lower(qdq: fx.GraphModule, config, example_args: tuple, example_kwargs: dict) -> ONNXRuntimeModule:
    from ...nn import FusedConv
    from ..context import Ctx

    exported = to_onnx(qdq, example_args, example_kwargs)
    session, optimized = optimized_session(exported.model.SerializeToString(), torch.get_num_threads())
    names = {n.meta["qcast_name"]: n.target for n in qdq.graph.nodes
             if n.op == "call_module" and Ctx.plan(n) is not None and "qcast_name" in n.meta}
    residual = frozenset(path for path, m in qdq.named_modules() if isinstance(m, FusedConv) and m.add)
    return ONNXRuntimeModule(session, exported.signature, exported.in_spec, exported.out_spec,
                             layer_ops(optimized), names, residual, frozenset(dynamic_linears(qdq)),
                             activation_matmuls(optimized), run_time_ops(qdq), scoped_ops(optimized, qdq))


__all__ = ["export_qdq_onnx", "lower", "explain", "ONNXRuntimeModule", "fused_layers"]
