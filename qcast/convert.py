"""convert: calibrated observers -> QDQ graph (backend-independent) -> a backend lowers it to kernels."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import NotCalibratedError, UnsupportedError
from .backends import get_backend, kernel_table
from .data import describe
from .observers import bias_shift, fake_quant_weight
from .backends.context import Ctx, int8_layers
from .quantized import QDQ, OpInfo, QuantizedModel

VERSION = 1


def to_qdq(observed) -> fx.GraphModule:
    """Replace each observer by a QDQ point with its params and fake-quantize int8 weights in place.

    The result is the quantized graph: explicit quantize/dequantize points and params, independent of
    who executes it, runnable in float as a simulation of the int8 model.
    """
    missing = [m.name for _, m in observed.observers() if not m.calibrated]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NotCalibratedError(
            f"{len(missing)} observer(s) saw no data: {shown}. Run qcast.calibrate(observed, data) with "
            "representative inputs before qcast.convert(); layers your data never reaches can be kept in float "
            "with QuantConfig(skip=[...]).")
    from .smooth import unresolved
    pending = unresolved(observed)
    if pending:
        raise NotCalibratedError(
            f"smoothquant: the scales of {len(pending)} linear(s) ({', '.join(m.layer for _, m in pending[:3])}"
            f"{', ...' if len(pending) > 3 else ''}) are chosen by qcast.calibrate(), which was not run. Calibrate with "
            "qcast.calibrate(observed, data) (not by calling the observed model directly), or use "
            "QuantConfig(smoothquant=None).")
    correct = observed.qcast_config.bias_correction
    stats = getattr(observed, "qcast_input_stats", {})
    if correct:
        unseen = [t for t in int8_layers(observed.gm) if t not in stats or not stats[t].count]
        if unseen:
            raise NotCalibratedError(
                f"bias_correction needs each int8 conv/linear's input mean, collected by qcast.calibrate(); none for "
                f"{unseen[:5]}. Calibrate with qcast.calibrate(observed, data) (not by calling the observed model "
                "directly), or use QuantConfig(bias_correction=False).")
    from .adaround import layer_settings, qmax_of, rounded_weights
    settings = layer_settings(observed.gm, observed.qcast_config)  # module path -> (weight_bits, rounding)
    learned, report = rounded_weights(observed)  # rounding="adaround": learned weights (cached), else {}
    gm = copy.deepcopy(observed.gm)
    for node in gm.graph.nodes:
        if "qcast_observes" in node.meta:
            obs = gm.get_submodule(node.target)
            setattr(gm, node.target, QDQ(obs.qparams(), obs.name))
    if report is not None:
        gm.meta["qcast_adaround"] = report
    for target, conv in int8_layers(gm).items():  # once per module, however many call sites it has
        w = conv.weight.detach().clone()
        qmax = qmax_of(settings[target][0])
        conv.weight.data = learned[target].clone() if target in learned else fake_quant_weight(w, qmax)
        conv.qcast_weight_qmax = qmax  # the grid the int8 kernel stores this weight on (QConv.from_float)
        if correct:
            # E[W_q x + b'] = E[W x + b]  =>  b' = b - E[(W_q - W) x]
            shift = bias_shift(conv, w, conv.weight.detach(), stats[target])
            bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(shift)
            conv.bias = nn.Parameter((bias - shift).to(w.dtype), requires_grad=False)
    gm.recompile()
    return gm


def example_call(gm: fx.GraphModule) -> tuple[tuple, dict]:
    """(args, kwargs) example for ``gm``: a random tensor (ones for integer and bool dtypes: a valid token id and an
    attention mask that masks nothing; zeros masked every token of MiniLM, where the simulation and the int8 kernels
    then disagree on a degenerate softmax) of the shape and dtype each placeholder had at prepare, the default (or
    None) for the others. What a backend that traces the graph needs, and what ``backend="auto"`` measures on when
    no calibration batch is at hand (``load``)."""
    from .capture import TensorMeta

    args = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            meta = n.meta.get("qcast_val")
            if isinstance(meta, TensorMeta):
                make = torch.randn if meta.dtype.is_floating_point else torch.ones
                args.append(make(meta.shape, dtype=meta.dtype))
            else:
                args.append(n.args[0] if n.args else None)
    return tuple(args), {}


def records(qdq: fx.GraphModule, opaque: dict[str, str]) -> tuple[OpInfo, ...]:
    rows = []
    modules = dict(qdq.named_modules())
    for n in qdq.graph.nodes:
        plan = Ctx.plan(n)
        if plan is None or not plan.visible:
            continue
        rows.append(OpInfo(plan.name, plan.op, plan.precision, plan.engine if plan.precision == "int8" else "torch-float",
                           plan.reason))
        if n.op == "call_module" and n.target in opaque:
            for sub, m in modules[n.target].named_modules():
                if sub and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    rows.append(OpInfo(f"{n.target}.{sub}", _module_op(m), "float", "torch-float",
                                       f"inside uncaptured region '{n.target}': {opaque[n.target]}"))
    return tuple(rows)


def _module_op(m: nn.Module) -> str:
    from .capture import MODULE_OPS
    return MODULE_OPS.get(type(m), type(m).__name__)


def convert(observed, backend: str | None = None) -> QuantizedModel:
    """Turn a calibrated ObservedModel into an int8 QuantizedModel executed by ``backend`` (default: the config's).

    ``"auto"``: lowered to every installed backend, each checked against the QDQ simulation and timed on the first
    calibration batch, the fastest kept (``qcast.backends.auto``; the candidates in ``qcast_meta["backend_choice"]``).
    """
    from .prepare import ObservedModel

    if not isinstance(observed, ObservedModel):
        raise UnsupportedError(f"convert() needs the model returned by qcast.prepare(), got {type(observed).__name__}")
    backend = backend or observed.qcast_config.backend
    kernels = kernel_table(observed.qcast_config.backend)
    if backend != "auto" and get_backend(backend).kernels != kernels:  # get_backend: pip command when not installed
        raise UnsupportedError(f"the model was prepared for backend {observed.qcast_config.backend!r}; prepare again "
                               f"with QuantConfig(backend={backend!r})")
    qdq = to_qdq(observed)
    example = getattr(observed, "qcast_example", None)  # the first calibration batch (calibrate)
    gm, rows, backend, choice = lower(qdq, observed.qcast_config, observed.qcast_opaque, backend, example)
    meta = {
        "version": VERSION,
        "backend": backend,
        "config": observed.qcast_config.to_dict(),
        "opaque": dict(observed.qcast_opaque),
        "calibration_batches": observed.qcast_summary.batches if observed.qcast_summary else 0,
    }
    if "qcast_equalization" in observed.gm.meta:  # QuantConfig(equalize=True): how many pairs, scale range
        meta["equalization"] = observed.gm.meta["qcast_equalization"].summary()
    if "qcast_smoothquant" in observed.gm.meta:  # QuantConfig(smoothquant=alpha): layers smoothed / left alone
        meta["smoothquant"] = observed.gm.meta["qcast_smoothquant"].summary()
    if "qcast_adaround" in qdq.meta:  # rounding="adaround": per-layer output error, nearest vs learned (JSON rows)
        meta["adaround"] = qdq.meta["qcast_adaround"].to_list()
    if choice is not None:  # backend="auto": every candidate, its time and agreement, or why it was rejected
        meta["backend_choice"] = choice
    return QuantizedModel(gm, rows, meta, qdq)


def lower(qdq: fx.GraphModule, config, opaque: dict[str, str], backend: str, example: tuple | None = None):
    """``(lowered module, explain rows, backend name, auto's choice or None)``: the QDQ graph lowered for ``backend``
    (``"auto"``: every installed backend checked and timed on ``example``, default: inputs shaped like the graph's).
    What ``convert`` and ``load`` share."""
    from .backends.auto import choose

    example = example or example_call(qdq)
    choice = None
    if backend == "auto":
        from .backends.onnxruntime.export import shared_export
        with shared_export():  # ONNX Runtime and OpenVINO start from one ONNX export of the graph
            backend, gm, tried = choose(qdq, lambda b: b.lower(qdq, config, *example_call(qdq)),
                                        kernel_table(config.backend), example)
        choice = {"input": describe(*example), "candidates": [c.to_dict() for c in tried]}
    else:
        gm = get_backend(backend).lower(qdq, config, *example_call(qdq))
    return gm, get_backend(backend).explain(gm, records(qdq, opaque)), backend, choice
