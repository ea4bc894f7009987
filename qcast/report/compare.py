"""compare(model, qmodel, inputs): per-op SQNR of the int8 model against float, worst first.

Both models are interpreted op by op. The float side is captured with the same passes as at quantize
time, so op names match ``explain()``. For each op: ``sqnr`` (its output in the int8 model vs float,
errors accumulated), ``sqnr_isolated`` (the int8 kernel alone, fed the float model's inputs), the
output range used and the share of saturated outputs.
"""
from __future__ import annotations

import copy
import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import bind_inputs, capture, remove_stubs
from ..config import QuantConfig
from ..data import as_call, iter_calls
from ..errors import UnsupportedError
from ..backends.torch.kernels.base import KernelModule
from ..prepare import check_model, placeholder_values, transform
from ..quantized import QuantizedModel


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref, out = ref.detach().double(), out.detach().double()
    return _db(ref.pow(2).sum().item(), (ref - out).pow(2).sum().item())


#: ops whose value is ``(output sequence, state)``: compared on the output sequence
SEQUENCE_OPS = ("lstm", "gru")


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _leaves(getattr(obj, f))]
    if hasattr(obj, "to_tuple"):
        return _leaves(obj.to_tuple())
    return []


def _float(t):
    if isinstance(t, torch.Tensor) and t.is_quantized:
        return t.dequantize()
    return t


@dataclass(frozen=True)
class LayerReport:
    name: str
    op: str
    precision: str
    engine: str
    sqnr: float
    sqnr_isolated: float | None
    range: tuple[float, float] | None
    saturation: float | None

    def __repr__(self) -> str:
        iso = "-" if self.sqnr_isolated is None else f"{self.sqnr_isolated:.1f}"
        return f"LayerReport({self.name!r}, {self.op}, {self.precision}, sqnr={self.sqnr:.1f} dB, isolated={iso})"


