"""The quantized representation (QDQ graph) and the executable int8 model a backend lowers it to."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import WHERE_IT_RUNS, InputError, QcastError, UnsupportedError
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

    def __init__(self, graph_module: nn.Module, records: tuple[OpInfo, ...], meta: dict, qdq: fx.GraphModule | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.qcast_records = tuple(records)
        self.qcast_meta = dict(meta)
        # the backend-neutral QDQ graph it was lowered from (convert, or load of a format-3 file; None for older files):
        # what save() writes, what export() converts and what shapes an engine cannot take run on (_on_torch). Not a
        # submodule: no state_dict entries, no repr.
        self.__dict__["qcast_qdq"] = qdq
        # an int8 model is for inference only: hand it out (from convert, quantize and load) in eval mode
        self.eval()

    def forward(self, *args, **kwargs):
        _check_inputs(args, kwargs)
        try:
            # forward, not __call__: GraphModule.__call__ prints its generated code's traceback to stderr on any
            # error, before qcast's own InputError says what went wrong
            return self.graph_module.forward(*args, **kwargs)
        except InputError as e:
            if getattr(e, "engine_shape", False) and self.qcast_qdq is not None:
                return self._on_torch(e)(*args, **kwargs)
            raise
        except QcastError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into an error that names the layer
            if not isinstance(self.graph_module, fx.GraphModule):  # another backend's executable: no graph to replay
                raise
            raise self._diagnose(args, kwargs, e) from e

    def _on_torch(self, why: InputError):
        """The QDQ graph on the torch backend, lowered once, for input shapes the engine's compiled model does not take
        (ONNX Runtime fixes all but the batch; OpenVINO the channels, i.e. dim 1, which is a sequence length for
        (batch, tokens, features) inputs): the model still takes every input the float model takes, as the API says,
        and the torch backend names what truly does not fit."""
        if self.__dict__.get("_qcast_torch") is None:
            import warnings
            warnings.warn(f"{why} -> running such inputs on the torch backend (lowered once now); quantize with an "
                          "input of this shape, or backend='torch', to avoid the switch", UserWarning, stacklevel=3)
        return self.on_torch()

    def on_torch(self) -> "QuantizedModel":
        """This model's QDQ graph lowered to the torch backend (once, then kept): itself when it already runs there.
        What ``compare()`` replays layer by layer when an engine runs the model as one compiled graph."""
        if self.qcast_meta.get("backend", "torch") == "torch":
            return self
        torch_model = self.__dict__.get("_qcast_torch")
        if torch_model is None:
            if self.qcast_qdq is None:
                raise UnsupportedError("this model has no QDQ graph to lower to the torch backend (a file of an earlier "
                                       "qcast version); quantize the model again")
            from .config import QuantConfig
            from .convert import lower
            gm, rows, _, _ = lower(self.qcast_qdq, QuantConfig.from_dict(self.qcast_meta["config"]),
                                   self.qcast_meta.get("opaque", {}), "torch")
            # a QuantizedModel of its own: its forward names the layer and what it expected when an input truly does
            # not fit
            torch_model = QuantizedModel(gm, rows, {**self.qcast_meta, "backend": "torch"}, self.qcast_qdq)
            self.__dict__["_qcast_torch"] = torch_model
        return torch_model

    # -- moving the model: int8 kernels live on the CPU, and their packed weights cannot be cast --------------------
    def to(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            self._refuse(f"to({torch.device(device)})")
        if dtype is not None and dtype != torch.float32:
            raise UnsupportedError(f"qmodel.to({dtype}): the int8 model takes and returns float32 tensors; its "
                                   "weights are int8 already. Keep it as it is and cast its outputs if needed")
        return super().to(*args, **kwargs)

    def cuda(self, device=None):
        self._refuse(f"cuda({'' if device is None else device})")

    def xpu(self, device=None):
        self._refuse(f"xpu({'' if device is None else device})")

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def double(self):
        return self.to(torch.float64)

    @staticmethod
    def _refuse(call: str):
        raise UnsupportedError(f"qmodel.{call}: {WHERE_IT_RUNS}.")

    def _diagnose(self, args, kwargs, original: Exception) -> QcastError:
        """The InputError for a call that failed inside the graph: the op site it failed at, and what it expected
        (a kernel's own ``input_mismatch``: channels, features) in place of the engine's message where it can."""
        from .data import describe, tensors_in

        for path, t in tensors_in((args, kwargs)):
            if t.device.type != "cpu":
                return InputError(f"input{path} is on {t.device}. {WHERE_IT_RUNS}: pass x.cpu()")
        failing: dict = {"node": None, "args": ()}

        class _Find(fx.Interpreter):
            def run_node(self, n):
                failing["node"] = n
                failing["args"], _ = self.fetch_args_kwargs_from_env(n)
                return super().run_node(n)

        try:
            _Find(self.graph_module).run(*args, *kwargs.values())
        except Exception:  # noqa: BLE001 - we only want the node that fails
            pass
        n = failing["node"]
        where = n.meta.get("qcast_name", n.name) if n is not None else "the model"
        op = n.meta.get("qcast_op", "") if n is not None else ""
        calib = self.qcast_meta.get("example_input", "")
        first = failing["args"][0] if failing["args"] else None
        if n is not None and n.target is torch.quantize_per_tensor and isinstance(first, torch.Tensor) \
                and first.dtype != torch.float32:
            return InputError(f"the input {describe(args, kwargs)} reaches an int8 op as {first.dtype}: the model was "
                              f"calibrated with {calib or 'float32 inputs'} and quantizes float32 values. Pass "
                              "x.float() (token ids and masks stay integer where the model itself reads them)")
        check = getattr(attr_or_none(self.graph_module, n.target), "input_mismatch", None) \
            if n is not None and n.op == "call_module" else None
        detail = check(*failing["args"]) if check is not None else None
        if detail is None:
            detail = f"{type(original).__name__}: {str(original).splitlines()[0] if str(original) else ''}"
        return InputError(
            f"the input {describe(args, kwargs)} does not fit the model at {where}" + (f" ({op})" if op else "")
            + f": {detail}." + (f" The model was prepared with {calib}; other batch sizes are fine, and other spatial "
                                "sizes or sequence lengths unless a layer's width depends on them (a flatten before a "
                                "linear), but rank, channels and dtype must match." if calib else ""))

    def extra_repr(self) -> str:
        n8 = sum(r.precision == "int8" for r in self.qcast_records)
        return f"qcast int8 model: {n8}/{len(self.qcast_records)} ops int8, backend={self.qcast_meta.get('backend')}"


def attr_or_none(root: nn.Module, target: str):
    try:
        return root.get_submodule(target)
    except AttributeError:
        return None


def _total(t: torch.Tensor) -> float:
    """The sum of a float tensor, on this thread: numpy's for float32/float64 (a torch reduction wakes torch's OpenMP
    pool, whose spinning threads then slowed OpenVINO's and ONNX Runtime's own pools on the same cores: ResNet-18's
    OpenVINO call 6.7 -> 10.7 ms, docs/design.md), torch's for the dtypes numpy lacks."""
    if t.dtype in (torch.float32, torch.float64) and not t.requires_grad:
        return float(np.add.reduce(t.reshape(-1).numpy()))
    return t.sum().item()


