"""convert: calibrated observers -> QDQ graph (backend-independent) -> a backend lowers it to kernels."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import NotCalibratedError, UnsupportedError
from .backends import get_backend, kernel_table
from .data import describe
from .observers import bias_shift, fake_quant_tensor, fake_quant_weight
from .backends.context import Ctx, int8_layers, transposed_layers
from .nn import FusedConv
from .quantized import QDQ, OpInfo, QuantizedModel
from .quantizers import QuantizerPoint, check_output

VERSION = 1


def to_qdq(observed, in_place: bool = False) -> fx.GraphModule:
    """Replace each observer by a QDQ point with its params and fake-quantize int8 weights in place.
    ``in_place``: on ``observed``'s own graph instead of a copy (``quantize`` discards the observed model: one float
    copy of the model less at the peak, docs/scale.md); the observed model cannot be used afterwards.

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
    gm = observed.gm if in_place else copy.deepcopy(observed.gm)
    for node in gm.graph.nodes:
        if "qcast_observes" in node.meta:
            obs = gm.get_submodule(node.target)
            setattr(gm, node.target, QDQ(obs.qparams(), obs.name))
    if report is not None:
        gm.meta["qcast_adaround"] = report
    schemes = layer_schemes(gm, observed.qcast_config)
    trained = getattr(observed, "qcast_weight_quantizers", {})  # QAT: module path -> its trained weight quantizer
    for target, conv in int8_layers(gm).items():  # once per module, however many call sites it has
        w = conv.weight.detach().clone()
        qmax = qmax_of(settings[target][0])
        scheme, _, group, name = schemes[target]
        if target in trained or scheme.custom:
            fq = trained.get(target)
            if fq is None:  # a registered quantizer, fresh for this weight (PTQ)
                fq = scheme.quantizer()
                fq.observe(w)
            conv.weight.data, qmax = weight_from_quantizer(fq, w, name)
        elif target in learned:
            conv.weight.data = learned[target].clone()
        elif scheme.pow2 or group:
            conv.weight.data, qmax = scheme_weight(w, scheme, qmax, group, name)
        else:
            conv.weight.data = fake_quant_weight(w, qmax)
        # the grid the int8 kernel stores this weight on (QConv.from_float): its largest int, per channel where the
        # channels' scales are not max|w| / qmax (power-of-two or learned scales)
        conv.qcast_weight_qmax = qmax
        if correct:
            # E[W_q x + b'] = E[W x + b]  =>  b' = b - E[(W_q - W) x]
            shift = bias_shift(conv, w, conv.weight.detach(), stats[target])
            bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(shift)
            conv.bias = nn.Parameter((bias - shift).to(w.dtype), requires_grad=False)
    for conv in transposed_layers(gm).values():  # per-tensor 8-bit weights (kernels/conv_transpose.py says why)
        conv.weight.data = fake_quant_tensor(conv.weight.detach())
        conv.qcast_weight_qmax = 127
    for target, path in gm.meta.get("qcast_sim_weights", {}).items():  # simulated layers: weight fake-quantized
        layer = gm.get_submodule(target)
        layer = layer.conv if isinstance(layer, FusedConv) else layer
        fq = gm.get_submodule(path)
        with torch.no_grad():
            w = layer.weight.detach()
            if not getattr(observed, "qcast_trained", False):  # PTQ: a fresh quantizer sees its weight first
                fq.observe(w)
            y = fq(w)
        check_output(fq, w, y, f"{target} (weight)")
        layer.weight.data = y.detach().clone()
    for node in gm.graph.nodes:  # simulated layers' inputs: their quantizer now fake-quantizes
        if node.op == "call_module" and "qcast_observes" not in node.meta:
            point = gm.get_submodule(node.target)
            if isinstance(point, QuantizerPoint):
                point.active, point.observing = True, False
    gm.recompile()
    return gm


def layer_schemes(gm: fx.GraphModule, config) -> dict:
    """Module path -> ``(Scheme, bits, group_size, display name)`` of every int8 conv/linear's weight (a module called
    at several sites: its first site's)."""
    targets = int8_layers(gm)
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in targets and node.target not in out:
            where = (node.meta.get("qcast_name", ""), node.meta.get("qcast_op", ""), node.meta.get("qcast_path", ""))
            out[node.target] = (*config.weight_scheme(*where), where[0] or node.target)
    return out