@dataclass(frozen=True)
class CompareReport:
    layers: tuple[LayerReport, ...]
    output_sqnr: float
    outputs_sqnr: tuple[float, ...]
    batches: int
    # layer names in graph (execution) order, for the SQNR chart; empty: report order
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # bounded random samples of the float activations of the worst layers (with an int8 range):
    # name -> (float32 values, float min, float max over all values seen)
    samples: dict = field(default_factory=dict, compare=False, repr=False)
    # where the figures come from when an engine runs the model as one compiled graph ("" on the torch backend)
    note: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return f"CompareReport(output_sqnr={self.output_sqnr:.1f} dB, layers={len(self.layers)}, batches={self.batches})"

    def table(self, limit: int | None = None) -> str:
        rows = self.layers[:limit] if limit else self.layers
        w = max([len(r.name) for r in rows] + [5])
        out = [f"{'layer':<{w}}  {'op':<18} {'prec':<5} {'sqnr dB':>8} {'isolated':>8} {'sat %':>6}"]
        for r in rows:
            iso = "" if r.sqnr_isolated is None else f"{r.sqnr_isolated:8.1f}"
            sat = "" if r.saturation is None else f"{100 * r.saturation:6.2f}"
            out.append(f"{r.name:<{w}}  {r.op:<18} {r.precision:<5} {r.sqnr:8.1f} {iso:>8} {sat:>6}")
        out.append(f"output SQNR: {self.output_sqnr:.1f} dB over {self.batches} batch(es)")
        if self.note:
            out.append(self.note)
        return "\n".join(out)

    def to_json(self, indent: int | None = 2) -> str:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        d = {"output_sqnr": clean(self.output_sqnr), "outputs_sqnr": [clean(v) for v in self.outputs_sqnr],
             "batches": self.batches,
             "layers": [{k: clean(v) for k, v in asdict(r).items()} for r in self.layers]}
        return json.dumps(d, indent=indent)

    def to_html(self, path) -> None:
        """A self-contained HTML page: per-layer SQNR chart, histograms of the worst layers' float activations with
        the int8 clipping range, and the table. Plots are inline base64 PNGs rendered by matplotlib (optional:
        ``pip install qcast[report]``); without it the page has the tables and says why the plots are missing."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.html())

    def html(self) -> str:
        """The page :meth:`to_html` writes."""
        from . import plots

        esc = html.escape
        rows = "".join(
            f"<tr><td>{esc(r.name)}</td><td>{esc(r.op)}</td><td>{esc(r.precision)}</td><td>{r.sqnr:.1f}</td>"
            f"<td>{'' if r.sqnr_isolated is None else f'{r.sqnr_isolated:.1f}'}</td>"
            f"<td>{'' if r.range is None else f'[{r.range[0]:.4g}, {r.range[1]:.4g}]'}</td>"
            f"<td>{'' if r.saturation is None else f'{100 * r.saturation:.2f}'}</td></tr>" for r in self.layers)
        Figure = plots.load()
        if Figure is None:
            figs = f'<p class="notice"><b>{esc(plots.NOTICE)}</b> (this report has tables only).</p>'
        else:
            by_name = {r.name: r for r in self.layers}
            ordered = [by_name[n] for n in self.order if n in by_name] or list(self.layers)
            figs = "<h2>Per-layer SQNR</h2>"
            if ordered:
                figs += (f'<img alt="per-layer SQNR" src="data:image/png;base64,{plots.sqnr_chart(Figure, ordered)}">')
            hist = [(by_name[n], *self.samples[n]) for n in self.samples if n in by_name]
            hist.sort(key=lambda t: t[0].sqnr)
            if hist:
                figs += ("<h2>Worst layers: float activations and the int8 clipping range</h2>"
                         '<div class="hists">')
                for r, values, fmin, fmax in hist:
                    figs += (f'<figure><img alt="activations of {esc(r.name)}" '
                             f'src="data:image/png;base64,{plots.histogram(Figure, r, values, fmin, fmax)}">'
                             f"<figcaption>{esc(r.name)}</figcaption></figure>")
                figs += "</div>"
        style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
                 "td,th{border:1px solid #999;padding:3px 6px}td:nth-child(n+4){text-align:right}"
                 "img{max-width:100%}.hists{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}"
                 ".notice{background:#fff3cd;border:1px solid #e0c36b;padding:8px}")
        return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>qcast report</title><style>{style}</style>"
                f"</head><body><h1>qcast: int8 vs float</h1>"
                f"<p>Output SQNR {self.output_sqnr:.1f} dB over {self.batches} batch(es).</p>{figs}"
                f"<h2>Layers, worst first</h2>"
                f"<table><tr><th>layer</th><th>op</th><th>precision</th><th>SQNR dB</th>"
                f"<th>isolated dB</th><th>range</th><th>saturated %</th></tr>{rows}</table></body></html>\n")


@dataclass(frozen=True)
class _QIn:
    """The params a quantized input had when its kernel was called: conv2d_add writes its result into the
    accumulator and gives that tensor the output's params, so they must be read before the call."""

    scale: float
    zero_point: int
    dtype: torch.dtype


