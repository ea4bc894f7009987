"""LSTM / GRU: dynamic int8 (int8 weights, activations quantized at run time), PyTorch's
``torch.ao.nn.quantized.dynamic.LSTM/GRU`` (``quantized::quantized_lstm`` / ``quantized_gru``).

An ``nn.LSTM``/``nn.GRU`` is one ``call_module`` leaf of the fx graph whose value is a tuple (``(out, (h, c))`` /
``(out, h)``) unpacked by ``getitem`` nodes; its kernel is a ``weight_only`` entry: float in, float out, nothing
calibrated. Each gate GEMM (``W_ih x`` and ``W_hh h`` of every layer and direction) runs as fbgemm's dynamic linear:
the input (and the hidden state, every time step) quantized to u8 with a range measured at run time, the weights
per-output-channel symmetric int8 (``per_channel_dynamic_qconfig``), int32 accumulation, fp32 out; the gates'
sigmoid/tanh and the cell update run in fp32. A recurrent state's range changes every step, which a calibrated
static range could not follow: dynamic quantization is what PyTorch and the engines offer for recurrent layers.

Measured against the float layer (torch 2.13, random init, 5 steps x 3 sequences, 16 -> 32): LSTM 38-41 dB,
2-layer bidirectional batch_first LSTM 38-42 dB, GRU 36-41 dB, with or without an initial state (the tests pin the
floors on every configuration). Per-channel weights measured within 1.5 dB of per-tensor ones on random weights;
trained weights have uneven channels, where per-channel is the safer grid.

Not int8 (``check`` says why): ``proj_size > 0`` (the dynamic kernels have no projection), a ``PackedSequence``,
unbatched (2-D) or non-float32 input, non-float32 weights. A layer with ``bias=False`` gets zero biases (torch.ao's
dynamic modules require them). The engines (OpenVINO, ONNX Runtime)
get the float layer in the QDQ graph and run it in float: ``explain()`` says so on those backends.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .base import KernelImpl, PackedKernelModule, input_meta, kernel_module
from .engines import available, engine_scope
from .registry import register

#: the int8 engine the dynamic recurrent kernels are packed for (its dynamic linear accumulates in int32)
ENGINE = "fbgemm"
_FLOAT = {"lstm": nn.LSTM, "gru": nn.GRU}


def _dynamic_classes():
    import torch.ao.nn.quantized.dynamic as nnqd
    return {"lstm": nnqd.LSTM, "gru": nnqd.GRU}


@kernel_module
class QRecurrentDynamic(PackedKernelModule):
    """A float ``nn.LSTM``/``nn.GRU`` run by PyTorch's dynamic int8 module (``torch.ao.nn.quantized.dynamic``).

    It keeps the float weights it was built from (``spec()``: the kernel is rebuilt from them bit for bit, since
    quantizing them is deterministic; 1.25x the float layer's memory in all) and the dynamic module, packed for
    fbgemm."""

    def __init__(self, mode: str, config: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        if mode not in _FLOAT:
            raise ValueError(f"unknown recurrent mode {mode!r}; one of {sorted(_FLOAT)}")
        self.mode, self.config = mode, dict(config)
        names = sorted(tensors)
        self._names = names
        for k in names:
            self.register_buffer(k, tensors[k].detach().float().clone())
        # torch.ao's dynamic modules require biases: a layer without them gets zero biases (the same function)
        float_layer = _FLOAT[mode](**dict(self.config, bias=True))
        state = {k: getattr(self, k) for k in names}
        for k, v in float_layer.state_dict().items():
            state.setdefault(k, torch.zeros_like(v))
        float_layer.load_state_dict(state)
        float_layer.eval()
        from torch.ao.quantization import per_channel_dynamic_qconfig
        float_layer.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings(), engine_scope(ENGINE):
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            self.q = _dynamic_classes()[mode].from_float(float_layer)

    @classmethod
    def from_float(cls, layer: nn.Module) -> "QRecurrentDynamic":
        mode = "lstm" if isinstance(layer, nn.LSTM) else "gru"
        return cls(mode, layer_config(layer), {k: v for k, v in layer.state_dict().items()})

    @classmethod
    def from_spec(cls, config: dict, tensors: dict):
        config = dict(config)
        mode = config.pop("mode")
        return cls(mode, config, tensors)

    def forward(self, x, hx=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.q(x, hx)

    def spec(self):
        return dict(mode=self.mode, **self.config), {k: getattr(self, k) for k in self._names}

    def __deepcopy__(self, memo):
        config, tensors = self.spec()
        return type(self).from_spec(copy.deepcopy(config), {k: v.clone() for k, v in tensors.items()})

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.mode}: {c['input_size']} -> {c['hidden_size']}, layers={c['num_layers']}"
                f"{', bidirectional' if c['bidirectional'] else ''}{', batch_first' if c['batch_first'] else ''}, "
                "int8 weights (per channel), activations quantized at run time")


def layer_config(layer: nn.Module) -> dict:
    """The constructor arguments of an ``nn.LSTM``/``nn.GRU`` (eval: dropout does nothing)."""
    return dict(input_size=int(layer.input_size), hidden_size=int(layer.hidden_size),
                num_layers=int(layer.num_layers), bias=bool(layer.bias), batch_first=bool(layer.batch_first),
                bidirectional=bool(layer.bidirectional))


@register("lstm", "gru", kind="weight_only", engines=(ENGINE,),
          notes="dynamic int8: per-channel s8 weights, input and hidden state quantized at run time for each gate "
                "GEMM (torch.ao.nn.quantized.dynamic), gates in fp32; float in and out")
class RecurrentKernel(KernelImpl):
    @staticmethod
    def check(node, ctx):
        if node.op != "call_module":
            return "a functional recurrent call has no int8 kernel (an nn.LSTM / nn.GRU module has)"
        m = ctx.module(node)
        if type(m) not in (nn.LSTM, nn.GRU):
            return f"{type(m).__name__} is not a plain nn.LSTM / nn.GRU; runs in float"
        if getattr(m, "proj_size", 0):
            return "an LSTM with proj_size > 0: PyTorch's dynamic int8 LSTM has no projection; runs in float"
        if ENGINE not in available():
            return f"the dynamic int8 recurrent kernels need the {ENGINE} engine, not in this PyTorch build"
        if any(p.dtype != torch.float32 for p in m.parameters()):
            return "its weights are not float32; runs in float"
        if set(node.kwargs) - {"hx"}:
            return f"called with keyword arguments {sorted(node.kwargs)}; runs in float"
        meta = input_meta(node, ctx)
        if meta is None or not meta.is_float:
            return ("its input is not a floating-point tensor (a PackedSequence?): the dynamic int8 kernel takes "
                    "padded tensors; runs in float")
        if meta.dtype != torch.float32:
            return f"its input is {meta.dtype}; the dynamic int8 kernel takes float32; runs in float"
        if len(meta.shape) != 3:
            return (f"its input has {len(meta.shape)} dims (unbatched); the dynamic int8 kernel takes batched 3-D "
                    "input; runs in float")
        return None

    @staticmethod
    def quant_inputs(node):
        return []  # quantized at run time by the kernel: nothing to observe

    @staticmethod
    def engine(node, ctx):
        return ENGINE

    @staticmethod
    def note(node, ctx):
        return "dynamic int8: input and hidden state quantized at run time per gate GEMM, fp32 gates"

    @staticmethod
    def build(node, ctx):
        args = tuple(node.args)
        if "hx" in node.kwargs:  # self.lstm(x, hx=state)
            args = (args[0], node.kwargs["hx"])
        return QRecurrentDynamic.from_float(ctx.module(node)), args
