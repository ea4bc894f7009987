"""prepare: capture, transform and insert observers -> an ObservedModel ready for calibration."""
from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import passes
from .capture import MODULE_OPS, bind_inputs, capture, is_float_tensor, propagate_shapes, remove_stubs
from .config import QuantConfig
from .data import as_call, check_finite
from .errors import WHERE_IT_RUNS, CaptureError, ConfigError, UnsupportedError
from .observers import FixedQParamsObserver, Observer, make_observer
from .quantizers import QuantizerPoint
from .plan import Ctx, is_int8, plan_graph


class ObservedModel(nn.Module):
    """The float model with observers on every edge that will be int8. Calibrate it, then convert it."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, opaque: dict[str, str], input_names: tuple[str, ...]):
        super().__init__()
        self.gm = gm
        self.qcast_config = config
        self.qcast_opaque = dict(opaque)
        self.qcast_input_names = tuple(input_names)
        self.qcast_summary = None
        # module path -> ChannelMean of that int8 conv/linear's input (filled by calibrate() for bias_correction)
        self.qcast_input_stats: dict = {}

    def forward(self, *args, **kwargs):
        return self.gm(*args, **kwargs)

    def observers(self) -> list[tuple[str, Observer]]:
        return [(n, m) for n, m in self.gm.named_children() if isinstance(m, Observer)]


def as_config(config: Any) -> QuantConfig:
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    raise ConfigError(f"config must be a QuantConfig or dict, got {type(config).__name__}")


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            raise UnsupportedError(
                f"'{name}' is on {t.device}. {WHERE_IT_RUNS}: qcast.quantize(copy.deepcopy(model).cpu(), data)")


def placeholder_values(gm: fx.GraphModule, names: list[str], values: list[Any]) -> list[Any]:
    given = dict(zip(names, values))
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            key = str(n.target).lstrip("*")
            out.append(given[key] if key in given else (n.args[0] if n.args else None))
    return out


def prepare(model: nn.Module, example_inputs: Any, config: QuantConfig | dict | None = None, *,
            keep_bn: bool = False) -> ObservedModel:
    """Capture ``model`` (a private copy; the original is untouched), fuse, plan int8 ops, insert observers.
    ``keep_bn``: keep each folded BatchNorm and its unfolded conv aside (``gm.meta['qcast_bn_sources']``, for QAT)."""
    config = as_config(config)
    check_model(model)
    args, kwargs = as_call(example_inputs, "example_inputs")
    check_finite(args, kwargs, "example_inputs")
    if config.backend not in ("torch", "auto"):
        from .backends import get_backend
        get_backend(config.backend)  # UnsupportedError: unknown, or its engine is not installed (with the pip command)
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        captured = capture(work, args, kwargs)
        gm = captured.gm
        check_patterns(gm, config, captured.opaque, work)
        remove_stubs(gm)
        _debug("capture", gm)
        names, values = bind_inputs(work, args, kwargs)
        transform(gm, config, placeholder_values(gm, names, values), keep_bn=keep_bn)
        plan_graph(gm, config, captured.opaque)
        insert_observers(gm, config)
        insert_simulation(gm)
        _debug("observe", gm)
    return ObservedModel(gm, config, captured.opaque, captured.input_names)


def check_patterns(gm: fx.GraphModule, config: QuantConfig, opaque: dict[str, str], model: nn.Module) -> None:
    """Raise ConfigError for a ``skip`` / ``per_layer`` pattern that matches no op of the captured model (it would
    otherwise be ignored without a word). Layers inside uncaptured regions count: explain() lists them."""
    ops = [(n.meta["qcast_name"], n.meta["qcast_op"], n.meta.get("qcast_path", "")) for n in gm.graph.nodes
           if n.op in ("call_module", "call_function", "call_method")]
    ops += passes.decomposed_ops(gm)  # the ops scaled_dot_product_attention calls become, as explain() names them
    for path in opaque:
        for sub, m in model.get_submodule(path).named_modules():
            if sub:
                op = next((MODULE_OPS[c] for c in type(m).__mro__ if c in MODULE_OPS), type(m).__name__)
                ops.append((f"{path}.{sub}", op, f"{path}.{sub}"))
    bad = config.unmatched(ops)
    if not bad:
        return
    field, pattern = bad[0]
    names = list(dict.fromkeys(name for name, _, _ in ops))
    ops_seen = sorted({op for _, op, _ in ops if op})
    literal = re.split(r"[*?\[]", pattern)[0]  # 'layer1' in 'layer1', 'fc.weight' -> 'fc', 'layer5.*' -> 'layer5.'
    close = ([n for n in names if literal and (n.startswith(literal) or literal.startswith(n + "."))][:5]
             or difflib.get_close_matches(pattern, names + ops_seen, n=5, cutoff=0.6))
    examples = close or names[:6]
    others = [p for _, p in bad[1:]]
    container = any(n.startswith(pattern + ".") for n in names)
    raise ConfigError(
        f"QuantConfig.{field} pattern {pattern!r} matches no layer or op of {type(model).__name__}"
        + (f" (nor do {others})" if others else "") + ". "
        + (f"'{pattern}' is a container module; to match the layers inside it use '{pattern}.*'. " if container else "")
        + "A pattern is a module-path glob ('layer1.*'), a name as qcast.explain() shows it ('layer1.0:add'), or an "
        f"op name ({', '.join(repr(o) for o in ops_seen[:8])}); "
        f"{'close matches' if close else 'some names in this model'}: {examples}. Fix the pattern or remove it.")


def transform(gm: fx.GraphModule, config: QuantConfig, values: list[Any], keep_bn: bool = False) -> None:
    """The graph passes, in place: fold constants, functional layers into modules, fold BN, equalize (``config.equalize``), fuse, then SmoothQuant's
    ``Smooth`` nodes (``config.smoothquant``; identities until calibration picks their scales). Fusing a residual
    add depends on shapes, so shapes are propagated (``node.meta['qcast_val']``) before ``equalize`` / ``fuse`` and again
    after it for the nodes it creates. The equalization summary goes to ``gm.meta['qcast_equalization']``.
    ``compare`` runs this too, so its float graph has the same op names as the quantized one."""
    passes.fold_constants(gm)
    _debug("fold_constants", gm)
    if passes.functional_layers(gm):  # F.conv2d/F.linear/x @ W with a model-owned weight -> the standard layer
        _debug("functional_layers", gm)
    passes.fold_bn(gm, keep=keep_bn)
    _debug("fold_bn", gm)
    propagate_shapes(gm, values)
    if passes.decompose_sdpa(gm, config):  # needs shapes (the query's head dim)
        _debug("decompose_sdpa", gm)
        propagate_shapes(gm, values)  # for the nodes it created
    if config.equalize:  # rescales weights only: shapes stay valid
        gm.meta["qcast_equalization"] = passes.equalize(gm, config)
        _debug("equalize", gm)
    from .backends import conv_add_rule
    passes.fuse(gm, config, conv_add=conv_add_rule(config.backend))
    _debug("fuse", gm)
    from .passes.smooth import smooth  # QuantConfig(smoothquant=...): Smooth before int8 linears (qcast/smooth.py)
    if smooth(gm, config):
        _debug("smooth", gm)
    propagate_shapes(gm, values)


def _origin(node: fx.Node) -> fx.Node:
    """The value whose quantization params an int8 value carries (walks back over passthrough ops)."""
    while is_int8(node) and node.meta["qcast_plan"].kind == "passthrough":
        node = node.meta["qcast_plan"].kernel.impl.quant_inputs(node)[0]
    return node


def insert_observers(gm: fx.GraphModule, config: QuantConfig) -> None:
    ctx = Ctx(gm, config)
    wanted: dict[fx.Node, dict] = {}  # value -> {"qmax":..., "estimator":..., "fixed": qp}
    for node in gm.graph.nodes:
        if not is_int8(node):
            continue
        plan = node.meta["qcast_plan"]
        scheme = config.activation_scheme(plan.name, plan.op, plan.path)
        if plan.kind in ("compute", "fixed") and not plan.float_out:  # float_out: no int8 op reads it (placement)
            spec = wanted.setdefault(node, {"qmax": 255, "estimator": ctx.setting(node, "calibration"),
                                            "scheme": scheme})
            if plan.kind == "fixed":
                spec["fixed"] = plan.kernel.impl.fixed_qparams
        for inp in plan.kernel.impl.quant_inputs(node):
            origin = _origin(inp)
            spec = wanted.setdefault(origin, {"qmax": 255, "estimator": ctx.setting(node, "calibration"),
                                              "scheme": scheme})
            if plan.kind == "compute":
                spec["qmax"] = min(spec["qmax"], plan.input_qmax)
    for i, (value, spec) in enumerate(sorted(wanted.items(), key=lambda kv: list(gm.graph.nodes).index(kv[0]))):
        vname = value.meta.get("qcast_name", value.name)
        if not is_float_tensor(value):  # plan_graph keeps such ops in float; an observer here would never see data
            raise UnsupportedError(f"internal error: {vname} would be observed for int8 but is not a floating-point "
                                   "tensor; please report this with the model. Workaround: QuantConfig(skip=[...]) "
                                   "on the ops that consume it")
        scheme = spec.get("scheme")
        if "fixed" in spec:
            obs = FixedQParamsObserver(vname, spec["fixed"])
        elif scheme is not None and scheme.custom:  # a registered quantizer: it observes, and declares its grid
            obs = QuantizerPoint(vname, scheme.quantizer(), qmax=spec["qmax"])
        else:
            obs = make_observer(spec["estimator"], vname, qmax=spec["qmax"], percentile=config.percentile)
            obs.scheme = scheme  # None: uint8 affine; else int8_sym, pow2, ... (Observer.qparams)
        target = f"qcast_obs_{i}"
        gm.add_submodule(target, obs)
        anchor = value
        if value.op == "placeholder":  # observers go after the last placeholder
            anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(anchor):
            obs_node = gm.graph.call_module(target, (value,))
        obs_node.meta["qcast_observes"] = value
        obs_node.meta["qcast_val"] = value.meta.get("qcast_val")
        value.replace_all_uses_with(obs_node, delete_user_cb=lambda u: u is not obs_node)
    gm.graph.lint()
    gm.recompile()


def insert_simulation(gm: fx.GraphModule) -> None:
    """For each conv/linear simulated with a registered quantizer that declares no grid (``plan._simulated``): a
    ``QuantizerPoint`` on its input (calibrated like an observer, fake-quantizing once convert activates it) and
    its weight quantizer as a submodule, ``gm.meta['qcast_sim_weights']`` (module path -> quantizer path)."""
    k = 0
    for node in list(gm.graph.nodes):
        sim = node.meta.get("qcast_simulate")
        if not sim:
            continue
        name = node.meta.get("qcast_name", node.name)
        if sim["weight"] is not None:
            target = f"qcast_simw_{k}"
            fq = sim["weight"].quantizer()
            gm.add_submodule(target, fq)
            gm.meta.setdefault("qcast_sim_weights", {})[node.target] = target
        x = node.args[0] if node.args else None
        if sim["activation"] is not None and isinstance(x, fx.Node) and is_float_tensor(x):
            target = f"qcast_sim_{k}"
            gm.add_submodule(target, QuantizerPoint(f"{name} (input)", sim["activation"].quantizer()))
            with gm.graph.inserting_before(node):
                point = gm.graph.call_module(target, (x,))
            point.meta["qcast_val"] = x.meta.get("qcast_val")
            node.replace_input_with(x, point)
        k += 1
    gm.graph.lint()
    gm.recompile()


def _debug(stage: str, gm: fx.GraphModule) -> None:
    if os.environ.get("QCAST_DEBUG"):
        print(f"---- qcast: graph after {stage} ----")
        gm.graph.print_tabular() if os.environ.get("QCAST_DEBUG") == "2" else print(gm.code)
