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
