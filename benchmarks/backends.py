"""qcast's torch backend vs its openvino backend on the same calibrated model (same QDQ graph).

    python benchmarks/backends.py [--models mobilenet_v2 resnet18] [--source full] [--n 30]

Batch 1, ``QCAST_BENCH_THREADS`` threads (2), medians of ``n`` interleaved runs after warm-up (benchmarks/common.py).
Also times variants of the openvino lowering to justify its settings: the same OpenVINO model compiled at a static
input shape, and with OpenVINO's default inference precision (bf16 on CPUs that have it) instead of f32; and
OpenVINO's own float model (f32) as a reference. SQNR of each output against the QDQ simulation and the float model.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import qcast  # noqa: E402
from benchmarks.common import BENCH_THREADS, build_model, latency_stats_interleaved, make_input, randomize_bn_stats, set_threads  # noqa: E402,E501
from qcast.convert import to_qdq  # noqa: E402
from qcast.report import sqnr  # noqa: E402


def ov_variant(qdq, shape, precision):
    """The openvino backend's model compiled at a static ``shape`` and/or another inference precision."""
    import openvino as ov

    from qcast.backends.openvino import to_openvino
    from qcast.convert import example_call

    src = to_openvino(qdq, *example_call(qdq))[0]
    if shape is not None:
        src.reshape({src.inputs[0]: ov.PartialShape(list(shape))})
    cfg = {"INFERENCE_NUM_THREADS": BENCH_THREADS, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(src, "CPU", cfg)
    req = compiled.create_infer_request()
    return lambda x: torch.from_numpy(req.infer([x.numpy()])[compiled.outputs[0]].copy())


def ov_float(model, x):
    """OpenVINO's own float model (true f32) of the float torch model: the reference engine."""
    from benchmarks.peers import ov_compile, ov_convert

    compiled = ov_compile(ov_convert(model, (x,)), [tuple(x.shape)], BENCH_THREADS, "f32")
    req = compiled.create_infer_request()
    return lambda x: torch.from_numpy(req.infer([x.numpy()])[compiled.outputs[0]].copy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    ap.add_argument("--source", default="full")
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    set_threads(BENCH_THREADS)
    warnings.simplefilter("ignore")
    for name in args.models:
        model, input_fn, src = build_model(name, args.source)
        randomize_bn_stats(model)
        calib = [make_input(input_fn, 2, seed=i)[0] for i in range(8)]
        x = make_input(input_fn, 1, seed=10_000)[0]
        observed = qcast.prepare(model, calib[0])
        qcast.calibrate(observed, calib, progress=False)
        qdq = to_qdq(observed)
        q_torch = qcast.convert(observed, backend="torch")
        q_ov = qcast.convert(observed, backend="openvino")
        fns = {
            "torch backend": lambda: q_torch(x),
            "openvino backend": lambda: q_ov(x),
            "ov static shape": ov_variant(qdq, x.shape, "f32"),
            "ov bf16 hint": ov_variant(qdq, None, None),
            "ov float f32": ov_float(model, x),
        }
        with torch.no_grad():
            ref, sim = model(x), qdq(x)
            outs = {k: (f(x) if k.startswith("ov ") else f()) for k, f in fns.items()}
        calls = {k: (lambda f=f: f(x)) if k.startswith("ov ") else f for k, f in fns.items()}
        stats = latency_stats_interleaved(calls, n=args.n, warmup=5)
        rows = [r for r in qcast.explain(q_ov) if r.op in ("conv2d", "linear")]
        engines = sorted({r.engine for r in rows})
        print(f"\n{name} ({src}, input {tuple(x.shape)}, {BENCH_THREADS} threads); openvino conv/linear engines: "
              f"{engines} over {len(rows)} layers")
        print(f"{'':18} {'median ms':>9} {'p10':>7} {'p90':>7} {'SQNR vs sim':>12} {'vs float':>9}")
        for k, s in stats.items():
            print(f"{k:18} {s['median']:9.2f} {s['p10']:7.2f} {s['p90']:7.2f} {sqnr(sim, outs[k]):12.1f} "
                  f"{sqnr(ref, outs[k]):9.2f}  (foreign load {s['foreign_load']:.2f})")


if __name__ == "__main__":
    main()
