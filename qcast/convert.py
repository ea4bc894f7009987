"""convert: calibrated observers -> QDQ graph (backend-independent) -> a backend lowers it to kernels."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import attr_at, copy_io, copy_specs, op_of
from .errors import NotCalibratedError, UnsupportedError
from .backends import get_backend, kernel_table
from .data import describe
from .kernels.dynamic import fuse_siblings
from .nn import FusedConv
from .observers import Observer, bias_shift, fake_quant_weight
from .plan import Ctx, is_int8
from .quantized import QDQ, OpInfo, QuantizedModel
from .smooth import Smooth

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


def int8_layers(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Module path -> conv/linear (a FusedConv's inner one) of every int8 conv/linear call in ``gm``."""
    out = {}
    for node in gm.graph.nodes:
        if is_int8(node) and node.op == "call_module":
            mod = gm.get_submodule(node.target)
            conv = mod.conv if isinstance(mod, FusedConv) else mod
            if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                out[node.target] = conv
    return out


def _qdq_params(gm: fx.GraphModule) -> dict:
    """Output params of every int8-producing node (from the QDQ right after it)."""
    out = {}
    for node in gm.graph.nodes:
        if "qcast_observes" in node.meta:
            out[node.meta["qcast_observes"]] = gm.get_submodule(node.target).qparams
    return out


def _match_nodes(gm: fx.GraphModule) -> None:
    """deepcopy of a GraphModule renews nodes; re-link 'qcast_observes' by name."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        src = n.meta.get("qcast_observes")
        if src is not None:
            n.meta["qcast_observes"] = by_name[src.name]


def lower_torch(qdq: fx.GraphModule, config) -> fx.GraphModule:
    """Lower the QDQ graph to PyTorch int8 kernels: quantized tensors between int8 ops, float elsewhere."""
    _match_nodes(qdq)
    qparams = _qdq_params(qdq)
    ctx = Ctx(qdq, config, qparams)
    graph = fx.Graph()
    copy_io(qdq, graph)
    root: dict[str, object] = {}
    env_f: dict[fx.Node, fx.Node] = {}
    env_q: dict[fx.Node, fx.Node] = {}
    sites: dict[str, int] = {}  # module path -> call sites lowered so far

    def F(n):  # float value of n in the new graph
        if n in env_f:
            return env_f[n]
        if n in env_q:
            with graph.inserting_after(env_q[n]):
                d = graph.call_method("dequantize", (env_q[n],))
            env_f[n] = d
            return d
        raise KeyError(n)

    def Q(n):
        return env_q[n]

    def float_arg(a):
        return F(a) if isinstance(a, fx.Node) else a

    for n in qdq.graph.nodes:
        plan = Ctx.plan(n)
        if n.op == "output":
            graph.output(fx.map_arg(n.args[0], F))
        elif "qcast_observes" in n.meta:
            v = n.args[0]
            qp = qdq.get_submodule(n.target).qparams
            if v in env_q:
                env_q[n] = env_q[v]
                if v in env_f:
                    env_f[n] = env_f[v]
            else:
                env_f[n] = F(v)
                env_q[n] = graph.call_function(torch.quantize_per_tensor, (F(v), qp.scale, qp.zero_point, qp.torch_dtype))
        elif plan is not None and plan.precision == "int8" and plan.kind == "weight_only":  # e.g. embedding
            mod, args = plan.kernel.impl.build(n, ctx)  # int8 weights, float output
            target = n.target if n.op == "call_module" else "qcast_k." + _safe(plan.name)
            root[target] = mod
            env_f[n] = graph.call_module(target, fx.map_arg(args, float_arg))
            env_f[n].meta.update({k: n.meta[k] for k in ("qcast_name", "qcast_op") if k in n.meta})
        elif plan is not None and plan.precision == "int8":
            impl = plan.kernel.impl
            qin = set(impl.quant_inputs(n))
            pick = lambda a: Q(a) if a in qin else float_arg(a)  # noqa: E731
            if plan.kind == "compute" or hasattr(impl, "build") and plan.kind == "passthrough" and n.op != "call_module" and plan.op in ("add", "mul", "div"):
                mod, args = impl.build(n, ctx)
                if n.op == "call_module":
                    # each call site of a module has its own output params, so its own kernel: the first keeps
                    # the module's path, the others get '<path>__qcast_site<k>'
                    k = sites[n.target] = sites.get(n.target, -1) + 1
                    target = n.target if k == 0 else f"{n.target}__qcast_site{k}"
                else:
                    target = "qcast_k." + _safe(plan.name)
                root[target] = mod
                call = graph.call_module(target, fx.map_arg(args, pick))
                if plan.float_out:  # int8 inputs, fp32 output: no int8 op reads it (plan.place_outputs)
                    env_f[n] = call
                else:
                    env_q[n] = call
            else:
                new = graph.node_copy(n, pick)
                if n.op == "call_module":
                    root[n.target] = qdq.get_submodule(n.target)
                if n.op == "call_method" and n.target in getattr(impl, "rename", {}):
                    new.target = impl.rename[n.target]
                env_q[n] = new
            (env_f if plan.float_out else env_q)[n].meta.update(
                {k: n.meta[k] for k in ("qcast_name", "qcast_op") if k in n.meta})
        else:
            new = graph.node_copy(n, float_arg)
            if n.op in ("call_module", "get_attr"):
                root[n.target] = attr_at(qdq, n.target)
            new.meta.update({k: n.meta[k] for k in ("qcast_name", "qcast_op") if k in n.meta})
            env_f[n] = new
    fuse_siblings(graph, root)  # per-token query/key/value linears: one GEMM
    for n in [n for n in graph.nodes if n.op == "call_module" and not n.users and isinstance(root[n.target], Smooth)]:
        graph.erase_node(n)  # a SmoothQuant multiply its per-token kernel applies itself (LinearDynamicKernel.build)
    for n in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(n)  # a constant only int8 kernels read: they hold it quantized (BinaryKernel), drop the float copy
    graph.lint()
    lowered = fx.GraphModule(root, graph, class_name=type(qdq).__name__.replace("Graph", "") + "Int8")
    copy_specs(qdq, lowered)
    return lowered



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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


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

    from .backends import regions

    example = example or example_call(qdq)
    choice = None
    if backend == "auto":
        backend, gm, tried = choose(qdq, lambda b: lower_for(b, qdq, config), kernel_table(config.backend), example)
        choice = {"input": describe(*example), "candidates": [c.to_dict() for c in tried]}
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
