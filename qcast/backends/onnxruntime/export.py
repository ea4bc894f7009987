"""qcast's QDQ graph as canonical QDQ ONNX (``export_qdq_onnx``): the pattern ONNX Runtime fuses into int8 kernels.

Route: ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``) of the QDQ graph with each int8 conv/linear
weight read through ``fake_quantize_per_channel_affine`` (``mark_int8_weights``, shared with the OpenVINO
backend), inputs and outputs flattened (``structure.FlatIO``); then ``canonical.canonicalize``.

One export serves both engines (``export_graph``): every input dim is left free but the channels (OpenVINO's shapes,
``openvino.free_dims``), and ONNX Runtime's session gets a copy with all but the batch pinned (``to_onnx``; its
optimized graph is then node for node the one a batch-only export gives, measured on ResNet-18 and BlazeFace).
Within ``shared_export()`` (``backend='auto'``) a QDQ graph is exported once: the export was 0.6-0.9 CPU s and
OpenVINO's own TorchScript conversion 2-3 s of the 7 s ``auto`` spent beyond the torch backend on ResNet-18.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ...errors import UnsupportedError
from .. import check_traceable
from ..openvino import mark_int8_weights
from ..regions import unconverted
from ..structure import FlatIO, flatten, traced_sizes
from .canonical import canonicalize

OPSET = 17


@dataclass(frozen=True)
class Exported:
    """A canonical QDQ ONNX model (``model``: ``onnx.ModelProto``) and what calling it with torch values needs."""

    model: object
    signature: inspect.Signature
    in_spec: tuple
    out_spec: tuple
    #: whether every input dim but the channels is free (``export_graph``); False: only the batch (the exporter
    #: could not export the graph with free spatial sizes, e.g. an adaptive pooling to a size other than 1)
    spatial_free: bool = False

    def __repr__(self) -> str:
        ops = [n.op_type for n in self.model.graph.node]
        return f"Exported({len(ops)} nodes, {ops.count('DequantizeLinear')} DequantizeLinear, inputs {self.in_spec})"


def free_axes(example: torch.Tensor, dynamic: bool, name: str = "input") -> dict[int, str]:
    """Input axes left free: the batch (dim 0) of a float input; every axis of an integer one (token ids, attention
    masks: batch and sequence length, which a text model takes at any size). Free spatial dims of a float input cost ORT
    its shape-specific planning: measured on full-size MobileNetV2 at batch 1, 2 threads, 15.8 vs 8.2 ms (ResNet-18
    19.6 vs 13.8 ms; a loaded machine, see docs/design.md)."""
    if not dynamic or example.dim() == 0:
        return {}
    if not example.dtype.is_floating_point:
        return {d: "batch" if d == 0 else f"{name}_d{d}" for d in range(example.dim())}
    return {0: "batch"}


@contextlib.contextmanager
def _quiet_stdout():
    """Drop what C++ code writes to the process's stdout meanwhile: the TorchScript exporter of torch 2.13 dumps the
    whole TorchScript graph there when it meets an op it cannot export ("Torch IR graph at exception", its logging
    switched on by a truthiness bug in ``setup_onnx_logging``), and ``convert`` may try several exports of one model
    (``regions.lower_traced``): the exception says what failed."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (some embedded interpreters)
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def engine_axes(example: torch.Tensor) -> dict[int, str]:
    """Input axes the shared export leaves free: all but the channels (dim 1 of a float input of rank >= 2), as
    OpenVINO compiles it (``openvino.free_dims``)."""
    fixed = 1 if example.dtype.is_floating_point and example.dim() >= 2 else None
    return {d: f"d{d}" for d in range(example.dim()) if d != fixed}


_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qcast_shared_export", default=None)


