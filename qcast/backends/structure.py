"""Flatten a nested value (tensor, tuple/list/namedtuple, dict, dataclass, other constants) into its tensors and a
spec, and rebuild it: engines (OpenVINO, ONNX Runtime) take and return flat lists of tensors.

A spec is a plain nested tuple, so two specs compare with ``==`` (the inputs of a call must match the spec the model
was compiled with): ``("tensor", dtype, rank)``, ``("seq", type, (specs))``, ``("dict", type, keys, (specs))``,
``("dataclass", type, names, (specs))`` or ``("const", value)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn as nn


def flatten(value: Any) -> tuple[list[torch.Tensor], tuple]:
    tensors: list[torch.Tensor] = []
    return tensors, _flatten(value, tensors)


def _flatten(v: Any, out: list) -> tuple:
    if isinstance(v, torch.Tensor):
        out.append(v)
        return ("tensor", v.dtype, v.dim())
    if isinstance(v, (tuple, list)):
        return ("seq", type(v), tuple(_flatten(x, out) for x in v))
    if isinstance(v, dict):
        return ("dict", type(v), tuple(v), tuple(_flatten(x, out) for x in v.values()))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        names = tuple(f.name for f in dataclasses.fields(v))
        return ("dataclass", type(v), names, tuple(_flatten(getattr(v, n), out) for n in names))
    return ("const", v)


def unflatten(spec: tuple, tensors) -> Any:
    return _build(spec, iter(tensors))


def _build(spec: tuple, it: Iterator) -> Any:
    kind = spec[0]
    if kind == "tensor":
        return next(it)
    if kind == "const":
        return spec[1]
    if kind == "seq":
        items = [_build(s, it) for s in spec[2]]
        cls = spec[1]
        return cls(*items) if hasattr(cls, "_fields") else cls(items)
    if kind == "dict":
        return spec[1](zip(spec[2], [_build(s, it) for s in spec[3]]))
    return spec[1](**dict(zip(spec[2], [_build(s, it) for s in spec[3]])))


class FlatIO(nn.Module):
    """What an engine's converter traces: flat tensors in, flat tensors out (a tensor, tuple, dict or dataclass
    output is rebuilt around the compiled model from ``out_spec``)."""

    def __init__(self, gm: nn.Module, in_spec: tuple):
        super().__init__()
        self.gm, self.in_spec = gm, in_spec

    def forward(self, *tensors):
        return tuple(flatten(self.gm(*unflatten(self.in_spec, tensors)))[0])


def flat_inputs(signature, in_spec: tuple, args: tuple, kwargs: dict, engine: str) -> list[torch.Tensor]:
    """The tensors of a call, bound like the float model's forward and flattened as the engine's model was built
    (``in_spec``); InputError naming the mismatch otherwise."""
    from ..errors import InputError
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"the inputs do not fit the model's forward{signature}: {e}") from None
    bound.apply_defaults()
    tensors, spec = flatten(bound.args)
    if spec != in_spec:
        shapes = lambda sp: str(sp).replace("'", "")  # noqa: E731
        raise InputError(f"the {engine} model was built for inputs shaped like {shapes(in_spec)}, got {shapes(spec)}: "
                         "pass the same kinds of inputs (tensors in the same places, the same non-tensor arguments) "
                         "as at calibration, or use backend='torch'")
    return tensors


def shape_error(engine: str, expected: str, tensors, free: str, detail: str = ""):
    """The InputError of an engine wrapper for input shapes its compiled model does not take, marked ``engine_shape``:
    ``QuantizedModel`` then runs such inputs on the torch backend instead of raising it (``_on_torch``)."""
    from ..errors import InputError
    got = ", ".join(str(tuple(t.shape)) for t in tensors)
    err = InputError(f"the input shape(s) {got} do not fit the {engine} model, which takes {expected} ('?' is any size: "
                     f"{free})" + (f": {detail}" if detail else ""))
    err.engine_shape = True
    return err



def traced_sizes(gm: nn.Module, engine: str) -> None:
    """Make a torch.export-captured graph's sizes follow its inputs when an engine's converter traces it (in place).

    Such a graph reads input sizes with ``aten.sym_size.int(x, d)`` (MiniLM: the batch and the sequence length, for
    ``view``/``expand``/``arange`` and the attention mask). TorchScript's tracer, which OpenVINO's and ONNX Runtime's
    converters run, does not record that op: it returns a plain int, so the traced model kept the example's batch and
    length as constants (MiniLM calibrated at 4x16 failed in ONNX Runtime at 2x16: 'indices element out of data
    bounds'). ``x.size(d)`` is recorded (``aten::size``, a 0-dim tensor while tracing), so the sizes stay symbolic in
    the engine's graph; ATen ops that take such a size (``aten.arange``, ``aten.slice``, ``aten.expand``...) only take
    Python ints, so they become their ``torch`` / ``Tensor`` counterparts, which take the traced size. A size-reading
    ATen op with no counterpart is an UnsupportedError: traced, it would freeze the example's shape."""
    import operator

    import torch.fx as fx

    from ..errors import UnsupportedError

    if not isinstance(gm, fx.GraphModule):
        return
    sized: set[fx.Node] = set()  # nodes holding an input size, or an int computed from one
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default):
            node.op, node.target = "call_method", "size"
            sized.add(node)
            changed = True
            continue
        reads: list[fx.Node] = []
        fx.map_arg((node.args, node.kwargs), lambda a: reads.append(a) if a in sized else None)
        if not reads:
            continue
        if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
            sized.add(node)  # int arithmetic on sizes (traced 0-dim tensors do the same arithmetic)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if not _python_counterpart(node):
                raise UnsupportedError(
                    f"the {engine} backend traces the graph with TorchScript, which would freeze the input size that "
                    f"{node.target} (node {node.meta.get('qcast_name', node.name)!r}) reads to the example's; there "
                    "is no torch counterpart qcast knows for it. Use backend='torch'")
            changed = True
    if changed:
        gm.recompile()


def _python_counterpart(node) -> bool:
    """Rewrite an ATen call to its ``torch`` function or ``Tensor`` method (same arguments), or a slice to indexing;
    False when there is none."""
    import operator

    name = node.target.overloadpacket.__name__
    if name == "slice":  # aten.slice.Tensor(x, dim=0, start=None, end=None, step=1) -> x[:, ..., start:end:step]
        x, dim, start, end, step = [node.kwargs.get(k, v) for k, v in zip(
            ("self", "dim", "start", "end", "step"), tuple(node.args) + (None, 0, None, None, 1)[len(node.args):])]
        lead = (slice(None),) * dim if dim >= 0 else (Ellipsis,) + (slice(None),) * (-dim - 1)
        node.target, node.args, node.kwargs = operator.getitem, (x, lead + (slice(start, end, step),)), {}
        return True
    kwargs = {k: v for k, v in node.kwargs.items() if not (k == "implicit" and v is False)}  # aten.expand's flag
    if node.args and isinstance(node.args[0], torch.fx.Node) and isinstance(getattr(torch.Tensor, name, None),
                                                                           type(torch.Tensor.size)):
        node.op, node.target, node.kwargs = "call_method", name, kwargs
        return True
    if callable(getattr(torch, name, None)):
        node.target, node.kwargs = getattr(torch, name), kwargs
        return True
    return False
