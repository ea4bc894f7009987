"""Lowering for the torch backend: the QDQ graph rebuilt so that quantized tensors (``torch.quint8``) flow between
PyTorch's int8 kernels (``kernels/``) and float values between float ops; each QDQ point becomes a
``quantize_per_tensor`` where an int8 op reads it, a ``dequantize`` where a float op does. Torch-only rewrites happen
here: sibling per-token linears stacked into one GEMM (``kernels/dynamic.py``), SmoothQuant multiplies folded into
the per-token kernels that apply them.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...capture import attr_at, copy_io, copy_specs
from ..context import Ctx
from ...smooth import Smooth
from .kernels.dynamic import fuse_siblings


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


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
    for n in graph.nodes:  # what each value is meant to be at run time: tests check it (tests/fuzz/properties.py)
        n.meta["qcast_quantized"] = False
    for n in env_q.values():
        n.meta["qcast_quantized"] = True
    fuse_siblings(graph, root)  # per-token query/key/value linears: one GEMM
    for n in [n for n in graph.nodes if n.op == "call_module" and not n.users and isinstance(root[n.target], Smooth)]:
        graph.erase_node(n)  # a SmoothQuant multiply its per-token kernel applies itself (LinearDynamicKernel.build)
    for n in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(n)  # a constant only int8 kernels read: they hold it quantized (BinaryKernel), drop the float copy
    graph.lint()
    lowered = fx.GraphModule(root, graph, class_name=type(qdq).__name__.replace("Graph", "") + "Int8")
    copy_specs(qdq, lowered)
    return lowered
