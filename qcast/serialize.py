"""save / load: one safetensors file holding int8 weights, with a versioned JSON manifest in its metadata.

The manifest is stored zlib-compressed (base64) under ``qcast_manifest_zlib``, next to plain ``qcast_format``
and ``qcast_version`` keys: on a small detector the plain JSON was a fifth of the file. Version-1 files (plain
JSON under ``qcast_manifest``) still load. ``qcast explain FILE`` prints what the manifest says.

Version 3 stores the backend-neutral QDQ graph (``convert.to_qdq``: each node with its plan, shapes and names; int8
conv/linear weights as int8 + per-channel scales, rebuilt bit-exactly), and ``load(path, backend=...)`` lowers it for
the machine it runs on, like ``convert``. Files of versions 1-2 hold the torch backend's lowered graph and still load
as such.

No pickle anywhere. The manifest records the graph (nodes, targets, arguments), each module as a spec
(an int8 kernel by class name + config, a standard ``torch.nn`` layer by class + constructor arguments),
the explain() rows, the config and calibration facts, and a SHA-256 of all tensor bytes. Regions that
are the user's own Python code (uncaptured modules, custom functions) are rebuilt from the float model
passed as ``load(path, model=...)``; a file that needs it says so.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import importlib
import inspect
import json
import operator
import os
import threading
import zlib
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import attr_at
from .errors import FormatError, QcastError
from .backends.torch.kernels import backends
from .backends.torch.kernels.base import KERNEL_MODULES, KernelModule
from .nn import FusedBatchNorm, FusedConv
from .observers import qmax_from_json, qmax_to_json
from .quantized import QDQ, OpInfo, QuantizedModel
from .smooth import Smooth

FORMAT = "qcast"
VERSION = 3
_SAFE_MODULE_PREFIXES = ("torch", "operator", "_operator", "builtins", "math", "qcast")


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def _enc(a: Any, where: str) -> Any:
    if isinstance(a, fx.Node):
        return {"__node__": a.name}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, tuple):
        return {"__tuple__": [_enc(x, where) for x in a]}
    if isinstance(a, list):
        return [_enc(x, where) for x in a]
    if isinstance(a, dict):
        return {"__dict__": [[_enc(k, where), _enc(v, where)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"__slice__": [_enc(a.start, where), _enc(a.stop, where), _enc(a.step, where)]}
    if isinstance(a, torch.dtype):
        return {"__dtype__": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"__device__": str(a)}
    if isinstance(a, torch.memory_format):
        return {"__memory_format__": str(a).replace("torch.", "")}
    if isinstance(a, torch.layout):
        return {"__layout__": str(a).replace("torch.", "")}
    if a is Ellipsis:
        return {"__ellipsis__": True}
    raise FormatError(f"{where}: cannot save an argument of type {type(a).__name__} ({a!r})")


def _dec(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_dec(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "__node__":
        return nodes[v]
    if tag == "__tuple__":
        return tuple(_dec(x, nodes) for x in v)
    if tag == "__dict__":
        return {_dec(k, nodes): _dec(x, nodes) for k, x in v}
    if tag == "__slice__":
        return slice(*(_dec(x, nodes) for x in v))
    if tag in ("__dtype__", "__memory_format__", "__layout__"):
        value = getattr(torch, v, None) if isinstance(v, str) and not v.startswith("_") else None
        if not isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            raise FormatError(f"{v!r} is not a torch dtype/layout/memory format; the manifest was tampered with")
        return value
    if tag == "__device__":
        return torch.device(v)
    if tag == "__ellipsis__":
        return Ellipsis
    raise FormatError(f"unknown argument tag {tag!r} in the manifest")


#: operator namespaces a saved graph may call through ``torch.ops`` (graphs captured by torch.export call ATen ops)
_SAFE_OP_NAMESPACES = ("aten", "quantized", "prims", "onednn")


def _fn_name(fn) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return f"torch.ops:{fn.name().replace('::', '.')}" + ("" if "." in fn.name() else ".default")
    mod = getattr(fn, "__module__", None) or ""
    if fn in (getattr, setattr) or mod == "builtins":
        return f"builtins.{fn.__name__}"
    if mod == "_operator":
        mod = "operator"
    try:  # builtins bound on a module (torch.cat, torch.quantize_per_tensor) are found by their plain name
        if getattr(importlib.import_module(mod), fn.__name__, None) is fn:
            return f"{mod}:{fn.__name__}"
    except ImportError:
        pass
    return f"{mod}:{fn.__qualname__}"


def _model_needed(what: str) -> FormatError:
    """The FormatError for a file that needs the float model to load; ``.needs_model`` holds ``what`` so the command
    line can say its own fix (``--model MODULE:FACTORY``)."""
    err = FormatError(f"{what}: pass the float model so qcast can use it, qcast.load(path, model=model)")
    err.needs_model = what
    return err


#: qcast modules that moved since files were written: the old name (what files of earlier versions hold) -> the new
#: one. ``qcast/kernels/`` became the torch backend's ``qcast/backends/torch/kernels/``; ``masked_softmax`` (called by
#: a decomposed attention's graph) moved with its pass but is still importable from the old module.
MOVED_MODULES = {"qcast.kernels": "qcast.backends.torch.kernels"}


def _moved(mod_name: str) -> str:
    for old, new in MOVED_MODULES.items():
        if mod_name == old or mod_name.startswith(old + "."):
            return new + mod_name[len(old):]
    return mod_name


#: builtins a saved graph may call (fx graphs call getattr/len on sizes); never eval, exec, open, __import__ & co.
_SAFE_BUILTINS = frozenset({"getattr", "len", "int", "float", "bool", "min", "max", "abs", "round", "range", "slice",
                            "tuple", "list", "sum", "pow", "divmod", "isinstance"})
#: torch modules whose functions read files, compile or run code, or change process state: never called by a graph
_UNSAFE_TORCH = ("torch.hub", "torch.serialization", "torch.utils", "torch.jit", "torch.package", "torch.multiprocessing",
                 "torch.distributed", "torch._dynamo", "torch.compiler", "torch._inductor", "torch.cuda", "torch.backends",
                 "torch.library", "torch.export", "torch._export", "torch.onnx", "torch._C._dynamo",
                 "torch.storage", "torch._weights_only_unpickler", "torch.overrides")
_UNSAFE_TORCH_NAMES = frozenset({"load", "save", "from_file", "compile", "set_default_device", "set_default_dtype",
                                 "set_num_threads", "manual_seed", "seed", "use_deterministic_algorithms"})
#: qcast modules whose functions a saved graph may call (its own ops), never the CLI or the API
_QCAST_FN_MODULES = ("qcast.nn", "qcast.passes", "qcast.backends.torch.kernels", "qcast.capture_export",
                     "qcast.quantized", "qcast.smooth", "qcast.observers", "qcast.quantizers", "qcast.schemes")
#: the dunder methods a graph may call on a tensor (everything else starting with '_' is refused)
_SAFE_DUNDERS = frozenset({"__getitem__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                           "__truediv__", "__rtruediv__", "__floordiv__", "__matmul__", "__neg__", "__pow__"})


#: ATen operators whose names are dunders (``torch.ops.aten.__and__.Tensor``), callable from a saved graph
_ATEN_DUNDER_OPS = frozenset({"__and__", "__or__", "__xor__", "__lshift__", "__rshift__"})


def _refuse(what: str) -> FormatError:
    return FormatError(f"the saved graph {what}: refusing to load (qcast never writes that; the file was tampered "
                       "with or is not from qcast.save)")


def _safe_name(s: Any, what: str, dotted: bool = False) -> str:
    """``s`` as a name fx may write into the code it generates (node targets, keyword names, argument names): only
    identifier characters, so that a tampered manifest cannot inject code into the generated forward()."""
    parts = s.split(".") if dotted and isinstance(s, str) else [s]
    if not all(isinstance(p, str) and p and all(c.isalnum() or c == "_" for c in p) and p.isascii() for p in parts):
        raise _refuse(f"names {what} {s!r}")
    return s


def _resolve_fn(name: str, allowed_modules: set[str]):
    if not isinstance(name, str):
        raise _refuse(f"calls {name!r}")
    if name.startswith("builtins."):
        import builtins
        fn = name.split(".", 1)[1]
        if fn not in _SAFE_BUILTINS:
            raise _refuse(f"calls builtins.{fn}")
        return getattr(builtins, fn)
    mod_name, _, qual = name.partition(":")
    parts = qual.split(".")
    # ATen's own operator names (torch.export graphs call aten.__and__.Tensor for a mask's `&`): looked up among the
    # operators of the namespace, never as a Python attribute of an object
    aten_dunder = mod_name == "torch.ops" and len(parts) >= 2 and parts[1] in _ATEN_DUNDER_OPS and \
        not any(p.startswith("__") for p in parts[:1] + parts[2:])
    if not aten_dunder and any(p.startswith("__") for p in parts):
        raise _refuse(f"calls {name}")
    if mod_name.startswith(_UNSAFE_TORCH) or (mod_name.split(".")[0] == "torch" and qual.split(".")[-1] in _UNSAFE_TORCH_NAMES):
        raise _refuse(f"calls {name}")
    if mod_name.split(".")[0] == "qcast" and not _moved(mod_name).startswith(_QCAST_FN_MODULES) \
            and mod_name not in allowed_modules:
        raise _refuse(f"calls {name}")
    if mod_name == "torch.ops":
        namespace, op, overload = (qual.split(".") + ["default"])[:3]
        if namespace not in _SAFE_OP_NAMESPACES:
            raise FormatError(f"the saved graph calls torch.ops.{qual}, outside {_SAFE_OP_NAMESPACES}: refusing to load")
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    if not (mod_name.split(".")[0] in _SAFE_MODULE_PREFIXES or mod_name in allowed_modules):
        raise _model_needed(f"the saved graph calls {name}, which is your own code")
    try:
        obj = importlib.import_module(_moved(mod_name))
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise FormatError(f"the saved graph calls {name}, which this installation does not have ({e}); the file was "
                          "written by another qcast/torch version or tampered with") from None
    where = getattr(obj, "__module__", None) or ""
    if isinstance(where, str) and where.startswith(_UNSAFE_TORCH) and mod_name not in allowed_modules:
        raise _refuse(f"calls {name} ({where})")
    return obj


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
def _is_torch_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn.") and not list(m.children())


#: constructor arguments of the recurrent layers, whose __init__ takes (*args, **kwargs)
_RNN_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def _init_kwargs(m: nn.Module) -> dict | None:
    if isinstance(m, nn.RNNBase):
        kw = {k: getattr(m, k) for k in _RNN_ARGS}
        if isinstance(m, nn.LSTM):
            kw["proj_size"] = m.proj_size
        elif isinstance(m, nn.RNN):
            kw["nonlinearity"] = m.nonlinearity
        return kw
    kw = {}
    init, skip = type(m).__init__, ("self", "device", "dtype")
    if isinstance(m, (nn.LSTM, nn.GRU)):  # their __init__ takes (*args, **kwargs): RNNBase's names them (less mode)
        init, skip = nn.RNNBase.__init__, skip + ("mode",)
    for name, p in inspect.signature(init).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "bias" and isinstance(getattr(m, "bias", None), (torch.Tensor, type(None))):
            kw[name] = getattr(m, "bias", None) is not None
            continue
        if name == "affine" and hasattr(m, "affine"):
            kw[name] = m.affine
            continue
        if not hasattr(m, name):
            if p.default is inspect.Parameter.empty:
                return None
            continue
        v = getattr(m, name)
        if isinstance(v, torch.Tensor):
            return None
        kw[name] = v
    return kw


def _module_spec(path: str, m: nn.Module, tensors: dict[str, torch.Tensor], kernel: str = "") -> dict:
    """``kernel``: the int8 kernel the module's call runs ("" for none): its weight may then be stored in the 8-bit form
    that kernel quantizes it to (``_compact_weight``)."""
    if isinstance(m, KernelModule):
        config, ts = m.spec()
        for k, t in ts.items():
            tensors[f"{path}::{k}"] = t
        return {"kind": "kernel", "class": type(m).__name__, "config": _enc(config, path), "tensors": sorted(ts)}
    if isinstance(m, FusedConv):
        inner = _module_spec(path + ".conv", m.conv, tensors, kernel)
        return {"kind": "fused", "act": m.act, "add": m.add, "conv": inner}
    if isinstance(m, FusedBatchNorm):
        return {"kind": "fused_bn", "bn": _module_spec(path + ".bn", m.bn, tensors)}
    if isinstance(m, Smooth):  # SmoothQuant's float per-channel multiply before an int8 linear
        config, ts = m.spec()
        for k, t in ts.items():
            tensors[f"{path}::{k}"] = t
        return {"kind": "smooth", "config": _enc(config, path), "tensors": sorted(ts)}
    if isinstance(m, QDQ):
        return {"kind": "qdq", "name": m.name, "qparams": m.qparams.to_dict()}
    if _is_torch_module(m):
        kw = _init_kwargs(m)
        if kw is not None:
            try:
                rebuilt = type(m)(**kw)
                rebuilt.load_state_dict(m.state_dict())
            except Exception:  # noqa: BLE001 - not rebuildable from its attributes: fall back to the user's model
                kw = None
        if kw is not None:
            state = m.state_dict()
            compact = (_compact_weight(m, dynamic=kernel == "linear:dynamic") if kernel and isinstance(
                m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)) else None)
            if compact is not None:  # an int8 layer of a QDQ graph: its weight in the 8-bit form it runs as
                del state["weight"]
                tensors.update({f"{path}::{k}": t for k, t in compact[1].items()})
            for k, t in state.items():
                tensors[f"{path}::{k}"] = t
            spec = {"kind": "torch", "class": f"{type(m).__module__}:{type(m).__qualname__}",
                    "init": _enc(kw, path), "tensors": sorted(state)}
            if compact is not None:
                spec["weight"] = compact[0]
                if hasattr(m, "qcast_weight_qmax"):  # the grid to_qdq put it on (read by the backends)
                    spec["weight_qmax"] = qmax_to_json(m.qcast_weight_qmax)
            return spec
    return {"kind": "user", "class": f"{type(m).__module__}.{type(m).__qualname__}"}


def _on_grid(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight ``q * scale`` per output channel, computed as the torch backend's quantizer computes it."""
    zeros = torch.zeros(scales.shape[0], dtype=torch.long)
    return torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0).dequantize()