def _qin(a):
    """A layer's input as it is at call time: a quantized tensor as its params (``_QIn``), any other tensor as a
    copy. The copy matters for the float graph: an in-place module (``Hardswish(inplace=True)``), the layer itself
    or a later reader of the same tensor, overwrites the tensor this layer read, and the isolated SQNR would feed
    the int8 kernel the mutated value instead of the float input (PaddleOCR's MobileNetV3: 11-15 dB for 30-35)."""
    if isinstance(a, torch.Tensor):
        if a.is_quantized and a.qscheme() == torch.per_tensor_affine:
            return _QIn(a.q_scale(), a.q_zero_point(), a.dtype)
        return a.clone()
    if isinstance(a, (list, tuple)):
        return type(a)(_qin(x) for x in a)
    return a


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.args_of: dict[str, tuple] = {}

    def run_node(self, n):
        name = n.meta.get("qcast_name")
        if name and n.op == "call_module":
            # quantized inputs as their params at call time (_QIn), other tensors copied (in-place ops mutate them)
            self.args_of[name] = _qin(self.fetch_args_kwargs_from_env(n)[0])
        out = super().run_node(n)
        if name and n.op not in ("placeholder", "output"):
            # clone: some int8 kernels (conv2d_add) write into an input's buffer later in the run
            self.values[name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


def _float_graph(model: nn.Module, args, kwargs, config: QuantConfig):
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        cap = capture(work, args, kwargs)
        remove_stubs(cap.gm)
        transform(cap.gm, config, placeholder_values(cap.gm, *bind_inputs(work, args, kwargs)))
    return cap.gm, lambda a, k: placeholder_values(cap.gm, *bind_inputs(work, a, k))


HIST_LAYERS = 5  # worst layers whose float activations are kept for the HTML histograms
_SAMPLE_BUDGET = 4_000_000  # float32 values sampled over all layers during the pass (16 MB), whatever the model


def compare(model: nn.Module, qmodel: QuantizedModel, inputs: Any, *, num_batches: int | None = None,
            hist_samples: int = 100_000) -> CompareReport:
    """Per-op SQNR of ``qmodel`` against ``model`` on ``inputs`` (one item or an iterable of items).

    ``hist_samples``: at most this many float activation values are sampled per layer (fewer on models with many
    layers: 4M values in all), kept for the ``HIST_LAYERS`` worst layers only, for the HTML report's histograms.
    0 disables."""
    check_model(model)
    if not isinstance(qmodel, QuantizedModel):
        raise UnsupportedError(f"compare() needs a model from qcast.quantize/convert/load, got {type(qmodel).__name__}")
    config = QuantConfig.from_dict(qmodel.qcast_meta.get("config", {}))
    calls = list(iter_calls(inputs, None, num_batches))
    fgm, bind = _float_graph(model, *calls[0], config)
    records = {r.name: r for r in qmodel.qcast_records}
    # an engine (OpenVINO, ONNX Runtime) runs the model as one compiled graph, whose inner values cannot be read: the
    # layers are replayed on the torch lowering of the same QDQ graph (auto checked they agree), the output is the
    # engine's own
    layered = qmodel.on_torch()
    engine = qmodel if layered is not qmodel else None
    qgm = layered.graph_module
    from ..smooth import mirror
    mirror(fgm, qgm)  # SmoothQuant: the float graph gets the int8 model's per-channel scales
    qnodes = {n.meta.get("qcast_name"): n for n in qgm.graph.nodes if n.meta.get("qcast_name")}
    acc: dict[str, list] = {}
    out_acc: list[list] = []
    per_layer = min(hist_samples, _SAMPLE_BUDGET // max(1, len(records)))
    per_batch = max(1, per_layer // len(calls)) if per_layer > 0 else 0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for args, kwargs in calls:
            fr, qr = _Recorder(fgm), _Recorder(qgm)
            fout = fr.run(*bind(args, kwargs))
            qout = qr.run(*placeholder_values(qgm, *bind_inputs(model, args, kwargs)))
            if engine is not None:
                qout = engine(*args, **kwargs)
            for i, (a, b) in enumerate(zip(_leaves(fout), _leaves(qout))):
                if len(out_acc) <= i:
                    out_acc.append([0.0, 0.0])
                out_acc[i][0] += a.double().pow(2).sum().item()
                out_acc[i][1] += (a.double() - _float(b).double()).pow(2).sum().item()
            for name, rec in records.items():
                if name not in fr.values or name not in qr.values:
                    continue
                fv, qv = fr.values[name], qr.values[name]
                if rec.op in SEQUENCE_OPS:  # (out, state): the row is about the output sequence
                    fv, qv = _leaves(fv)[0], _leaves(qv)[0]
                if not isinstance(fv, torch.Tensor) or not isinstance(qv, torch.Tensor):
                    continue
                s = acc.setdefault(name, {"sig": 0.0, "noise": 0.0, "isig": 0.0, "inoise": 0.0, "sat": 0, "n": 0, "range": None})
                s["sig"] += fv.double().pow(2).sum().item()
                s["noise"] += (fv.double() - _float(qv).double()).pow(2).sum().item()
                if qv.is_quantized and qv.qscheme() == torch.per_tensor_affine:
                    q = qv.int_repr()
                    zp = qv.q_zero_point()
                    qmax = 255 if qv.dtype == torch.quint8 else 127
                    qmin = 0 if qv.dtype == torch.quint8 else -128
                    s["sat"] += int((q == qmax).sum()) + (int((q == qmin).sum()) if zp != qmin else 0)
                    s["n"] += q.numel()
                    s["range"] = (qv.q_scale() * (qmin - zp), qv.q_scale() * (qmax - zp))
                    if per_batch and fv.is_floating_point() and fv.numel():
                        _sample(s, fv, per_batch, gen)
                node = qnodes.get(name)
                if node is not None and node.op == "call_module" and isinstance(qgm.get_submodule(node.target), KernelModule):
                    _isolated(s, qgm.get_submodule(node.target), qr.args_of.get(name), fgm, name, fr, fv)
    layers = []
    for name, s in acc.items():
        rec = records[name]
        iso = _db(s["isig"], s["inoise"]) if s["isig"] else None
        layers.append(LayerReport(name, rec.op, rec.precision, rec.engine, _db(s["sig"], s["noise"]), iso,
                                  s["range"], (s["sat"] / s["n"]) if s["n"] else None))
    layers.sort(key=lambda r: r.sqnr)
    outs = tuple(_db(sig, noise) for sig, noise in out_acc)
    worst = [r.name for r in layers if r.range is not None and acc[r.name].get("vals")][:HIST_LAYERS]
    samples = {n: (torch.cat(acc[n]["vals"]).numpy(), acc[n]["fmin"], acc[n]["fmax"]) for n in worst}
    order = tuple(n for n in records if n in acc)
    note = "" if engine is None else (
        f"output SQNR: the {qmodel.qcast_meta.get('backend')} engine's output; per-layer figures: the same QDQ graph "
        "replayed on the torch backend (an engine's compiled graph has no per-layer values to read)")
    return CompareReport(tuple(layers), min(outs) if outs else math.nan, outs, len(calls), order, samples, note)


def _sample(s: dict, fv: torch.Tensor, k: int, gen: torch.Generator) -> None:
    """Keep up to ``k`` random float values of this batch (and the exact min/max) for the layer's histogram."""
    flat = fv.detach().reshape(-1).cpu()
    lo, hi = flat.min().item(), flat.max().item()
    s["fmin"] = min(s.get("fmin", lo), lo)
    s["fmax"] = max(s.get("fmax", hi), hi)
    if flat.numel() > k:
        flat = flat[torch.randint(flat.numel(), (k,), generator=gen)]
    s.setdefault("vals", []).append(flat.float().clone())


def _isolated(s, kernel, qargs, fgm, name, fr: _Recorder, fv):
    """Run the int8 kernel on the float model's inputs, each quantized with the params the int8 run used for it, and
    compare with the float output of the same op. For a conv with a fused residual add (``QConv(add=True)``) both
    inputs are fed so: the conv input and the residual operand, with the params they had when the int8 run
    called the kernel (``_QIn``); the reference is the float fused pattern ``act(conv(x) + other)``. Every input
    is a fresh tensor, so conv2d_add may write into its accumulator."""
    fnode = next((n for n in fgm.graph.nodes if n.meta.get("qcast_name") == name), None)
    if fnode is None or qargs is None:
        return
    fargs = fr.args_of.get(name)
    if fargs is None:
        return
    def requant(fa, qa):
        if isinstance(qa, _QIn) and isinstance(fa, torch.Tensor):
            return torch.quantize_per_tensor(fa.float(), qa.scale, qa.zero_point, qa.dtype)
        if isinstance(qa, (list, tuple)) and isinstance(fa, (list, tuple)):
            return type(qa)(requant(x, y) for x, y in zip(fa, qa))
        return qa
    try:
        out = kernel(*[requant(fa, qa) for fa, qa in zip(fargs, qargs)])
    except Exception:  # noqa: BLE001 - isolation is best effort; the accumulated figure stands
        return
    out = out if isinstance(out, torch.Tensor) else _leaves(out)[0]  # a recurrent layer: (out, state)
    s["isig"] += fv.double().pow(2).sum().item()
    s["inoise"] += (fv.double() - _float(out).double()).pow(2).sum().item()


def _db(sig: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    return 10 * math.log10(sig / noise)
