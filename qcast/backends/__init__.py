"""Backends: who executes the quantized (QDQ) graph that ``convert`` produces.

A backend is one ``Backend`` entry in a private table, filled by ``@register_backend(name, ...)`` on its
``lower`` function. Each backend lives in its own subpackage (``qcast/backends/<name>/``), imported when the table
is first read; that import must stay cheap: the engine itself (``openvino``...) is imported only inside ``lower``,
so ``import qcast`` never pays for it and ``available()`` only asks ``importlib.util.find_spec``.

``lower(qdq, config, example_args, example_kwargs) -> nn.Module``: the executable model. It takes and returns
torch tensors, with the float model's output structure. ``explain(lowered, rows) -> rows``: the ``explain()`` rows
as this backend runs them (e.g. the precision OpenVINO actually compiled each conv to).

``kernels`` names the kernel table (``qcast/backends/torch/kernels``) that *plans* the graph: which ops are int8 and with which
params. OpenVINO executes the plan the torch kernels make (same QDQ graph, same int8 ops), so a model prepared for
one can be converted for the other.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UnsupportedError
from .context import dynamic_linears  # noqa: F401 (part of this package's interface)

#: subpackages that register a backend when imported (cheap imports: no engine)
BACKEND_MODULES = ("qcast.backends.torch", "qcast.backends.openvino", "qcast.backends.onnxruntime")


def _same_rows(lowered, rows):
    return tuple(rows)


@dataclass(frozen=True)
class Backend:
    """One executor of the QDQ graph. ``requires``: the package it needs (None: nothing beyond torch).
    ``conv_add``: whether it runs a conv followed by a residual add as one int8 op (``prepare`` fuses the add into
    the conv only then; otherwise the conv output gets its own quantization params and the add is an int8 op):
    ``True``/``False``, or a rule ``engine -> bool`` (the torch backend: only oneDNN has conv2d_add). A backend that
    executes another's plan (``kernels``) fuses only where both allow it.
    ``traces``: whether its lowering traces the graph once (the engines: TorchScript under their converters), so that
    uncaptured regions must run in torch between the parts it lowers (``regions.lower_split``).
    ``float_out``: the ops whose int8 kernel can write fp32 on this engine (``True``: every op the kernel table gives
    such a kernel). Placement (``plan.place_outputs``) gives an int8 op that no int8 op reads an fp32 output only
    where the engine has one; a conv/linear without one keeps its requantized output, dequantized after it (ONNX
    Runtime: no QLinearConv with a float output, only QGemm; its float Conv on dequantized weights is slower).
    ``weight_only``: the ``weight_only`` ops of the kernel table (int8 weights, activations quantized at run time:
    per-token linears, LSTM/GRU, embeddings) that this engine runs int8 itself (``True``: all of them); the QDQ graph
    has no quantize/dequantize for such ops, so on an engine the others run in float, and its explain() says so.
    ``torch_ops``: ops the engine is not given (its converter fails on them, measured): they run in torch, with the
    torch kernel table's int8 kernel where it has a ``weight_only`` one, between the engine's stages
    (``regions.lower_traced``). ``qcast ops`` prints what these declare, per backend (``runs``)."""

    name: str
    lower: Callable = field(repr=False)
    requires: str | None = None
    install_hint: str = ""
    kernels: str = "torch"
    explain: Callable = field(default=_same_rows, repr=False)
    conv_add: bool | Callable[[str], bool] = True
    traces: bool = True
    float_out: bool | tuple[str, ...] = True
    weight_only: bool | tuple[str, ...] = True
    torch_ops: tuple[str, ...] = ()

    def runs(self, op: str, kind: str) -> str:
        """How this backend runs a kernel-table entry (``op``, ``kind``): ``"int8"`` (its own int8 kernel, or the
        engine given the op between quantize/dequantize points), ``"torch-int8"`` (not given to the engine: the torch
        kernel runs it int8 between the engine's stages), ``"torch"`` (run in torch, in float, between the stages) or
        ``"float"`` (the engine runs it in float: a run-time-quantized op with no quantize/dequantize in the QDQ
        graph). What ``qcast ops`` prints; ``explain()`` reads back what the engine compiled."""
        if op in self.torch_ops:
            return "torch-int8" if kind == "weight_only" else "torch"
        if kind == "weight_only" and not (self.weight_only is True or op in self.weight_only):
            return "float"
        return "int8"

    def runs_conv_add(self, engine: str) -> bool:
        return self.conv_add(engine) if callable(self.conv_add) else bool(self.conv_add)

    def writes_float(self, op: str) -> bool:
        """Whether this engine has an int8 kernel for ``op`` that writes fp32 (see ``float_out``)."""
        return self.float_out is True or op in self.float_out

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def check_available(self) -> None:
        if not self.available():
            raise UnsupportedError(
                f"backend {self.name!r} needs the {self.requires!r} package, which is not installed. Install it "
                f"with: {self.install_hint}")


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, *, requires: str | None = None, install_hint: str = "", kernels: str = "torch",
                     explain: Callable | None = None,
                     conv_add: bool | Callable[[str], bool] = True, traces: bool = True,
                     float_out: bool | tuple[str, ...] = True, weight_only: bool | tuple[str, ...] = True,
                     torch_ops: tuple[str, ...] = ()) -> Callable:
    """Decorator for a backend's ``lower(qdq, config, example_args, example_kwargs) -> nn.Module`` (``config``: the
    model's QuantConfig)."""

    def deco(lower: Callable) -> Callable:
        if name in _BACKENDS:
            raise ValueError(f"backend {name!r} registered twice")
        _BACKENDS[name] = Backend(name, lower, requires, install_hint, kernels, explain or _same_rows, conv_add,
                                  traces, float_out, tuple(weight_only) if weight_only is not True else True,
                                  tuple(torch_ops))
        return lower

    return deco


def _load() -> None:
    for module in BACKEND_MODULES:
        importlib.import_module(module)


def backend_names() -> list[str]:
    _load()
    return sorted(_BACKENDS)


def registered() -> dict[str, Backend]:
    """Every registered backend by name, installed or not (what each declares is known without its engine)."""
    _load()
    return dict(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; UnsupportedError (with the pip command) when unknown or not installed."""
    _load()
    if name not in _BACKENDS:
        raise UnsupportedError(f"unknown backend {name!r}; backends: {sorted(_BACKENDS)} (a TensorRT backend is on "
                               "the roadmap)")
    backend = _BACKENDS[name]
    backend.check_available()
    return backend


def check_traceable(qdq, engine: str) -> None:
    """UnsupportedError for a QDQ graph an engine's tracer would get wrong: one calling a region of the user's own
    Python that qcast could not capture (its data-dependent ``if`` would be traced once and frozen to the branch the
    example input took: never silently). ``backend='auto'`` then keeps the torch backend, which calls the region as
    Python on every input. ``convert`` never hands an engine such a graph whole: it splits it at
    its regions (``regions.lower_split``); what still reaches this check is one file for the whole graph
    (``qcast.export``). A graph captured through torch.export (Hugging Face models) is straight-line ATen code with
    no such region; the sizes it reads from its inputs are kept symbolic by ``structure.traced_sizes``, which refuses
    the size-reading ops it cannot keep so."""
    from .regions import uncaptured

    regions = [n.target for n in uncaptured(qdq)]
    if regions:
        raise UnsupportedError(f"the {engine} backend would trace the uncaptured region(s) {regions[:3]} (your own "
                               "Python, which qcast keeps in float) once and freeze their data-dependent branches; "
                               f"one {engine} file cannot hold them: quantize with backend={engine!r}, which runs them "
                               "in torch between the engine's parts, or backend='torch'")


def conv_add_rule(backend: str) -> Callable[[str], bool]:
    """``engine -> bool``: whether a conv planned for ``backend`` (``"auto"``: every candidate executes the torch
    plan) runs the residual add after it in the same int8 op; what ``passes.fuse`` is given."""
    planner = get_backend(kernel_table(backend))
    runner = planner if backend == "auto" else get_backend(backend)
    return lambda engine: planner.runs_conv_add(engine) and runner.runs_conv_add(engine)


def kernel_table(backend: str) -> str:
    """The kernel table that plans a model prepared for ``backend`` (``"auto"``: the torch kernels, which every
    backend executes today)."""
    return "torch" if backend in ("torch", "auto") else get_backend(backend).kernels


__all__ = ["Backend", "register_backend", "get_backend", "backend_names", "registered", "kernel_table", "conv_add_rule",
           "check_traceable", "dynamic_linears"]
