"""Latency / size / fidelity of qcast against torch fp32 and peer int8 engines.

    python benchmarks/run.py --models resnet18,resnet50,mobilenet_v2,blazeface,vgg16,tsn_r50 --batch 1,8 \
        --peers fx,ort,openvino --calib 32 --out docs/benchmarks.md
    python benchmarks/run.py --models blazeface --peers '' --study openvino,onnxruntime   # backend studies only

Method (see docs/benchmarks.md for the figures):
* every engine is calibrated on the same ``--calib`` random samples (batches of ``--calib-batch``)
  drawn from the model's ``example_input_fn``; fidelity is the SQNR (dB) of each engine's output
  against the torch fp32 output on ``--eval-samples`` held-out samples (worst output leaf);
* torch fp32, qcast and PyTorch FX run in this process and are timed interleaved (round-robin each
  iteration, medians of ``--n``); ONNX Runtime and OpenVINO each run in their own subprocess (their
  thread pools would tax the others), each timing its fp32 and int8 variants interleaved;
* everything runs on ``QCAST_BENCH_THREADS`` (default 2) threads;
* sizes: float ``state_dict`` vs ``qcast.save`` file vs FX quantized ``state_dict`` vs the ONNX /
  OpenVINO IR files; "quantize s" is the wall time from float module to int8 artifact (ORT: excluding
  the ONNX export, reported separately in the JSON; OpenVINO: convert + nncf.quantize).

Models come from ``tests.models.ZOO`` (``ZOO[name] = (factory, example_input_fn)``), or from
``benchmarks/standin_models.py`` when the zoo lacks them (``--source standin`` forces that).
``--no-qcast`` benchmarks the peers alone (qcast not needed).

``--study openvino,onnxruntime`` adds the backend studies (``benchmarks/peers.py``): qcast's lowering for an engine
next to that engine's own int8 model (NNCF, ``quantize_static``) and their variants (static vs dynamic shapes,
precision hints, the residual add fused into the conv or apart, the engine without qcast's wrapper), compiled and
timed interleaved in one process, with what each compiled to (OpenVINO runtime layers, ORT int8 kernels).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # allow `python benchmarks/run.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402  (sets thread env vars before torch is imported)
    BENCH_THREADS,
    SOURCES,
    bn_warmup,
    build_model,
    randomize_bn_stats,
    file_size_mb,
    BUSY_CORES,
    latency_stats_quiet,
    write_page,
    machine_info,
    make_input,
    sqnr,
    state_dict_bytes,
)
from benchmarks import peers as peers_mod  # noqa: E402

import torch  # noqa: E402

ALL_PEERS = ("fx", "ort", "openvino", "qcast-openvino", "qcast-onnxruntime", "qcast-auto")
STUDIES = ("openvino", "onnxruntime")
#: every CNN of the backends issue (seeds: TSN ResNet-50 with 3 segments, torchvision VGG16, BlazeFace)
DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2,blazeface,vgg16,tsn_r50"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first[:240]}"


def import_qcast():
    """``(module, None)`` or ``(None, reason)``."""
    try:
        import qcast  # noqa: F401

        if not hasattr(qcast, "quantize"):
            return None, "qcast has no quantize() yet"
        return qcast, None
    except Exception as e:
        return None, f"qcast not importable ({type(e).__name__}: {e})"


def qcast_explain_summary(qcast, qmodel) -> Optional[str]:
    try:
        rows = qcast.explain(qmodel)
    except Exception:
        return None
    n_int8 = sum(1 for r in rows if getattr(r, "precision", None) == "int8")
    return f"{n_int8}/{len(rows)} ops int8"


def bench_model(name: str, args, qcast_mod, workdir: str) -> Dict[str, Any]:
    res: Dict[str, Any] = {"model": name, "engines": {}}
    model, input_fn, source = build_model(name, args.source, seed=0)
    res["source"] = source
    res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    n_items = max(1, math.ceil(args.calib / args.calib_batch))
    calib = [make_input(input_fn, args.calib_batch, seed=1000 + i) for i in range(n_items)]
    res["bn_stats"] = args.bn_stats
    if args.bn_stats == "random" and not randomize_bn_stats(model, seed=0):
        res["bn_stats"] = "warmup"  # tests.models not importable: derive stats from data instead
    if res["bn_stats"] == "warmup":
        bn_warmup(model, [make_input(input_fn, 8, seed=5000 + i) for i in range(4)])
    eval_args = make_input(input_fn, args.eval_samples, seed=99)
    bench_args = {b: make_input(input_fn, b, seed=500 + b) for b in args.batches}
    with torch.no_grad():
        ref = model(*eval_args)
    fp32_bytes = state_dict_bytes(model)
    res["engines"]["fp32"] = {"status": "ok", "size_mb": fp32_bytes / 1e6}
    log(f"[{name}] source={source} params={res['params_m']:.2f}M calib={n_items}x{args.calib_batch}")

    runners: Dict[str, Any] = {}  # name -> callable(*args), timed interleaved in this process
    runners["fp32"] = model

    # ---- qcast
    if args.no_qcast:
        res["engines"]["qcast"] = {"status": "skipped (--no-qcast)"}
    elif qcast_mod is None:
        res["engines"]["qcast"] = {"status": args.qcast_missing}
    else:
        e: Dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            qm = qcast_mod.quantize(model, calib, backend="torch", check_speed=False)  # the other backends: workers
            e["quantize_s"] = time.perf_counter() - t0
            with torch.no_grad():
                e["sqnr"] = sqnr(ref, qm(*eval_args))
            path = os.path.join(workdir, f"{name}.qcast")
            try:
                qcast_mod.save(qm, path)
                e["size_mb"] = file_size_mb(path)
            except Exception as se:
                e["size_note"] = _err(se)
            e["explain"] = qcast_explain_summary(qcast_mod, qm)
            e["status"] = "ok"
            runners["qcast"] = qm
        except Exception as ex:
            traceback.print_exc()
            e["status"] = _err(ex)
        res["engines"]["qcast"] = e
        log(f"[{name}] qcast: {e.get('status')} {e.get('explain') or ''}")

    # ---- PyTorch FX
    if "fx" in args.peers:
        e = {"versions": {"torch": torch.__version__}}
        try:
            qm, e["quantize_s"] = peers_mod.fx_quantize(model, calib, calib[0], engine=args.fx_engine)
            with torch.no_grad():
                e["sqnr"] = sqnr(ref, qm(*eval_args))
            e["size_mb"] = state_dict_bytes(qm) / 1e6
            e["engine"] = args.fx_engine
            e["status"] = "ok"
            runners["fx"] = qm
        except Exception as ex:
            traceback.print_exc()
            e["status"] = _err(ex)
        res["engines"]["fx"] = e
        log(f"[{name}] fx: {e['status']}")

    # ---- in-process latency, interleaved
    # PyTorch's int8 oneDNN path caches its primitive per packed weight, keyed on the first input shape it
    # sees; other shapes rebuild it on every call. Each batch size therefore gets its own copy of every
    # int8 model, first run at that batch: the best case for each engine. ("after_eval" below times the
    # models as a user has them after evaluating at another batch size.)
    res["latency"] = {}
    for b, bargs in bench_args.items():
        fresh = {k: (m if k == "fp32" else copy.deepcopy(m)) for k, m in runners.items()}
        fns = {k: (lambda m=m, a=bargs: m(*a)) for k, m in fresh.items()}
        stats = latency_stats_quiet(fns, n=args.n, warmup=args.warmup, wait_s=args.wait_quiet,
                                    retries=args.retries, log=log)
        res["latency"][str(b)] = stats
        load = next(iter(stats.values()))["foreign_load"]
        log(f"[{name}] batch {b}: " + ", ".join(f"{k} {v['median']:.2f} ms" for k, v in stats.items())
            + f" (other processes: {load:.2f} cores)")

    # ---- batch 1 on the models as evaluated above (first run at the evaluation batch)
    int8 = {k: m for k, m in runners.items() if k != "fp32"}
    if int8 and 1 in bench_args and args.eval_samples != 1:
        fns = {k: (lambda m=m, a=bench_args[1]: m(*a)) for k, m in int8.items()}
        res["after_eval"] = latency_stats_quiet(fns, n=args.n, warmup=args.warmup, wait_s=args.wait_quiet,
                                                retries=args.retries, log=log)
        log(f"[{name}] batch 1 after a first run at batch {args.eval_samples}: "
            + ", ".join(f"{k} {v['median']:.2f} ms" for k, v in res["after_eval"].items()))

    # ---- peers in their own processes
    sub = [p for p in args.peers if p != "fx"] + [f"study-{s}" for s in args.study]
    if sub:
        job_dir = os.path.join(workdir, f"job_{name}")
        data = {"calib": calib, "eval": eval_args, "ref": ref, "bench": bench_args}
        peers_mod.write_job(job_dir, name, source, model, data, n=args.n, warmup=args.warmup,
                            wait_quiet=args.wait_quiet, retries=args.retries, ort_spin=args.ort_spin)
        for p in sub:
            t0 = time.perf_counter()
            r = peers_mod.run_peer_subprocess(p, job_dir, timeout=args.peer_timeout)
            log(f"[{name}] {p}: {r.get('status')} ({time.perf_counter() - t0:.0f}s)")
            lat = r.pop("latency", {}) or {}
            for b, stats in lat.items():
                for variant, s in stats.items():
                    res["latency"].setdefault(b, {})[f"{p}_{variant}"] = s
            res["engines"][p] = r
    return res


# ------------------------------------------------------------------------------------- rendering


def _ms(stats: Dict[str, Any], key: str) -> Optional[float]:
    s = stats.get(key)
    return None if s is None else s["median"]


def _fmt(x: Optional[float], nd: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}"


def _with_speedup(ms: Optional[float], base: Optional[float]) -> str:
    if ms is None:
        return "—"
    if base is None:
        return _fmt(ms)
    return f"{ms:.2f} ({base / ms:.1f}×)"


LAT_COLS = [
    # header, latency key, speedup vs torch fp32?
    ("torch fp32", "fp32", False),
    ("qcast torch", "qcast", True),
    ("qcast OV", "qcast-openvino_int8", True),
    ("qcast ORT", "qcast-onnxruntime_int8", True),
    ("qcast auto", "qcast-auto_int8", True),
    ("FX int8", "fx", True),
    ("ORT fp32", "ort_fp32", False),
    ("ORT int8", "ort_int8", True),
    ("OV fp32", "openvino_fp32", False),
    ("OV default float", "openvino_float_default", False),
    ("OV int8", "openvino_int8", True),
]

ENGINE_COLS = [("qcast", "qcast"), ("qcast OV", "qcast-openvino"), ("qcast ORT", "qcast-onnxruntime"),
               ("qcast auto", "qcast-auto"), ("FX", "fx"), ("ORT int8", "ort"), ("OV int8", "openvino")]


TIE = 0.10  # within 10% is a tie, not a win


def _sq(e: Dict[str, Any]) -> Optional[float]:
    q = (e or {}).get("sqnr")
    return q.get("int8") if isinstance(q, dict) else q


def render_targets(results: List[Dict[str, Any]]) -> List[str]:
    """The issue-2 targets, computed from the results above (nothing here is typed in by hand)."""
    L = ["## Against the targets\n"]
    by = {r["model"]: r for r in results}
    r50 = by.get("resnet50")
    if r50 and "1" in r50["latency"]:
        lat = r50["latency"]["1"]
        f, q = _ms(lat, "fp32"), _ms(lat, "qcast")
        if f and q:
            L.append(f"- ResNet-50 batch 1, torch fp32 / qcast: {f / q:.2f}× (target ≥ 4×): "
                     f"**{'met' if f / q >= 4 else 'not met'}**. At the issue's int8 GEMM ceiling (~1.7 TOP/s on 2 cores) "
                     f"8.2 G int8 ops take {8.2e9 / 1.7e12 * 1e3:.1f} ms; qcast reaches "
                     f"{8.2e9 / (q / 1e3) / 1e12:.2f} TOP/s.")
        e = r50["engines"].get("qcast") or {}
        if e.get("quantize_s") is not None:
            L.append(f"- Time to quantize ResNet-50 (calibration included): {e['quantize_s']:.1f} s (target < 60 s): "
                     f"**{'met' if e['quantize_s'] < 60 else 'not met'}**.")
    rows = []
    for r in results:
        for b, lat in r["latency"].items():
            q, fx = _ms(lat, "qcast"), _ms(lat, "fx")
            if q and fx:
                gain = fx / q - 1
                verdict = "win" if gain > TIE else ("tie" if gain >= -TIE else "loss")
                rows.append(f"{r['model']} b{b} {gain:+.0%} ({verdict})")
    if rows:
        L.append("- qcast vs PyTorch FX latency (FX / qcast − 1; within ±10% is a tie): " + "; ".join(rows) + ".")
    acc = []
    for r in results:
        q, fx = _sq(r["engines"].get("qcast")), _sq(r["engines"].get("fx"))
        if q is not None and fx is not None:
            acc.append(f"{r['model']} {q - fx:+.1f} dB")
    if acc:
        L.append("- Output SQNR, qcast − FX (target ≥ 0): " + ", ".join(acc) + ".")
    mb = by.get("mobilenet_v2")
    if mb and "1" in mb["latency"]:
        q, ort = _ms(mb["latency"]["1"], "qcast"), _ms(mb["latency"]["1"], "ort_int8")
        if q and ort:
            L.append(f"- MobileNetV2 batch 1, qcast / ONNX Runtime int8: {q / ort:.2f}× (target ≤ 1.5×): "
                     f"**{'met' if q / ort <= 1.5 else 'not met'}**"
                     + ("" if q / ort <= 1.5 else ": PyTorch's per-call overhead around its oneDNN kernels dominates "
                        "small layers (docs/design.md); ONNX Runtime and OpenVINO execution of qcast's graph are the "
                        "roadmap's backends")
                     + ".")
    L.extend(render_backend_targets(results))
    sizes = []
    for r in results:
        e = r["engines"].get("qcast") or {}
        if e.get("size_mb") and r["engines"]["fp32"].get("size_mb"):
            ratio = e["size_mb"] / r["engines"]["fp32"]["size_mb"]
            sizes.append(f"{r['model']} {ratio:.2f}×{'' if ratio <= 0.3 else ' (over)'}")
    if sizes:
        L.append("- qcast file / float state_dict (target ≤ 0.3×): " + ", ".join(sizes) + ".")
    L.append("")
    return L


def render_backend_targets(results: List[Dict[str, Any]]) -> List[str]:
    """The backends issue's targets (issue 11), computed from the results."""
    L = []
    rows = []
    for r in results:
        nncf_sq, auto_sq = _sq(r["engines"].get("openvino")), _sq(r["engines"].get("qcast-auto"))
        for b, lat in r["latency"].items():
            a, n = _ms(lat, "qcast-auto_int8"), _ms(lat, "openvino_int8")
            if a and n:
                ok = a <= n and (auto_sq or -1e9) >= (nncf_sq if nncf_sq is not None else 1e9)
                rows.append(f"{r['model']} b{b} {a / n:.2f}× at {_fmt(auto_sq, 1)} vs {_fmt(nncf_sq, 1)} dB "
                            f"({'met' if ok else 'not met'})")
    if rows:
        L.append("- qcast auto / OpenVINO+NNCF int8 latency, at SQNR auto vs NNCF (target ≤ 1.0× at SQNR ≥ NNCF's): "
                 + "; ".join(rows) + ".")
    rows = []
    for r in results:
        for b, lat in r["latency"].items():
            q, o = _ms(lat, "qcast-onnxruntime_int8"), _ms(lat, "ort_int8")
            if q and o:
                rows.append(f"{r['model']} b{b} {q / o:.2f}× ({'met' if q <= o else 'not met'})")
    if rows:
        L.append("- qcast onnxruntime / ONNX Runtime quantize_static latency (target ≤ 1.0×): " + "; ".join(rows) + ".")
    rows = []
    for r in results:
        t, a = (r["engines"].get("qcast") or {}).get("quantize_s"), (r["engines"].get("qcast-auto") or {}).get("quantize_s")
        if t and a:
            rows.append(f"{r['model']} {a:.1f} s vs {t:.1f} s ({a / t:.1f}×)")
    if rows:
        L.append("- Quantize time with backend='auto' (all backends lowered, checked and timed) vs the torch backend "
                 "alone (target ≤ 2×): " + "; ".join(rows) + ".")
    chosen = [f"{r['model']}: {(r['engines'].get('qcast-auto') or {}).get('backend')}" for r in results
              if (r["engines"].get("qcast-auto") or {}).get("backend")]
    if chosen:
        L.append("- backend='auto' chose " + ", ".join(chosen) + " (on the first calibration batch).")
    return L


