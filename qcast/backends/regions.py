"""What an engine cannot take runs in torch between the stages it runs: uncaptured regions, and ops its converter lacks.

An *uncaptured region* is a user module qcast could not trace (its forward branches on data, e.g. the zoo UNet's
``if x.mean() > 0``) and kept as a leaf: it runs in float, as the user's own Python. An engine cannot take it: its
converter traces the graph once (TorchScript) and would freeze the branch the example input took. So, for a backend
that traces (``Backend.traces``), ``lower_traced`` splits the QDQ graph into *stages*:

- a node's *depth* is the number of regions on the longest path from the inputs to it; the captured nodes of one depth
  form a stage, lowered by the backend's own ``lower`` as a graph of its own (``subgraph``: its inputs are the values
  it reads from earlier stages, its outputs the values later stages or the model output read);
- between the stages of depth ``k-1`` and ``k``, the regions of depth ``k`` (and ``getitem`` / ``getattr`` of their
  outputs) are called in torch, as Python, on every call.

Values only flow to deeper stages, so the stages run in order. The result is one ``fx.GraphModule`` (``RegionSplit``)
calling them, with the QDQ graph's inputs and output structure. Calls of an op the engine's converter reports it
cannot convert (``unconverted``) are cut out the same way. A captured stage with no int8 compute op (only float ops
and QDQ points, e.g. a ``sigmoid`` between two regions) runs as the QDQ graph's own nodes in torch: an engine call
costs more than such ops; a stage with int8 ops does too when it ran faster so at convert (``stage_times``; measured
in docs/design.md, "What an engine cannot take").
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnsupportedError


def uncaptured(qdq: fx.GraphModule) -> list[fx.Node]:
    """The call sites of uncaptured regions in the QDQ graph: ``call_module`` of a module that is neither qcast's own
    (QDQ points, fused layers, SmoothQuant multiplies) nor PyTorch's (layers, stubs), i.e. a user module kept as a leaf
    because torch.fx could not trace it."""
    from ..nn import FusedBatchNorm, FusedConv
    from ..quantized import QDQ
    from ..smooth import Smooth

    ours = (QDQ, FusedConv, FusedBatchNorm, Smooth)
    return [n for n in qdq.graph.nodes if n.op == "call_module"
            and not isinstance(m := qdq.get_submodule(n.target), ours) and not type(m).__module__.startswith("torch.")]


@dataclass(frozen=True)
class Stage:
    """One step of the split graph. ``kind``: ``"engine"`` (lowered by the backend), ``"float"`` (captured nodes with
    no int8 compute op: run as the QDQ graph's nodes in torch) or ``"torch"`` (uncaptured regions, ops the engine
    cannot convert: in torch).
    ``inputs``: values it reads from the graph's inputs or earlier stages; ``outputs``: its values read later."""

    kind: str
    depth: int
    nodes: tuple
    inputs: tuple = ()
    outputs: tuple = ()

    def __repr__(self) -> str:
        return f"Stage({self.kind}, depth {self.depth}, {len(self.nodes)} nodes, {len(self.inputs)} in, " \
               f"{len(self.outputs)} out)"


def _computes_int8(node: fx.Node) -> bool:
    from .context import Ctx
    plan = Ctx.plan(node)
    return plan is not None and plan.precision == "int8" and plan.kind in ("compute", "weight_only")


