"""qcast's onnxruntime backend vs its torch backend vs ONNX Runtime's own ``quantize_static``, same calibration data.

    python benchmarks/onnxruntime_backend.py [--models resnet18 mobilenet_v2] [--source full] [--n 30]

Batch 1, ``QCAST_BENCH_THREADS`` threads (2; ORT ``intra_op_num_threads`` the same, no spinning), medians of ``n``
interleaved runs after warm-up (benchmarks/common.py); "qcast ORT fixed shape" is the onnxruntime backend's
export at the input's fixed shape (the backend leaves batch and spatial dims free). Also: the int8 kernels in each ORT optimized model
(QLinearConv, QGemm, QLinearAdd...), and the SQNR of each output against the float model.
qcast is prepared twice: for the torch backend (residual adds fused into the conv) and for onnxruntime
(``QuantConfig(backend="onnxruntime")``: conv output and add quantized separately, as ORT runs them).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402
import torch  # noqa: E402

import qcast  # noqa: E402
from benchmarks.common import BENCH_THREADS, build_model, latency_stats_interleaved, make_input, randomize_bn_stats, set_threads  # noqa: E402,E501
from benchmarks.peers import export_onnx, ort_quantize_static, ort_session  # noqa: E402
from qcast.backends.onnxruntime import optimized_session, session_options  # noqa: E402
from qcast.backends.onnxruntime.export import to_onnx  # noqa: E402
from qcast.convert import example_call, to_qdq  # noqa: E402
from qcast.report import sqnr  # noqa: E402

INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearConcat",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul", "QLinearSigmoid", "QLinearSoftmax")


def int8_nodes(optimized) -> dict[str, int]:
    kinds = collections.Counter(n.op_type for n in optimized.graph.node)
    return {k: v for k, v in kinds.items() if k in INT8_OPS}


def optimized_file(path: str):
    import onnxruntime as ort

    out = path + ".opt.onnx"
    ort.InferenceSession(path, session_options(BENCH_THREADS, out), providers=["CPUExecutionProvider"])
    return onnx.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--source", default="full")
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    set_threads(BENCH_THREADS)
    warnings.simplefilter("ignore")
    tmp = tempfile.mkdtemp(prefix="qcast-ort-bench-")
    for name in args.models:
        model, input_fn, src = build_model(name, args.source)
        randomize_bn_stats(model)
        calib = [make_input(input_fn, 2, seed=i)[0] for i in range(8)]
        x = make_input(input_fn, 1, seed=10_000)[0]
        observed = qcast.prepare(model, calib[0])
        qcast.calibrate(observed, calib, progress=False)
        q_torch = qcast.convert(observed, backend="torch")
        observed_ort = qcast.prepare(model, calib[0], qcast.QuantConfig(backend="onnxruntime"))
        qcast.calibrate(observed_ort, calib, progress=False)
        q_ort = qcast.convert(observed_ort, backend="onnxruntime")
        qdq = to_qdq(observed_ort)
        _, qcast_opt = optimized_session(to_onnx(qdq, *example_call(qdq)).model.SerializeToString(), BENCH_THREADS)
        # the same export at a fixed input shape (ORT can plan memory and layouts for it), as a variant
        s_fixed, _ = optimized_session(to_onnx(qdq, (x,), dynamic=False).model.SerializeToString(), BENCH_THREADS)

        fp32 = os.path.join(tmp, f"{name}.onnx")
        names = export_onnx(model, (x,), fp32)["input_names"]
        static = os.path.join(tmp, f"{name}.int8.onnx")
        ort_quantize_static(fp32, static, [(c,) for c in calib], names)
        s_static, s_fp32 = ort_session(static, BENCH_THREADS), ort_session(fp32, BENCH_THREADS)
        feed = {names[0]: x.numpy()}
        fns = {
            "qcast torch": lambda: q_torch(x),
            "qcast onnxruntime": lambda: q_ort(x),
            "qcast ORT fixed shape": lambda: torch.from_numpy(s_fixed.run(None, {"input0": x.numpy()})[0]),
            "ORT quantize_static": lambda: torch.from_numpy(s_static.run(None, feed)[0]),
            "ORT fp32": lambda: torch.from_numpy(s_fp32.run(None, feed)[0]),
        }
        with torch.no_grad():
            ref = model(x)
            outs = {k: f() for k, f in fns.items()}
            stats = latency_stats_interleaved(fns, n=args.n, warmup=5)
        fused = {"qcast onnxruntime": int8_nodes(qcast_opt), "ORT quantize_static": int8_nodes(optimized_file(static))}
        print(f"\n{name} ({src}, input {tuple(x.shape)}, {BENCH_THREADS} threads, ORT no spinning)")
        print(f"{'':22} {'median ms':>9} {'p10':>7} {'p90':>7} {'SQNR vs float':>14}  int8 nodes in ORT's optimized model")
        for k, s in stats.items():
            print(f"{k:22} {s['median']:9.2f} {s['p10']:7.2f} {s['p90']:7.2f} {sqnr(ref, outs[k]):14.2f}  "
                  f"{fused.get(k, '')}  (foreign load {s['foreign_load']:.2f})")


if __name__ == "__main__":
    main()
