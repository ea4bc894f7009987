"""qcast's QDQ graph as canonical QDQ ONNX (``export_qdq_onnx``): the pattern ONNX Runtime fuses into int8 kernels.

Route: ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``) of the QDQ graph with each int8 conv/linear
weight read through ``fake_quantize_per_channel_affine`` (``mark_int8_weights``, shared with the OpenVINO
backend), inputs and outputs flattened (``structure.FlatIO``); then ``canonical.canonicalize``.
"""
from __future__ import annotations

import inspect
import io
import os
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from ...errors import UnsupportedError
from .. import check_traceable
from ..openvino import mark_int8_weights
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


def to_onnx(qdq: fx.GraphModule, example_args: tuple, example_kwargs: dict | None = None,
            dynamic: bool = True) -> Exported:
    """The QDQ graph as canonical QDQ ONNX, in memory."""
    import onnx

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
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings about the QDQ graph's Python
            torch.onnx.export(FlatIO(gm, in_spec).eval(), tuple(tensors), buffer, dynamo=False, opset_version=OPSET,
                              input_names=names, do_constant_folding=True,
                              output_names=[f"output{i}" for i in range(len(outs))],
                              dynamic_axes={n: free_axes(t, dynamic, n) for n, t in zip(names, tensors)})
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds of errors
        raise UnsupportedError(f"torch.onnx.export could not export the QDQ graph ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); use backend='torch' or 'openvino'") from e
    model = onnx.load_from_string(buffer.getvalue())
    for i, out in enumerate(model.graph.output):  # output sizes follow the inputs' free sizes
        for d, dim in enumerate(out.type.tensor_type.shape.dim):
            if dynamic:
                dim.dim_param = f"output{i}_d{d}"
    return Exported(canonicalize(model), signature, in_spec, out_spec)


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