@contextlib.contextmanager
def shared_export():
    """Within it, ``export_graph`` exports each QDQ graph once (``backend='auto'`` lowers one graph for ONNX Runtime
    and OpenVINO, which both start from this export)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def export_graph(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict | None = None) -> Exported:
    """The QDQ graph as canonical QDQ ONNX, in memory, every input dim free but the channels (batch only where the
    exporter cannot do that). Exported once per graph within ``shared_export()``; treat the model as read-only."""
    import onnx

    shared = _SHARED.get()
    shapes = tuple((tuple(t.shape), t.dtype) for t in flatten((example_args, example_kwargs or {}))[0])
    key = (id(qdq), shapes)
    if shared is not None and key in shared:
        return shared[key][1]
    check_traceable(qdq, "onnxruntime")
    gm = mark_int8_weights(qdq)
    traced_sizes(gm, "onnxruntime")
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*example_args, **(example_kwargs or {}))
    bound.apply_defaults()
    tensors, in_spec = flatten(bound.args)
    with torch.no_grad():
        outs, out_spec = flatten(gm(*bound.args))
    names = [f"input{i}" for i in range(len(tensors))]
    error = None
    for spatial_free in (True, False):
        if spatial_free and not _free_sizes_exportable(qdq):
            continue
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
                warnings.simplefilter("ignore")  # TorchScript tracer warnings about the QDQ graph's Python
                torch.onnx.export(FlatIO(gm, in_spec).eval(), tuple(tensors), buffer, dynamo=False,
                                  opset_version=OPSET, input_names=names, do_constant_folding=True,
                                  output_names=[f"output{i}" for i in range(len(outs))],
                                  dynamic_axes={n: engine_axes(t) if spatial_free else free_axes(t, True, n)
                                                for n, t in zip(names, tensors)})
            break
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds of errors
            lacked = re.findall(r"operator '(aten::\w+)'", str(e))
            if lacked:  # no export rule for this op: convert runs it in torch between engine stages (regions.py)
                raise unconverted("torch.onnx.export (opset 17)", lacked, "no ONNX export rule") from e
            error = e
    else:
        raise UnsupportedError(f"torch.onnx.export could not export the QDQ graph ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}); use backend='torch' or "
                               "'openvino'") from error
    model = onnx.load_from_string(buffer.getvalue())
    for i, out in enumerate(model.graph.output):  # output sizes follow the inputs' free sizes
        for d, dim in enumerate(out.type.tensor_type.shape.dim):
            dim.dim_param = f"output{i}_d{d}"
    exported = Exported(canonicalize(model), signature, in_spec, out_spec, spatial_free)
    if shared is not None:
        shared[key] = (qdq, exported)  # the graph is held too: its id cannot be reused by another graph meanwhile
    return exported


def _free_sizes_exportable(qdq: fx.GraphModule) -> bool:
    """False for a graph with an adaptive pooling to a size other than 1 (VGG's to 7x7): the exporter has no ONNX form
    for it with free spatial sizes, and a failed export prints its whole TorchScript graph on stdout (from C++), so such
    graphs are exported with a free batch only, without a failing first try. Other failures still fall back."""
    import torch.nn.functional as F

    pools = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
    functions = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                 F.adaptive_max_pool2d, F.adaptive_max_pool3d)
    for n in qdq.graph.nodes:
        size = None
        if n.op == "call_module" and isinstance(m := qdq.get_submodule(n.target), pools):
            size = m.output_size
        elif n.op == "call_function" and n.target in functions:
            size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        if size is not None and any(s != 1 for s in (size if isinstance(size, (tuple, list)) else (size,))):
            return False
    return True


def to_onnx(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict | None = None,
            dynamic: bool = True) -> Exported:
    """The QDQ graph as canonical QDQ ONNX for an ONNX Runtime session, in memory: ``export_graph``'s model (a copy)
    with every input dim but the batch (``dynamic=False``: every dim) pinned to the example's."""
    import onnx

    exported = export_graph(qdq, example_args, example_kwargs)
    model = onnx.ModelProto()
    model.CopyFrom(exported.model)
    bound = exported.signature.bind(*example_args, **(example_kwargs or {}))
    bound.apply_defaults()
    tensors, _ = flatten(bound.args)
    for value, t in zip(model.graph.input, tensors):
        free = free_axes(t, dynamic)
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if d in free:
                dim.dim_param = free[d]
            else:
                dim.dim_value = t.shape[d]
    if not dynamic:
        for out in model.graph.output:
            for dim in out.type.tensor_type.shape.dim:
                dim.ClearField("dim_param")
    return Exported(model, exported.signature, exported.in_spec, exported.out_spec, False)


def export_qdq_onnx(qdq_gm: fx.GraphModule, example_args: tuple, path: str | os.PathLike,
                    dynamic_batch: bool = True) -> str:
    """Write the QDQ graph ``qdq_gm`` (``qcast.convert.to_qdq``) to ``path`` as canonical QDQ ONNX (opset 17):
    int8 weight initializers and int32 biases through DequantizeLinear, Q/DQ on activations, one consumer per
    DQ, what ONNX Runtime's ``quantize_static`` emits and its QDQ fusions take. ``dynamic_batch``: the batch dim
    free (the other dims are the example's). Inputs are named ``input0, input1, ...`` in the order of ``example_args`` (nested
    values flattened); outputs ``output0, ...`` likewise. Returns the path."""
    import onnx

    exported = to_onnx(qdq_gm, tuple(example_args), {}, dynamic_batch)
    onnx.save(exported.model, os.fspath(path))
    return os.fspath(path)
