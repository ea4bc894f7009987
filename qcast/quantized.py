"""The quantized representation (QDQ graph) and the executable int8 model a backend lowers it to."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError, QcastError
from .observers import QParams


class QDQ(nn.Module):
    """An explicit quantize->dequantize point with its params: the backend-independent int8 edge.

    Running a QDQ graph in float simulates the int8 model (used as an oracle); a backend lowers it.
    """

    qcast_leaf = True

    def __init__(self, qparams: QParams, name: str = ""):
        super().__init__()
        self.qparams, self.name = qparams, name

    def forward(self, x):
        return self.qparams.fake_quant(x)

    def extra_repr(self):
        return f"{self.name}: {self.qparams!r}"


@dataclass(frozen=True)
class OpInfo:
    """One op call site of a quantized model, as ``qcast.explain`` reports it."""

    name: str
    op: str
    precision: str
    engine: str
    reason: str

    def __repr__(self) -> str:
        return f"OpInfo({self.name!r}, {self.op}, {self.precision}, {self.engine}, {self.reason!r})"


class QuantizedModel(nn.Module):
    """An ordinary nn.Module running int8 kernels. ``qcast.explain(m)`` lists what runs how.

    ``graph_module``: what the backend lowered the QDQ graph to (an fx.GraphModule of PyTorch int8 kernels on the
    torch backend, a compiled engine behind an nn.Module on the others)."""

    def __init__(self, graph_module: nn.Module, records: tuple[OpInfo, ...], meta: dict):
        super().__init__()
        self.graph_module = graph_module
        self.qcast_records = tuple(records)
        self.qcast_meta = dict(meta)
        # an int8 model is for inference only: hand it out (from convert, quantize and load) in eval mode
        self.eval()

    def forward(self, *args, **kwargs):
        try:
            return self.graph_module(*args, **kwargs)
        except QcastError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into an error that names the layer
            if not isinstance(self.graph_module, fx.GraphModule):  # another backend's executable: no graph to replay
                raise
            raise self._diagnose(args, kwargs, e) from e

    def _diagnose(self, args, kwargs, original: Exception) -> QcastError:
        from .data import describe, tensors_in

        for path, t in tensors_in((args, kwargs)):
            if t.device.type != "cpu":
                return InputError(f"input{path} is on {t.device}; this int8 model runs on CPU: pass CPU tensors")
        failing = {"node": None}

        class _Find(fx.Interpreter):
            def run_node(self, n):
                failing["node"] = n
                return super().run_node(n)

        try:
            _Find(self.graph_module).run(*args, *kwargs.values())
        except Exception:  # noqa: BLE001 - we only want the node that fails
            pass
        n = failing["node"]
        where = n.meta.get("qcast_name", n.name) if n is not None else "the model"
        op = n.meta.get("qcast_op", "") if n is not None else ""
        calib = self.qcast_meta.get("example_input", "")
        return InputError(
            f"the input {describe(args, kwargs)} does not fit the model at {where}"
            + (f" ({op})" if op else "") + f": {type(original).__name__}: {str(original).splitlines()[0] if str(original) else ''}."
            + (f" The model was prepared with {calib}; other batch sizes and spatial sizes are fine, but rank, "
               "channels and dtype must match." if calib else ""))

    def extra_repr(self) -> str:
        n8 = sum(r.precision == "int8" for r in self.qcast_records)
        return f"qcast int8 model: {n8}/{len(self.qcast_records)} ops int8, backend={self.qcast_meta.get('backend')}"


def explain(qmodel) -> list[OpInfo]:
    """One row per op call site, in execution order: name, op, precision, engine, reason."""
    records = getattr(qmodel, "qcast_records", None)
    if records is None:
        from .errors import UnsupportedError
        raise UnsupportedError(f"explain() needs a model returned by qcast.quantize/convert/load, got {type(qmodel).__name__}")
    return list(records)