def scheme_weight(w: torch.Tensor, scheme, qmax: int, group: int | None, name: str):
    """``(weight on the scheme's grid, qmax for the int8 kernels)`` for power-of-two or grouped weights: a grouped
    weight is re-rounded onto the per-channel int8 grid (groups have scales of their own, the kernels one per
    channel; the extra error is at most half an 8-bit step), a per-channel one keeps its scales exactly."""
    from .schemes import weight_grid
    wq, scales = weight_grid(w, scheme, qmax, group, name)
    if group:
        return fake_quant_weight(wq, 127), 127
    return wq, channel_qmax(wq, scales)


def channel_qmax(wq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per output channel, the largest int of ``wq`` on its grid (``scales``): what ``weight_scales`` divides by
    to recover those very scales."""
    amax = wq.detach().reshape(wq.shape[0], -1).abs().amax(dim=1).float()
    return torch.round(amax / scales.float()).clamp(1, 127).long()


def weight_from_quantizer(fq, w: torch.Tensor, name: str):
    """``(fake-quantized weight, qmax)`` of a quantizer that declares its grid: per-channel (or per-tensor) symmetric,
    zero point 0, at most 8 bits; per-group scales are re-rounded onto the per-channel int8 grid."""
    from .errors import QcastError
    with torch.no_grad():
        y = fq(w)
    check_output(fq, w, y, f"{name} (weight)")
    y = y.detach().float()
    label = getattr(fq, "scheme_name", "") or type(fq).__name__
    g = fq.grid(w)
    if g is None:
        raise QcastError(f"{name}: weight quantizer {label!r} declared no grid for this weight (grid() returned None)")
    scale = torch.as_tensor(g.scale, dtype=torch.float32).flatten()
    zp = torch.as_tensor(g.zero_point).flatten()
    if bool((zp != 0).any()) or g.bits > 8:
        raise QcastError(f"{name}: weight quantizer {label!r} declares {g!r} with zero point {zp.tolist()[:4]}: int8 "
                         "kernels take symmetric weights (zero point 0) of at most 8 bits")
    rows = y.reshape(y.shape[0], -1)
    if scale.numel() == 1:
        scale = scale.expand(rows.shape[0])
    if scale.numel() != rows.shape[0]:
        if rows.numel() % scale.numel():
            raise QcastError(f"{name}: weight quantizer {label!r} declares {scale.numel()} scales for a weight of "
                             f"{rows.shape[0]} channels")
        grouped = rows.reshape(scale.numel(), -1)
        _check_on_grid(grouped, scale, label, name)
        return fake_quant_weight(y, 127), 127
    _check_on_grid(rows, scale, label, name)
    return y.reshape(w.shape).to(w.dtype), channel_qmax(y, scale)


def _check_on_grid(rows: torch.Tensor, scale: torch.Tensor, label: str, name: str) -> None:
    from .errors import QcastError
    ints = rows / scale[:, None]
    off = float((ints - torch.round(ints)).abs().max()) if ints.numel() else 0.0
    if off > 1e-3 or float(torch.round(ints).abs().max()) > 127:
        raise QcastError(f"{name}: weight quantizer {label!r} declared scales its output is not on (ints off by up to "
                         f"{off:.3g}, largest {float(ints.abs().max()):.4g}): grid() must return the scales forward() "
                         "rounds to, with ints within int8")


def example_call(gm: fx.GraphModule) -> tuple[tuple, dict]:
    """(args, kwargs) example for ``gm``: a random tensor (ones for integer and bool dtypes: a valid token id and an
    attention mask that masks nothing; zeros masked every token of MiniLM, where the simulation and the int8 kernels
    then disagree on a degenerate softmax) of the shape and dtype each placeholder had at prepare, the default (or
    None) for the others. What a backend that traces the graph needs, and what ``backend="auto"`` measures on when
    no calibration batch is at hand (``load``)."""
    from .capture import TensorMeta

    args = []
    offsets = bag_offsets(gm)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            meta = n.meta.get("qcast_val")
            if isinstance(meta, TensorMeta):
                make = (torch.randn if meta.dtype.is_floating_point else torch.zeros if n in offsets
                        else torch.ones)
                args.append(make(meta.shape, dtype=meta.dtype))
            else:
                args.append(n.args[0] if n.args else None)
    return tuple(args), {}


def bag_offsets(gm: fx.GraphModule) -> set:
    """The placeholders an embedding bag reads as its offsets: the example call gives them zeros (every bag starts at
    0, valid offsets for any number of indices; ones are not: offsets[0] must be 0)."""
    out = set()
    for n in gm.graph.nodes:
        if n.meta.get("qcast_op") == "embedding_bag":
            at = 1 if n.op == "call_module" else 2
            o = n.args[at] if len(n.args) > at else n.kwargs.get("offsets")
            if isinstance(o, fx.Node) and o.op == "placeholder":
                out.add(o)
    return out


def records(qdq: fx.GraphModule, opaque: dict[str, str]) -> tuple[OpInfo, ...]:
    return tuple(row for _, row in node_records(qdq, opaque))


def node_records(qdq: fx.GraphModule, opaque: dict[str, str]) -> list[tuple[str, OpInfo]]:
    """The explain() rows of the QDQ graph, each with the name of the node it describes (the rows of the layers inside
    an uncaptured region: the region's call)."""
    rows = []
    modules = dict(qdq.named_modules())
    for n in qdq.graph.nodes:
        plan = Ctx.plan(n)
        if plan is None or not plan.visible:
            continue
        rows.append((n.name, OpInfo(plan.name, plan.op, plan.precision,
                                    plan.engine if plan.precision == "int8" else "torch-float", plan.reason)))
        if n.op == "call_module" and n.target in opaque:
            for sub, m in modules[n.target].named_modules():
                if sub and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    rows.append((n.name, OpInfo(f"{n.target}.{sub}", _module_op(m), "float", "torch-float",
                                                f"inside uncaptured region '{n.target}': {opaque[n.target]}")))
    return rows


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
    if hasattr(observed, "materialize"):  # a QAT model (qcast.prepare_qat): its trained BatchNorms folded, its grids
        observed = observed.materialize()
    backend = backend or observed.qcast_config.backend
    kernels = kernel_table(observed.qcast_config.backend)
    if backend != "auto" and get_backend(backend).kernels != kernels:  # get_backend: pip command when not installed
        raise UnsupportedError(f"the model was prepared for backend {observed.qcast_config.backend!r}; prepare again "
                               f"with QuantConfig(backend={backend!r})")
    # quantize() sets this on the observed model it throws away: its graph becomes the QDQ graph (no float copy)
    qdq = to_qdq(observed, in_place=getattr(observed, "qcast_convert_in_place", False))
    example = getattr(observed, "qcast_example", None)  # the first calibration batch (calibrate)
    from .distributed import group
    # calibrated under a process group: every rank converts, and backend="auto"'s timing is decided on rank 0
    gm, rows, backend, choice = lower(qdq, observed.qcast_config, observed.qcast_opaque, backend, example,
                                      collective=group.active())
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


def lower(qdq: fx.GraphModule, config, opaque: dict[str, str], backend: str, example: tuple | None = None,
          collective: bool = False):
    """``(lowered module, explain rows, backend name, auto's choice or None)``: the QDQ graph lowered for ``backend``
    (``"auto"``: every installed backend checked and timed on ``example``, default: inputs shaped like the graph's).
    What ``convert`` and ``load`` share."""
    from .backends.auto import choose

    from .backends import regions

    from .distributed import group

    example = example or example_call(qdq)
    choice = None
    if backend == "auto":
        from .backends.onnxruntime.export import shared_export

        def decide():
            with shared_export():  # ONNX Runtime and OpenVINO start from one ONNX export of the graph
                name, module, tried = choose(qdq, lambda b: lower_for(b, qdq, config), kernel_table(config.backend),
                                             example)
            decide.module = module
            return name, [c.to_dict() for c in tried]

        # timing differs from rank to rank: under a process group (collective=True) rank 0 decides for every rank
        backend, tried = group.decide_on_main(decide) if collective else decide()
        gm = getattr(decide, "module", None) or lower_for(get_backend(backend), qdq, config)
        choice = {"input": describe(*example), "candidates": tried}
        if collective and group.active():
            choice["decided_by"] = f"rank 0 of {group.world_size()}"
    else:
        gm = lower_for(get_backend(backend), qdq, config)
    if regions.is_split(gm):
        return gm, regions.explain(gm, get_backend(backend), node_records(qdq, opaque)), backend, choice
    return gm, get_backend(backend).explain(gm, records(qdq, opaque)), backend, choice


def lower_for(backend, qdq: fx.GraphModule, config) -> nn.Module:
    """The QDQ graph lowered by ``backend`` (a ``Backend``), traced on inputs shaped like the graph's; a backend that
    traces gets a graph with uncaptured regions, or ops its engine cannot convert, in parts, those running in torch
    between them (``backends.regions``)."""
    from .backends import regions

    if backend.traces and not hasattr(qdq, "_in_spec"):
        return regions.lower_traced(backend, qdq, config, *example_call(qdq))
    return backend.lower(qdq, config, *example_call(qdq))