def _check_inputs(args: tuple, kwargs: dict) -> None:
    """InputError for an input on another device than the CPU, or with a NaN/Inf: int8 kernels have no NaN, so the
    int8 model would hide what the float model shows (NaN out). One sum per floating-point input tensor (finite sum =>
    finite data); the exact count only when the sum is not finite. Measured in docs/design.md: ~0.2% of a
    MobileNetV2 call at batch 1."""
    for key, t in itertools.chain(enumerate(args), kwargs.items()):
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type != "cpu":
            raise InputError(f"input {key!r} is on {t.device}. {WHERE_IT_RUNS}: pass x.cpu()")
        if t.is_floating_point() and not math.isfinite(_total(t)):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):  # (a sum can overflow to inf on finite data)
                where = f"input {key!r}" if isinstance(key, str) else f"input {key}"
                rows = bad.flatten(1).any(1).nonzero().flatten().tolist() if t.dim() > 1 else []
                raise InputError(
                    f"{where} (Tensor{list(t.shape)}) contains {int(bad.sum())} NaN/Inf value(s)"
                    + (f" in batch row(s) {rows[:8]}{' ...' if len(rows) > 8 else ''}" if rows else "")
                    + ". The float model would return NaN/Inf here; int8 kernels cannot represent them and would "
                    "return finite numbers instead, so qcast stops: clean or drop these inputs (torch.nan_to_num, "
                    "or torch.isfinite(x) to find them)")


def explain(qmodel) -> list[OpInfo]:
    """One row per op call site, in execution order: name, op, precision, engine, reason."""
    records = getattr(qmodel, "qcast_records", None)
    if records is None:
        from .errors import UnsupportedError
        raise UnsupportedError(f"explain() needs a model returned by qcast.quantize/convert/load, got {type(qmodel).__name__}")
    return list(records)