def _layer_note(v: Dict[str, Any]) -> str:
    """What an engine compiled, in a few words: OpenVINO's unfused eltwise subgraphs / reorders / float convs, or
    ORT's int8 kernels."""
    if "int8_nodes" in v:
        return ", ".join(f"{k} {n}" for k, n in v["int8_nodes"].items()) or "no int8 kernels"
    layers = v.get("layers")
    if not layers:
        return ""
    shown = {k: n for k, n in layers.items()
             if k.startswith(("Subgraph", "Eltwise", "Reorder")) or (k.split(":")[0] in ("Convolution", "FullyConnected")
                                                                     and not k.endswith((":u8", ":i8")))}
    conv = sum(n for k, n in layers.items() if k.split(":")[0] in ("Convolution", "FullyConnected"))
    int8 = sum(n for k, n in layers.items() if k.split(":")[0] in ("Convolution", "FullyConnected") and k.endswith((":u8", ":i8")))
    return f"conv/fc {int8}/{conv} int8" + "".join(f", {k} {n}" for k, n in shown.items())


def render_studies(results: List[Dict[str, Any]]) -> List[str]:
    """The backend studies (``--study``): every variant of one engine, timed interleaved in one process."""
    L: List[str] = []
    for study in STUDIES:
        key = f"study-{study}"
        rows = [r for r in results if (r["engines"].get(key) or {}).get("status") == "ok"]
        if not rows:
            continue
        L.append(f"## Backend study: {study}\n")
        L.append((_worker_doc(key) or "") + "\n")
        batches = sorted({b for r in rows for b in r["latency"]}, key=int)
        L.append("| model | variant | " + " | ".join(f"b{b} ms (p10)" for b in batches)
                 + " | SQNR vs float | vs simulation | compiled |")
        L.append("|---|---|" + "---:|" * (len(batches) + 2) + "---|")
        for r in rows:
            for name, v in r["engines"][key]["variants"].items():
                cells = []
                for b in batches:
                    st = r["latency"].get(b, {}).get(f"{key}_{name}")
                    cells.append("—" if st is None else f"{st['median']:.2f} ({st['p10']:.2f})"
                                 + (" †" if st.get("foreign_load", 0) > BUSY_CORES else ""))
                L.append(f"| {r['model']} | {name} | " + " | ".join(cells) + f" | {_fmt(v.get('sqnr'), 1)} | "
                         f"{_fmt(v.get('sqnr_vs_sim'), 1)} | {_layer_note(v)} |")
        L.append("")
    return L