def _rows_on_grid(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """An embedding table from its 8-bit rows, as ``QEmbedding`` dequantizes them."""
    return (q.float() - zero_points[:, None]) * scales[:, None]


def _grid_of(w: torch.Tensor, qmax: int, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8, per-channel scales) of a conv/linear weight as its kernel quantizes it: ``QConv`` through
    ``quantize_weight``, the per-token ``QLinearDynamic`` by ``round(w / scale)`` (the two can round a tie apart)."""
    from .observers import qmax_bound, quantize_weight, weight_scales
    if dynamic:
        scale = weight_scales(w, qmax)
        bound = qmax_bound(qmax)
        return torch.round(w.float() / scale[:, None]).clamp_(-bound, bound).to(torch.int8), scale.float()
    wq = quantize_weight(w, qmax)
    return wq.int_repr(), wq.q_per_channel_scales().float()


def _compact_weight(m: nn.Module, dynamic: bool) -> tuple[str, dict[str, torch.Tensor]] | None:
    """An int8 layer's weight (in a QDQ graph) as the 8-bit form its kernel quantizes it to: ``("grid", {int8,
    scales})`` for a conv/linear (per-channel symmetric), ``("rows", {uint8, scales, zero_points})`` for an
    embedding. A conv/linear uses it only when the weight rebuilt from it quantizes to the very same ints and scales
    (checked here); an embedding's rows are given to its kernel as stored (``qcast_rows``). Either way a loaded model
    computes bit for bit what the saved one did; the rebuilt float weight is the grid's (what actually runs). None:
    keep the float weight."""
    from .backends.torch.kernels.transformer import QEmbedding

    w = m.weight.detach()
    if isinstance(m, nn.Embedding):  # its rows re-quantize differently: load hands them to the kernel as they are
        kernel = QEmbedding.from_float(w)
        return ("rows", {"weight_uint8": kernel.weight_uint8, "weight_scales": kernel.scales,
                         "weight_zero_points": kernel.zero_points})
    qmax = getattr(m, "qcast_weight_qmax", 127)
    q, scales = _grid_of(w, qmax, dynamic)
    w2 = _on_grid(q, scales)
    same = all(torch.equal(a, b) for a, b in zip(_grid_of(w2, qmax, dynamic), (q, scales)))
    return ("grid", {"weight_int8": q, "weight_scales": scales}) if same else None


def _build_module(path: str, spec: dict, tensors: dict, model: nn.Module | None) -> nn.Module:
    kind = spec["kind"]
    if kind == "kernel":
        cls = KERNEL_MODULES.get(spec["class"])
        if cls is None:
            raise FormatError(f"{path}: unknown int8 kernel {spec['class']!r} (saved by a newer qcast?)")
        ts = {k: tensors[f"{path}::{k}"] for k in spec["tensors"]}
        return cls.from_spec(_dec(spec["config"], {}), ts)
    if kind == "fused":
        return FusedConv(_build_module(path + ".conv", spec["conv"], tensors, model), act=spec["act"], add=spec["add"])
    if kind == "fused_bn":
        return FusedBatchNorm(_build_module(path + ".bn", spec["bn"], tensors, model))
    if kind == "smooth":
        return Smooth.from_spec(_dec(spec["config"], {}), {k: tensors[f"{path}::{k}"] for k in spec["tensors"]})
    if kind == "torch":
        mod_name, _, qual = spec["class"].partition(":")
        if not mod_name.startswith("torch.nn."):
            raise FormatError(f"{path}: refusing to build {spec['class']!r}: not a torch.nn layer")
        cls = _resolve_fn(spec["class"], set())
        m = cls(**_dec(spec["init"], {}))
        state = {k: tensors[f"{path}::{k}"] for k in spec["tensors"]}
        if spec.get("weight") == "grid":
            state["weight"] = _on_grid(tensors[f"{path}::weight_int8"], tensors[f"{path}::weight_scales"])
        elif spec.get("weight") == "rows":
            rows = tuple(tensors[f"{path}::weight_{k}"] for k in ("uint8", "scales", "zero_points"))
            state["weight"] = _rows_on_grid(*rows)
            m.qcast_rows = rows  # what EmbeddingKernel.build packs (re-quantizing the rows would round some apart)
        if "weight_qmax" in spec:
            m.qcast_weight_qmax = qmax_from_json(spec["weight_qmax"])
        m.load_state_dict(state)
        # as in the quantized model (prepare works on a copy without grads): PyTorch picks other CPU kernels for an
        # LSTM/GRU whose weights require grad, with other rounding (found by tests/fuzz)
        m.requires_grad_(False)
        return m.eval()
    if kind == "qdq":
        from .observers import QParams
        return QDQ(QParams(**spec["qparams"]), spec["name"])
    if kind == "user":
        if model is None:
            raise _model_needed(f"this file contains '{path}' ({spec['class']}), which is your own Python code that "
                                "qcast keeps in float")
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            raise FormatError(f"the model passed to load() has no submodule '{path}' ({spec['class']}); pass the "
                              "same float model that was quantized") from None
        sub_cls = f"{type(sub).__module__}.{type(sub).__qualname__}"
        if sub_cls != spec["class"]:
            raise FormatError(f"'{path}' in the model passed to load() is {sub_cls}, the file expects {spec['class']}")
        return copy.deepcopy(sub).eval().requires_grad_(False)  # as quantize's copy (see kind "torch")
    raise FormatError(f"{path}: unknown module kind {kind!r}")


# ------------------------------------------------------------------------------------------------
# node meta of a QDQ graph: what lowering reads (plans, shapes, names, observed values)
# ------------------------------------------------------------------------------------------------
def _enc_meta(v: Any, where: str) -> Any:
    from .capture import TensorMeta
    from .plan import Plan
    if isinstance(v, TensorMeta):
        return {"__tensor_meta__": [str(v.dtype).replace("torch.", ""), list(v.shape)]}
    if isinstance(v, Plan):
        fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.name not in ("fused", "kernel")}
        fields["fused"] = list(v.fused)
        fields["kernel"] = [v.kernel.op, v.kernel.backend] if v.kernel is not None else None
        return {"__plan__": fields}
    if isinstance(v, (tuple, list)) and any(isinstance(x, (TensorMeta, Plan)) for x in v):
        return {"__tuple__" if isinstance(v, tuple) else "__list__": [_enc_meta(x, where) for x in v]}
    return _enc(v, where)


def _dec_meta(v: Any, nodes: dict[str, fx.Node]) -> Any:
    from .capture import TensorMeta
    from .backends.torch.kernels import lookup
    from .plan import Plan
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "__tensor_meta__":
            return TensorMeta(getattr(torch, x[0]), tuple(x[1]))
        if tag == "__plan__":
            kernel = lookup(*x["kernel"]) if x["kernel"] else None
            if x["kernel"] and kernel is None:
                raise FormatError(f"{x['name']}: the file uses the int8 kernel {x['kernel']}, which this qcast lacks "
                                  "(saved by a newer qcast?)")
            return Plan(**{**x, "fused": tuple(x["fused"]), "kernel": kernel})
        if tag in ("__tuple__", "__list__"):
            items = [_dec_meta(i, nodes) for i in x]
            return tuple(items) if tag == "__tuple__" else items
    return _dec(v, nodes)


def _node_meta(n: fx.Node, where: str) -> dict:
    return {k: _enc_meta(v, f"{where}: node meta {k!r}") for k, v in n.meta.items() if k.startswith("qcast_")}


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(qmodel: QuantizedModel, path: str | os.PathLike) -> None:
    """Write ``qmodel`` to ``path`` (safetensors + JSON manifest). Written atomically: no half files.

    What is written is the model's backend-neutral QDQ graph, whatever backend runs it here; a model read from a
    version 1-2 file (which has none) is written as the torch backend's graph it holds."""
    from safetensors.torch import save as save_bytes

    if not isinstance(qmodel, QuantizedModel):
        raise FormatError(f"save() needs a model returned by qcast.quantize/convert/load, got {type(qmodel).__name__}")
    qdq = qmodel.qcast_qdq
    gm, kind = (qdq, "qdq") if qdq is not None else (qmodel.graph_module, "torch")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    attrs: dict[str, str] = {}
    nodes = []
    for n in gm.graph.nodes:
        where = n.meta.get("qcast_name", n.name)
        entry = {"name": n.name, "op": n.op, "args": _enc(n.args, where), "kwargs": _enc(n.kwargs, where),
                 "qcast_name": n.meta.get("qcast_name"), "qcast_op": n.meta.get("qcast_op")}
        if kind == "qdq":
            entry["meta"] = _node_meta(n, where)
        if n.op == "call_function":
            entry["target"] = _fn_name(n.target)
        else:
            entry["target"] = n.target
        if n.op == "call_module" and n.target not in modules:
            plan = n.meta.get("qcast_plan")
            int8 = kind == "qdq" and plan is not None and plan.precision == "int8" and plan.kernel is not None
            modules[n.target] = _module_spec(n.target, gm.get_submodule(n.target), tensors,
                                             plan.kernel.op if int8 else "")
        if n.op == "get_attr" and n.target not in attrs:
            obj = attr_at(gm, n.target)
            if not isinstance(obj, torch.Tensor):
                raise FormatError(f"{where}: cannot save attribute {n.target!r} of type {type(obj).__name__}")
            tensors[f"attr::{n.target}"] = obj.detach()
            attrs[n.target] = f"attr::{n.target}"
        nodes.append(entry)
    qmeta, rows = qmodel.qcast_meta, qmodel.qcast_records
    # measurements of this process (timings of the speed check and of auto's candidates) are not written: the same
    # model quantized twice saves to the same bytes (tests/test_concurrency.py). auto's plan decision stays (load
    # reports it), with its figures.
    meta = {k: v for k, v in qmeta.items() if k not in ("calibration_summary", "accuracy_search", "speed",
                                                        "backend_choice")}
    if "plans" in qmeta.get("backend_choice", {}):
        meta["backend_choice"] = {"plans": qmeta["backend_choice"]["plans"]}
    manifest = {
        "format": FORMAT, "version": VERSION, "graph": kind, "nodes": nodes, "modules": modules, "attrs": attrs,
        # a QDQ graph's explain() rows come from lowering it at load: only a torch graph (formats 1-2) keeps them
        "records": [r.__dict__ for r in rows] if kind == "torch" else [], "meta": _enc(meta, "meta"),
        "sha256": _digest(tensors), "class_name": type(gm).__name__, "pytree": _pytree_io(gm),
    }
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    blob = _canonical_header(save_bytes(tensors, metadata=manifest_to_metadata(manifest)))
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as e:
            raise FormatError(f"{os.fspath(path)}: cannot write the file ({e.strerror or e}); save() takes the path of "
                              "a file in an existing, writable folder") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _canonical_header(blob: bytes) -> bytes:
    """The safetensors bytes with their JSON header written in sorted key order: safetensors serializes the metadata
    from a hash map whose order changes from call to call, so the same model saved twice gave different bytes
    (found by tests/fuzz). The tensor data and offsets are unchanged; the header is padded to 8 bytes as the format
    requires."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n:]


def _pytree_io(gm: fx.GraphModule) -> dict | None:
    """The input/output structure of a graph captured through torch.export (``None`` for a plain fx graph)."""
    import torch.utils._pytree as pytree

    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return None
    try:
        return {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    except Exception as e:  # noqa: BLE001 - an output type pytree cannot serialize
        raise FormatError(f"cannot save the model's input/output structure: {e}") from None


#: packages whose modules load() may import to rebuild a saved input/output type (besides already-imported ones)
_PYTREE_PACKAGES = ("transformers", "torch")


def _import_pytree_types(io: dict) -> None:
    """Import the modules that define the saved input/output types (e.g. ``transformers.modeling_outputs``, which
    registers ``BaseModelOutput...`` with pytree when imported). A file names them, so only modules of packages in
    ``_PYTREE_PACKAGES`` or already imported by the caller are imported, and only when installed."""
    import importlib.util
    import sys

    names: set[str] = set()

    def walk(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("type"), str):
                names.add(obj["type"])
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for key in ("in_spec", "out_spec"):
        if io.get(key):
            try:
                walk(json.loads(io[key]))
            except ValueError:
                pass
    for name in names:
        module = name.rpartition(".")[0]
        package = module.partition(".")[0]
        if not module or not (package in _PYTREE_PACKAGES or package in sys.modules) \
                or importlib.util.find_spec(package) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - reported by the caller's retry
            pass


def _restore_pytree_io(gm: fx.GraphModule, io: dict | None, path: str) -> None:
    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    if not io:
        return
    for name in io.get("orig_args", []):  # written into the generated forward's signature
        _safe_name(name, "the input")

    def specs():
        return (pytree.treespec_loads(io["in_spec"]),
                pytree.treespec_loads(io["out_spec"]) if io.get("out_spec") else None)

    try:
        in_spec, out_spec = specs()
    except Exception:  # noqa: BLE001 - e.g. the module defining the output class is not imported yet
        _import_pytree_types(io)
        try:
            in_spec, out_spec = specs()
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{path}: the model's output structure cannot be rebuilt ({e}); install and import "
                              "the package that defines the output type before qcast.load") from None
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(list(io["orig_args"]), in_spec, out_spec))
    gm._in_spec, gm._out_spec = in_spec, out_spec
    gm.recompile()


def manifest_to_metadata(manifest: dict) -> dict[str, str]:
    """The safetensors metadata holding ``manifest``: compact JSON, zlib-compressed, base64."""
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    return {"qcast_format": FORMAT, "qcast_version": str(manifest["version"]),
            "qcast_manifest_zlib": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}


def metadata_to_manifest(metadata: dict[str, str], path: str = "file") -> dict:
    """The manifest stored by ``manifest_to_metadata`` (or a version-1 file's plain JSON); FormatError if unreadable."""
    version = metadata.get("qcast_version", "1")
    if version.isdigit() and int(version) > VERSION:
        raise FormatError(f"{path}: written by a newer qcast (format version {version}, this qcast reads up to "
                          f"{VERSION}); upgrade qcast to load it")
    try:
        if "qcast_manifest_zlib" in metadata:
            text = zlib.decompress(base64.b64decode(metadata["qcast_manifest_zlib"], validate=True)).decode()
        elif "qcast_manifest" in metadata:
            text = metadata["qcast_manifest"]
        else:
            raise FormatError(f"{path}: a safetensors file without a qcast manifest; it was not written by qcast.save")
        manifest = json.loads(text)
    except (ValueError, zlib.error) as e:  # binascii.Error and JSONDecodeError are ValueErrors
        raise FormatError(f"{path}: the manifest cannot be read ({e}); the file was tampered with") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{path}: the manifest is not a JSON object; the file was tampered with")
    return manifest


def _what_it_is(path: str) -> str | None:
    """What a file that is not a qcast file is, with what to do, when its first bytes tell (None: they do not)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive / a plain pickle
        kind = "a PyTorch file written by torch.save (a zip archive around a pickle)" if head[:1] == b"P" else "a pickle"
        return (f"{kind}, not a qcast file. qcast.load reads files written by qcast.save (safetensors + a JSON manifest) "
                "and never unpickles, which could run code. If it holds your float model or its state_dict, load that "
                "with torch.load(path, weights_only=True), rebuild the model and quantize it: qcast.quantize(model, data)")
    if head.startswith(b"\x08") or path.endswith(".onnx"):
        return "an ONNX model, not a qcast file: qcast quantizes PyTorch models (nn.Module) and reads files of qcast.save"
    return None


def load(path: str | os.PathLike, model: nn.Module | None = None, backend: str | None = None) -> QuantizedModel:
    """Read a file written by ``save``; ``model`` (the float model) is needed only for uncaptured regions.

    ``backend``: who runs the loaded model (default: ``QuantConfig``'s default, ``"auto"`` unless ``QCAST_BACKEND``
    says otherwise): the saved QDQ graph is lowered for it as ``convert`` would. Files of versions 1-2 hold the torch
    backend's graph and load on the torch backend."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: not a file (a folder?); load() takes the path of a file written by qcast.save")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for broken files
        raise FormatError(f"{path}: {_what_it_is(path) or f'not a readable qcast file (truncated or corrupted?): {e}'}") from None
    manifest = metadata_to_manifest(metadata, path)
    try:
        return _build_loaded(manifest, tensors, model, backend, path)
    except QcastError:
        raise
    except Exception as e:  # noqa: BLE001 - a manifest that passed the checks but does not fit together
        raise FormatError(f"{path}: the file's graph cannot be rebuilt ({type(e).__name__}: {e}); it was tampered "
                          "with or written by an incompatible qcast") from None


def _build_loaded(manifest: dict, tensors: dict, model: nn.Module | None, backend: str | None,
                  path: str) -> QuantizedModel:
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{path}: not a qcast file (format={manifest.get('format')!r})")
    if not isinstance(manifest.get("version", 0), int):
        raise FormatError(f"{path}: format version {manifest.get('version')!r} is not a number; the file was tampered with")
    if manifest.get("version", 0) > VERSION:
        raise FormatError(f"{path}: written by a newer qcast (format version {manifest['version']}, this qcast reads "
                          f"up to {VERSION}); upgrade qcast to load it")
    if _digest(tensors) != manifest.get("sha256"):
        raise FormatError(f"{path}: tensor data does not match its checksum; the file was modified or corrupted")
    allowed = {type(m).__module__ for m in model.modules()} if model is not None else set()
    root: dict[str, Any] = {}
    backends()  # the kernel classes register when their backend modules are imported (KERNEL_MODULES)
    for target, spec in manifest["modules"].items():
        root[_safe_name(target, "the module", dotted=True)] = _build_module(target, spec, tensors, model)
    for target, key in manifest["attrs"].items():
        root[_safe_name(target, "the attribute", dotted=True)] = tensors[key]
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for e in manifest["nodes"]:
        args, kwargs = _dec(e["args"], env), _dec(e["kwargs"], env)
        target = e["target"]
        if e["op"] not in ("placeholder", "get_attr", "call_function", "call_module", "call_method", "output"):
            raise _refuse(f"has a node of kind {e['op']!r}")
        if e["op"] == "call_function":
            target = _resolve_fn(target, allowed)
            if target is getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
                raise _refuse(f"reads the attribute {args[1:]!r}")
        elif e["op"] == "call_method":
            _safe_name(target, "the method")
            if target.startswith("_") and target not in _SAFE_DUNDERS:
                raise _refuse(f"calls the method {target!r}")
        elif e["op"] in ("call_module", "get_attr"):
            _safe_name(target, "the attribute", dotted=True)
        elif e["op"] == "placeholder":
            _safe_name(target, "the input")
        if isinstance(kwargs, dict):
            for k in kwargs:
                _safe_name(k, "the keyword")
        node = graph.create_node(e["op"], target, tuple(args) if isinstance(args, (list, tuple)) else args, kwargs, name=e["name"])
        if e.get("qcast_name"):
            node.meta["qcast_name"], node.meta["qcast_op"] = e["qcast_name"], e.get("qcast_op")
        if "meta" in e:
            node.meta.update({k: _dec_meta(v, env) for k, v in e["meta"].items()})
        env[e["name"]] = node
    gm = fx.GraphModule(root, graph, class_name=_safe_name(manifest.get("class_name", "QcastInt8"), "the class"))
    _restore_pytree_io(gm, manifest.get("pytree"), path)
    meta = _dec(manifest["meta"], {})
    if manifest.get("graph") != "qdq":  # versions 1-2: the torch backend's lowered graph
        if backend not in (None, "torch", "auto"):
            raise FormatError(f"{path}: written by an earlier qcast (format version {manifest.get('version', 1)}), "
                              f"which kept only the torch backend's graph; it cannot be lowered for {backend!r}. "
                              "Quantize the model again with this qcast and save it")
        return QuantizedModel(gm, tuple(OpInfo(**r) for r in manifest["records"]), meta)
    return _lower_loaded(gm, meta, backend, path)


def _lower_loaded(qdq: fx.GraphModule, meta: dict, backend: str | None, path: str) -> QuantizedModel:
    """The saved QDQ graph lowered for ``backend``, as ``convert`` lowers a fresh one."""
    from .config import QuantConfig
    from .convert import lower
    from .errors import ConfigError

    try:
        config = QuantConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise FormatError(f"{path}: its QuantConfig does not validate here ({e}); register the same estimators "
                          "(qcast.observers.register_estimator) before loading") from None
    gm, rows, name, choice = lower(qdq, config, meta.get("opaque", {}), backend or QuantConfig().backend)
    meta = {**meta, "backend": name}
    saved = meta.pop("backend_choice", None) or {}
    if choice is not None:
        meta["backend_choice"] = choice
        if "plans" in saved:  # which plan quantize() kept and why: the saved QDQ graph is that plan
            choice["plans"] = saved["plans"]
    return QuantizedModel(gm, rows, meta, qdq)


__all__ = ["save", "load"]