def stages(qdq: fx.GraphModule, in_torch) -> list[Stage]:
    """The QDQ graph cut at the nodes ``in_torch`` (its uncaptured regions, ops the engine cannot convert), in execution
    order (see the module docstring)."""
    depth: dict[fx.Node, int] = {}
    torch_side: set[fx.Node] = set()  # the nodes in_torch and getitem / getattr of their outputs
    for n in qdq.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            depth[n] = 0
            continue
        d = max((depth[a] for a in n.all_input_nodes), default=0)
        if n in in_torch:
            d += 1
            torch_side.add(n)
        elif n.op == "call_function" and n.target in (operator.getitem, getattr) and n.args[0] in torch_side:
            torch_side.add(n)
        depth[n] = d
    groups: dict[tuple[int, bool], list[fx.Node]] = {}
    for n in qdq.graph.nodes:
        if n.op not in ("placeholder", "get_attr", "output"):
            groups.setdefault((depth[n], n in torch_side), []).append(n)
    out = []
    # at each depth k: the regions (torch side) first, then the captured nodes that read them
    for (d, is_region), nodes in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        members = set(nodes)
        inputs = _unique(a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr")
        outputs = tuple(n for n in nodes if any(u not in members for u in n.users))
        kind = "torch" if is_region else "engine" if any(_computes_int8(n) for n in nodes) else "float"
        out.append(Stage(kind, d, tuple(nodes), inputs, outputs))
    return out


def _unique(nodes) -> tuple:
    return tuple(dict.fromkeys(nodes))


def subgraph(qdq: fx.GraphModule, stage: Stage) -> fx.GraphModule:
    """A stage's nodes as a graph of their own: one placeholder per input (named like the value it stands for, with
    its shape meta), the constants it reads copied in, a tuple of its outputs returned. Nodes keep their meta (plan,
    names): the backend's lowering and explain read it as on the whole graph."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for v in stage.inputs:
        env[v] = graph.placeholder(v.name)
        env[v].meta.update({k: v.meta[k] for k in ("qcast_val",) if k in v.meta})
    for n in stage.nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = graph.node_copy(a)
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in stage.outputs))
    return fx.GraphModule(qdq, graph, class_name="QDQStage")


def example_values(qdq: fx.GraphModule, args: tuple, kwargs: dict) -> dict[fx.Node, object]:
    """Every node's value when the QDQ graph runs on ``(args, kwargs)``: what each stage is traced with."""
    bound = inspect.signature(qdq.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    values: dict[fx.Node, object] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            values[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        _Record(qdq).run(*bound.arguments.values())
    return values


#: how many times ``lower_traced`` splits off ops an engine reported it cannot convert before giving up (ONNX export
#: reports one op per failure)
MAX_SPLITS = 8


def unconverted(engine: str, ops, detail: str) -> UnsupportedError:
    """The UnsupportedError of an engine converter that has no rule for some ATen ops (``ops``: ``"aten::median"``...),
    marked ``engine_ops``: ``lower_traced`` then runs the graph's nodes calling those ops in torch and lowers the rest."""
    ops = sorted(set(ops))
    err = UnsupportedError(f"{engine} cannot convert {', '.join(ops)} ({detail}); use backend='torch', or keep these ops "
                           "out of the exported graph")
    err.engine_ops = frozenset(ops)
    return err


def aten_name(node: fx.Node) -> str | None:
    """The ATen op a call of the QDQ graph traces to, as engines name it (``aten::median`` for ``x.median(...)`` and
    ``torch.median``, ``aten::special_erfcx`` for ``torch.special.erfcx``); None for module calls and other nodes."""
    if node.op == "call_method":
        return f"aten::{node.target}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        return f"aten::{name}" if name else None
    return None


def lower_traced(backend, qdq: fx.GraphModule, config, example_args: tuple, example_kwargs: dict) -> nn.Module:
    """The QDQ graph lowered by a backend that traces it (``Backend.traces``): whole when it can, else split, the
    uncaptured regions and the ops the engine reports it cannot convert (``unconverted``) running in torch between the
    stages it lowers."""
    in_torch: dict[fx.Node, str] = {n: "region" for n in uncaptured(qdq)}
    in_torch.update({n: f"aten::{n.meta['qcast_op']}" for n in qdq.graph.nodes  # declared: its converter fails on them
                     if n.meta.get("qcast_op") in backend.torch_ops and n.op in ("call_module", "call_function")})
    for _ in range(MAX_SPLITS):
        try:
            if not in_torch:
                return backend.lower(qdq, config, example_args, example_kwargs)
            return lower_split(backend, qdq, config, example_args, example_kwargs, in_torch)
        except UnsupportedError as e:
            ops = getattr(e, "engine_ops", frozenset())
            found = {n: aten_name(n) for n in qdq.graph.nodes if n not in in_torch and aten_name(n) in ops}
            if not found:
                raise
            in_torch.update(found)
    raise UnsupportedError(f"the {backend.name} backend could not convert this model in {MAX_SPLITS} tries, each "
                           f"reporting another op it lacks (now {sorted(set(in_torch.values()) - {'region'})}); use "
                           "backend='torch'")


def lower_split(backend, qdq: fx.GraphModule, config, example_args: tuple, example_kwargs: dict,
                in_torch: dict) -> fx.GraphModule:
    """The QDQ graph with the nodes ``in_torch`` (node -> ``"region"`` or the ATen op the engine lacks) run in torch
    and the stages between them lowered by ``backend`` (``Backend``): a ``RegionSplit`` graph module with the QDQ
    graph's inputs and output structure."""
    parts = stages(qdq, in_torch)
    values = example_values(qdq, example_args, example_kwargs)
    for stage in parts:
        if stage.kind != "engine":
            continue
        crossing = [v for v in stage.outputs if any(u.op != "output" and u not in stage.nodes for u in v.users)]
        crossing += [v for v in stage.inputs if v.op != "placeholder"]
        for v in crossing:
            if not isinstance(values[v], torch.Tensor):
                raise UnsupportedError(
                    f"the {backend.name} backend runs the model in stages between what it cannot take "
                    f"({_what(in_torch)}), and the value {v.name!r} ({type(values[v]).__name__}, computed by "
                    f"{v.meta.get('qcast_name', v.name)}) crosses from one stage to the next; an engine passes only "
                    "tensors between stages. Use backend='torch'")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, nn.Module] = {}
    for n in qdq.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.node_copy(n)
    kinds = []
    timed: dict[str, tuple[float, float]] = {}  # engine stage -> (ms on the engine, ms as the simulation in torch)
    for k, stage in enumerate(parts):
        if stage.kind == "torch":
            for n in stage.nodes:
                for a in n.all_input_nodes:
                    if a.op == "get_attr" and a not in env:
                        env[a] = graph.node_copy(a)
                        root[a.target] = _attr(qdq, a.target)
                kernel = _torch_kernel(n, qdq, config)
                if kernel is not None:  # a run-time-quantized op the engine is not given: the torch kernel, int8
                    target = f"qcast_torch_{n.name}"
                    root[target] = kernel[0]
                    env[n] = graph.call_module(target, fx.map_arg(kernel[1], env.__getitem__))
                    continue
                env[n] = graph.node_copy(n, env.__getitem__)
                if n.op == "call_module":
                    root[n.target] = qdq.get_submodule(n.target)
            kinds.append((None, "torch", tuple(n.name for n in stage.nodes)))
            continue
        sub = subgraph(qdq, stage)
        target = f"qcast_stage{k}"
        kind = stage.kind
        if kind == "engine":
            stage_args = tuple(values[v] for v in stage.inputs)
            with torch.no_grad():
                root[target] = backend.lower(sub, config, stage_args, {})
            timed[target] = stage_times(root[target], sub, stage_args)
            if timed[target][1] < timed[target][0]:  # faster as the simulation: this stage stays in torch
                root[target], kind = sub, "float"
        else:
            root[target] = sub
        kinds.append((target, kind, tuple(n.name for n in stage.nodes)))
        call = graph.call_module(target, tuple(env[v] for v in stage.inputs))
        for j, v in enumerate(stage.outputs):
            env[v] = graph.call_function(operator.getitem, (call, j))
    out = next(n for n in qdq.graph.nodes if n.op == "output")
    graph.output(fx.map_arg(out.args[0], env.__getitem__))
    split = fx.GraphModule(root, graph, class_name="RegionSplit")
    split.qcast_stages = tuple(kinds)  # (submodule name, kind, names of the QDQ-graph nodes it runs)
    split.qcast_engine = backend.name
    split.qcast_stage_ms = timed
    split.qcast_in_torch = {n.name: why for n, why in in_torch.items()}  # node name -> "region" or the ATen op lacked
    return split


def _torch_kernel(n: fx.Node, qdq: fx.GraphModule, config):
    """``(kernel module, args)`` of the torch kernel table's ``weight_only`` int8 kernel for a node run in torch between
    an engine's stages (it quantizes at run time, so it needs nothing from the QDQ graph), else None."""
    from .context import Ctx
    plan = Ctx.plan(n)
    if plan is None or plan.precision != "int8" or plan.kind != "weight_only" or not hasattr(plan.kernel.impl, "build"):
        return None
    return plan.kernel.impl.build(n, Ctx(qdq, config))


def _what(in_torch: dict) -> str:
    regions = [n.target for n, why in in_torch.items() if why == "region"]
    ops = sorted({why for why in in_torch.values() if why != "region"})
    return "; ".join(([f"uncaptured region(s) {regions[:3]}"] if regions else [])
                     + ([f"ops it cannot convert: {', '.join(ops)}"] if ops else []))


def stage_times(lowered: nn.Module, sub: fx.GraphModule, args: tuple) -> tuple[float, float]:
    """(ms on the engine, ms as the QDQ simulation in torch) of one captured stage with int8 ops, timed interleaved on
    its example inputs (``qcast.timing``, as ``auto`` times backends). An engine call has a fixed cost (binding,
    copies, its thread pool): measured at 1 thread, a float-only stage took 0.31 ms on OpenVINO and 0.09 ms on ONNX
    Runtime against 0.05 ms in torch, and a stage of one 16->16 3x3 int8 conv at 32x32 0.61 / 0.30 ms against 0.26 ms
    as the simulation (docs/design.md): such a stage runs faster in torch, a larger one on the engine."""
    from ..timing import time_interleaved
    times, _ = time_interleaved({"engine": lowered, "torch": sub}, args, {})
    return times["engine"], times["torch"]


def _attr(root: nn.Module, target: str):
    from ..capture import attr_at
    return attr_at(root, target)


def _torch_kernel_ran(split: fx.GraphModule, node_name: str) -> bool:
    return hasattr(split, f"qcast_torch_{node_name}")


def is_split(lowered: nn.Module) -> bool:
    return hasattr(lowered, "qcast_stages")


def explain(split: fx.GraphModule, backend, rows: list[tuple[str, object]]) -> tuple:
    """explain() rows of a split model, in order: a row of an engine stage as ``backend.explain`` reads it back from
    that stage's compiled model; a region row on ``torch-float``, saying it runs as Python between the engine's
    stages; a row of a float stage on ``torch-float``, saying why it stayed in torch. ``rows``: ``(node name, OpInfo)``
    as ``convert.node_records`` gives them."""
    from ..quantized import OpInfo

    where = {name: (target, kind) for target, kind, names in split.qcast_stages for name in names}
    out: list = [None] * len(rows)
    by_stage: dict[str, list[int]] = {}
    for i, (node, row) in enumerate(rows):
        target, kind = where.get(node, (None, "torch"))
        why = split.qcast_in_torch.get(node)
        if kind == "engine":
            by_stage.setdefault(target, []).append(i)
        elif kind == "float":
            ms = split.qcast_stage_ms.get(target)
            why = (f"between ops the {split.qcast_engine} backend runs in torch, in a stage with no int8 compute op: run "
                   f"in torch as the QDQ simulation (an {split.qcast_engine} call costs more than such ops)" if ms is None
                   else f"in a stage between ops run in torch that ran faster as the QDQ simulation in torch (same "
                        f"values) than on {split.qcast_engine}: {ms[1]:.3f} vs {ms[0]:.3f} ms, measured at convert")
            out[i] = OpInfo(row.name, row.op, "float", "torch-float",
                            f"planned int8 ({row.reason}); {why}" if row.precision == "int8" else f"{row.reason}; {why}")
        elif rows[i - 1][0] == node if i else False:  # a layer inside the region: its row says which region
            out[i] = row
        elif why is None:  # getitem / getattr of a value computed in torch
            out[i] = OpInfo(row.name, row.op, "float", "torch-float",
                            f"{row.reason}; reads a value computed in torch, between the {split.qcast_engine} stages")
        elif why != "region" and row.precision == "int8" and _torch_kernel_ran(split, node):
            out[i] = OpInfo(row.name, row.op, "int8", f"torch:{row.engine}",
                            f"{row.reason}; not given to {split.qcast_engine} (its converter cannot take {why}), "
                            "run by the torch backend's int8 kernel between the {split.qcast_engine} stages")
        elif why != "region":
            out[i] = OpInfo(row.name, row.op, "float", "torch-float",
                            f"{row.reason}; {split.qcast_engine} cannot convert {why}: runs in torch between the "
                            f"{split.qcast_engine} stages")
        else:
            out[i] = OpInfo(row.name, row.op, row.precision, row.engine,
                            row.reason + f"; runs in torch as Python on every call, between the {split.qcast_engine} "
                                         "stages (an engine would trace it once and freeze its branches)")
    for target, idx in by_stage.items():
        for i, row in zip(idx, backend.explain(split.get_submodule(target), [rows[i][1] for i in idx])):
            out[i] = row
    return tuple(out)