def _worker_doc(key: str) -> Optional[str]:
    fn = peers_mod.WORKERS.get(key)
    doc = getattr(fn, "__doc__", None)
    return " ".join(doc.split()) if doc else None


def render_markdown(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    present = set()
    for r in results:
        for stats in r["latency"].values():
            present.update(stats)
    cols = [c for c in LAT_COLS if c[1] in present or c[1] in ("fp32", "qcast", "fx")]
    L: List[str] = []
    L.append("# qcast benchmarks\n")
    L.append(
        f"{meta['date']} · {meta['cpu']} ({meta['isa']}) · {meta['threads']} threads · torch {meta['torch']}"
        + "".join(f" · {k} {v}" for k, v in meta["peer_versions"].items())
        + "\n"
    )
    L.append(f"Command: `{meta['command']}`\n")
    ref = next((_ms(r["latency"].get("1", {}), "ort_int8") for r in results if r["model"] == "resnet50"), None)
    if ref:
        L.append(f"Absolute figures depend on the session's machine: ONNX Runtime int8 ran ResNet-50 at batch 1 in "
                 f"{ref:.2f} ms here, {ref / 6.97:.2f}× DESIGN.md's reference 6.97 ms. Compare engines within one "
                 "table.\n")
    L.append(
        "Latency: median ms of "
        f"{meta['n']} interleaved runs ({meta['warmup']} warm-up); (N×) = speedup over torch fp32 eager. "
        "torch fp32 / qcast / FX are timed interleaved in one process; ONNX Runtime and OpenVINO each in "
        "their own process (ORT with intra-op spinning "
        f"{'on, its sessions timed one after the other' if meta.get('ort_spin') else 'off, so its two sessions can be interleaved fairly'}). "
        "OV default float is OpenVINO's default inference precision "
        f"({meta.get('ov_default_precision') or 'see JSON'}).\n"
    )
    busy = False
    L.append("| model | batch | " + " | ".join(h for h, _, _ in cols) + " |")
    L.append("|---|---:|" + "---:|" * len(cols))
    for r in results:
        for b, stats in r["latency"].items():
            base = _ms(stats, "fp32")
            cells = []
            for _, k, sp in cols:
                c = _with_speedup(_ms(stats, k), base) if sp else _fmt(_ms(stats, k))
                if k in stats and stats[k].get("foreign_load", 0) > BUSY_CORES:
                    c += " †"
                    busy = True
                cells.append(c)
            L.append(f"| {r['model']} | {b} | " + " | ".join(cells) + " |")
    if busy:
        L.append(f"\n† other processes kept more than {BUSY_CORES} cores busy while this was timed: "
                 "the figure is unreliable (re-run on a quiet machine).")
    after = [r for r in results if r.get("after_eval")]
    if after:
        L.append("")
        L.append(f"Batch 1 on the int8 models as they are after evaluating them at batch {meta['eval_samples']} "
                 "(above, every batch size gets a fresh copy first run at that batch). PyTorch keys its oneDNN "
                 "primitive cache on a packed weight's first input shape; qcast keeps one packed weight per shape.\n")
        keys = [k for k in ("qcast", "fx") if any(k in r["after_eval"] for r in after)]
        L.append("| model | " + " | ".join(f"{k} ms (vs fresh)" for k in keys) + " |")
        L.append("|---|" + "---:|" * len(keys))
        for r in after:
            fresh = r["latency"].get("1", {})
            cells = []
            for k in keys:
                v, f = _ms(r["after_eval"], k), _ms(fresh, k)
                cells.append(f"{_fmt(v)} ({v / f:.2f}×)" if v and f else _fmt(v))
            L.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(
        f"Fidelity: SQNR (dB, higher is better) of each int8 engine's output vs torch fp32 on "
        f"{meta['eval_samples']} held-out random samples (worst output tensor); calibration: "
        f"{meta['calib']} random samples, the same for every engine; models have random weights (seed 0), "
        f"BatchNorm statistics: {meta['bn_stats']}. Sizes in MB: float = torch state_dict; "
        "qcast = qcast.save file; FX = quantized state_dict; ORT = int8 .onnx; OV = int8 IR (.xml+.bin). "
        "Quantize s = float module to int8 artifact (ORT excludes the ONNX export; OV includes convert_model).\n"
    )
    engine_cols = [(h, k) for h, k in ENGINE_COLS if any(k in r["engines"] for r in results)]
    hdr = (["model", "params M"] + [f"SQNR {h}" for h, _ in engine_cols] + ["MB float"]
           + [f"MB {h}" for h, _ in engine_cols] + [f"quantize s {h}" for h, _ in engine_cols])
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|---|" + "---:|" * (len(hdr) - 1))
    for r in results:
        E = r["engines"]
        row = [r["model"], _fmt(r["params_m"])]
        for _, k in engine_cols:
            e = E.get(k) or {}
            q = e.get("sqnr")
            if isinstance(q, dict):
                q = q.get("int8")
            row.append(_fmt(q, 1) if e.get("status") == "ok" else "—")
        row.append(_fmt(E["fp32"]["size_mb"]))
        for _, k in engine_cols:
            e = E.get(k) or {}
            size = e.get("size_mb")
            if isinstance(size, dict):
                size = size.get("int8")
            row.append(_fmt(size) if e.get("status") == "ok" else "—")
        for _, k in engine_cols:
            e = E.get(k) or {}
            row.append(_fmt(e.get("quantize_s"), 1) if e.get("status") == "ok" else "—")
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.extend(render_targets(results))
    L.extend(render_studies(results))
    notes = []
    for r in results:
        for k, e in r["engines"].items():
            st = (e or {}).get("status", "ok")
            if st != "ok":
                notes.append(f"- {r['model']} / {k}: {st}")
            elif k.startswith("qcast") and e.get("explain"):
                notes.append(f"- {r['model']} / {k}: {e['explain']}")
        if r.get("source") != "full":
            where = {"zoo": "tests.models.ZOO (the test suite's shrunken configuration)",
                     "standin": "benchmarks/standin_models.py"}.get(r.get("source"), r.get("source"))
            notes.append(f"- {r['model']}: model from {where}, not the real-size tests.models.FULL")
    if notes:
        L.append("Notes:\n")
        L.extend(notes)
        L.append("")
    return "\n".join(L)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Latency, size and fidelity of qcast vs torch fp32, PyTorch FX, ONNX Runtime, OpenVINO.",
    )
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated zoo names (default: %(default)s)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes to time (default: %(default)s)")
    p.add_argument("--peers", default=",".join(ALL_PEERS),
                   help="comma-separated subset of " + ",".join(ALL_PEERS) + "; '' for none (default: all)")
    p.add_argument("--study", default="",
                   help="comma-separated subset of " + ",".join(STUDIES) + ": qcast's lowering for that engine next "
                        "to the engine's own int8 model and their variants, timed interleaved in one process "
                        "(default: none)")
    p.add_argument("--calib", type=int, default=32, help="calibration samples (default: %(default)s)")
    p.add_argument("--calib-batch", type=int, default=1, help="samples per calibration item (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out samples for SQNR (default: %(default)s)")
    p.add_argument("--n", type=int, default=30, help="timed runs per candidate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs (default: %(default)s)")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown output path (default: %(default)s)")
    p.add_argument("--json", default=None, help="raw results JSON (default: OUT with .json)")
    p.add_argument("--no-qcast", action="store_true", help="skip qcast (benchmark the peers only)")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="tests.models FULL (real size) / ZOO (test size) / benchmarks stand-ins; auto = "
                        "first that has the model (default: %(default)s)")
    p.add_argument("--bn-stats", choices=("random", "warmup", "none"), default="random",
                   help="BatchNorm statistics of the random-weight models: random = tests.models."
                        "randomize_bn_stats (realistic, seeded), warmup = running stats from 4 random "
                        "batches, none = as constructed (identity) (default: %(default)s)")
    p.add_argument("--fx-engine", default="x86", help="torch quantized engine for FX (default: %(default)s)")
    p.add_argument("--peer-timeout", type=float, default=1800, help="seconds per peer subprocess")
    p.add_argument("--wait-quiet", type=float, default=60, metavar="S",
                   help="before each timing block wait up to S seconds for other processes to go idle "
                        "(default: %(default)s; timings under foreign load are flagged either way)")
    p.add_argument("--ort-spin", action="store_true",
                   help="keep ONNX Runtime's thread spinning on (then its fp32/int8 sessions are timed one "
                        "after the other, not interleaved; default: spinning off, interleaved)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-time a block this many times while other processes were busy (default: %(default)s)")
    p.add_argument("--keep-workdir", action="store_true", help="keep exported/quantized artifacts")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only re-render OUT from a results JSON written by an earlier run (no timing)")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        md = render_markdown(saved["results"], saved["meta"])
        write_page(args.out, md)  # keeps the sections other scripts own (bench_transformers.py)
        log(f"re-rendered {args.out} from {args.render}")
        return 0
    args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    bad = [x for x in args.peers if x not in ALL_PEERS]
    if bad:
        p.error(f"unknown peer(s) {bad}; choose from {','.join(ALL_PEERS)}")
    args.study = [x.strip() for x in args.study.split(",") if x.strip()]
    bad = [x for x in args.study if x not in STUDIES]
    if bad:
        p.error(f"unknown study/studies {bad}; choose from {','.join(STUDIES)}")

    qcast_mod = None
    if not args.no_qcast:
        qcast_mod, args.qcast_missing = import_qcast()
        if qcast_mod is None:
            log(f"warning: {args.qcast_missing}; continuing without it (use --no-qcast to silence)")

    meta = machine_info()
    meta.update(
        date=datetime.datetime.now().strftime("%Y-%m-%d"),
        command="python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        n=args.n, warmup=args.warmup, ort_spin=args.ort_spin, calib=args.calib, eval_samples=args.eval_samples, bn_stats=args.bn_stats,
        python=platform.python_version(),
        peer_versions={},
    )
    for peer in args.peers + [f"study-{x}" for x in args.study]:
        if peer == "fx":
            continue
        for pkg, v in peers_mod.peer_versions(peer).items():
            meta["peer_versions"][pkg] = v

    workdir = tempfile.mkdtemp(prefix="qcast_bench_")
    results = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            try:
                results.append(bench_model(name, args, qcast_mod, workdir))
            except Exception as e:
                traceback.print_exc()
                log(f"[{name}] skipped: {_err(e)}")
    finally:
        if args.keep_workdir:
            log(f"artifacts kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in results:
        ov = r["engines"].get("openvino") or {}
        if ov.get("float_default_precision"):
            meta["ov_default_precision"] = ov["float_default_precision"]

    md = render_markdown(results, meta)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_page(args.out, md)  # keeps the sections other scripts own (bench_transformers.py)
        json_path = args.json or os.path.splitext(args.out)[0] + ".json"
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
        log(f"wrote {args.out} and {json_path}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
