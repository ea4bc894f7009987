"""Peer int8 engines, quantized on the same calibration data as qcast.

(a) PyTorch FX PTQ   ``prepare_fx``/``convert_fx`` with ``get_default_qconfig_mapping("x86")`` (in process)
(b) ONNX Runtime     fp32, and int8 via ``quant_pre_process`` + ``quantize_static`` (QDQ, activations
                     QUInt8, weights QInt8 per channel, MinMax calibration)
(c) OpenVINO         fp32 (``INFERENCE_PRECISION_HINT=f32``), its default float (bf16 where the CPU has
                     it), and int8 via NNCF ``nncf.quantize`` on ``ov.convert_model(torch_model)``

ONNX Runtime and OpenVINO are optional: they are imported lazily, and a missing package is reported
as ``"not installed"``. Each of them is measured in its own subprocess (``run_peer_subprocess``) so that
their thread pools don't tax torch's or each other's; inside that process its fp32 and int8 variants
are timed interleaved. The subprocess entry point is ``python -m benchmarks.peers --worker ENGINE --job DIR``.

Backend studies (``run.py --study openvino,onnxruntime``): one worker per engine that compiles qcast's lowering
next to that engine's own int8 model (NNCF / ``quantize_static``) and their variants (static vs dynamic shapes,
precision hints, the other plan) and times them interleaved in one process, with the compiled layers / int8 kernels
of each: ``_worker_study_openvino``, ``_worker_study_onnxruntime``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # allow `python benchmarks/peers.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402  (sets thread env vars before torch is imported)
    BENCH_THREADS,
    bn_warmup,
    build_model,
    file_size_mb,
    flatten_outputs,
    latency_stats_quiet,
    sqnr,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEER_PACKAGES = {
    "fx": ["torch"],
    "ort": ["onnxruntime", "onnx"],
    "openvino": ["openvino", "nncf"],
    # qcast on its other backends, each in its own process like the peers (the torch backend runs in run.py's)
    "qcast-openvino": ["openvino"],
    "qcast-onnxruntime": ["onnxruntime", "onnx"],
    "qcast-auto": ["torch"],
    # backend studies (run.py --study): qcast's lowering and the engine's own int8 model side by side in one process
    "study-openvino": ["openvino", "nncf"],
    "study-onnxruntime": ["onnxruntime", "onnx"],
}


def peer_versions(peer: str) -> Dict[str, str]:
    """``{package: version or "not installed"}`` for the packages a peer needs (no heavy imports)."""
    from importlib import metadata

    out = {}
    for pkg in PEER_PACKAGES[peer]:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def peer_missing(peer: str) -> Optional[str]:
    """``None`` when a peer's packages are installed, else ``"not installed: pkg, ..."``."""
    missing = [p for p, v in peer_versions(peer).items() if v == "not installed"]
    return f"not installed: {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------------------------ (a) torch FX


def fx_quantize(
    model: torch.nn.Module,
    calibration: Sequence[Tuple[Any, ...]],
    example_args: Tuple[Any, ...],
    engine: str = "x86",
) -> Tuple[torch.nn.Module, float]:
    """PyTorch FX graph-mode PTQ with the default qconfig mapping for ``engine``.

    Returns ``(quantized_module, seconds)`` (prepare + calibration + convert). Works on a deep copy.
    Sets ``torch.backends.quantized.engine = engine`` (the packed weights are made for that engine and
    it has to stay set while the model runs).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        t0 = time.perf_counter()
        m = copy.deepcopy(model).eval()
        prepared = prepare_fx(m, get_default_qconfig_mapping(engine), example_args)
        with torch.no_grad():
            for args in calibration:
                prepared(*args)
        q = convert_fx(prepared)
        seconds = time.perf_counter() - t0
    return q, seconds


# ----------------------------------------------------------------------------- (b) ONNX Runtime


def export_onnx(model: torch.nn.Module, example_args: Tuple[Any, ...], path: str, opset: int = 17,
                dynamic_dims: Tuple[int, ...] = (0,)) -> Dict[str, Any]:
    """Export ``model`` to ONNX with dynamic ``dynamic_dims`` (default: the batch dimension; ``(0, 1)`` for token
    sequences); returns names and the exporter used.

    Uses the legacy TorchScript exporter (``dynamo=False``: still present in torch 2.13, needs no
    onnxscript, takes dynamic_axes) and falls back to the torch.export-based one (needs onnxscript).
    """
    n_in = len(example_args)
    with torch.no_grad():
        n_out = len(flatten_outputs(model(*example_args)))
    input_names = [f"input{i}" for i in range(n_in)]
    output_names = [f"output{i}" for i in range(n_out)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example_args,
                path,
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={n: {d: f"dim{d}" for d in dynamic_dims} for n in input_names + output_names},
                do_constant_folding=True,
            )
        exporter = "torchscript (dynamo=False)"
    except Exception as legacy_err:  # pragma: no cover - depends on the torch build
        batch = torch.export.Dim.AUTO
        try:
            torch.onnx.export(
                model,
                example_args,
                path,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=tuple({d: batch for d in dynamic_dims} for _ in example_args),
                external_data=False,
            )
        except Exception as dynamo_err:
            raise RuntimeError(f"ONNX export failed: legacy: {legacy_err!r}; dynamo: {dynamo_err!r}")
        exporter = "torch.export (dynamo=True)"
    return {"input_names": input_names, "output_names": output_names, "exporter": exporter}


def _to_numpy_feed(args: Tuple[Any, ...], input_names: Sequence[str]) -> Dict[str, np.ndarray]:
    return {n: a.detach().cpu().numpy() for n, a in zip(input_names, args)}


def ort_quantize_static(
    fp32_path: str,
    out_path: str,
    calibration: Sequence[Tuple[Any, ...]],
    input_names: Sequence[str],
    per_channel: bool = True,
) -> float:
    """ONNX Runtime static int8 (x86 recipe: QDQ, U8 activations, S8 per-channel weights, MinMax).

    Runs ``shape_inference.quant_pre_process`` first (as ORT's docs recommend). Returns seconds.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = [_to_numpy_feed(a, input_names) for a in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    t0 = time.perf_counter()
    pre_path = out_path + ".pre.onnx"
    quant_pre_process(fp32_path, pre_path)
    quantize_static(
        pre_path,
        out_path,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        calibrate_method=CalibrationMethod.MinMax,
    )
    seconds = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        os.remove(pre_path)
    return seconds


def ort_session(path: str, threads: int = BENCH_THREADS, spin: bool = False):
    """An ``InferenceSession`` on CPU with ``threads`` intra-op threads, 1 inter-op, all optimizations.

    ``spin=False`` turns off the intra-op pool's busy-waiting after each run (ORT's default is on).
    With spinning on, two sessions timed interleaved in one process tax each other: each one's idle
    pool spins on the cores the other needs (measured on ResNet-18, 2 threads: fp32 18.5 -> 37 ms,
    int8 6.1 -> 14 ms); with it off, interleaved timings are within ~5% of a lone spinning session's.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------- (c) OpenVINO


def ov_convert(model: torch.nn.Module, example_args: Tuple[Any, ...]):
    """``openvino.convert_model`` straight from the torch module (its PyTorch frontend)."""
    import openvino as ov

    ex = example_args[0] if len(example_args) == 1 else example_args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ov.convert_model(copy.deepcopy(model).eval(), example_input=ex)


def nncf_quantize(ov_model, calibration: Sequence[Tuple[Any, ...]]):
    """NNCF post-training quantization (default preset) over the same calibration items."""
    import nncf

    items = [tuple(a.detach().cpu().numpy() for a in args) for args in calibration]
    n_samples = sum(int(args[0].shape[0]) for args in calibration)
    dataset = nncf.Dataset(items, lambda item: item[0] if len(item) == 1 else item)
    return nncf.quantize(ov_model, dataset, subset_size=n_samples)


def ov_compile(ov_model, shapes: Sequence[Sequence[int]], threads: int = BENCH_THREADS, precision: Optional[str] = None):
    """Compile for CPU at static ``shapes`` (one per input), latency hint, ``threads`` threads.

    ``precision``: ``"f32"`` forces true fp32; ``None`` keeps OpenVINO's default (bf16 on CPUs with
    avx512_bf16/AMX, f32 otherwise).
    """
    import openvino as ov

    m = ov_model.clone()
    m.reshape({m.inputs[i]: ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(m, "CPU", cfg)


def _ov_runner(compiled, args: Tuple[Any, ...]):
    req = compiled.create_infer_request()
    feed = [a.detach().cpu().numpy() for a in args]
    outs = compiled.outputs

    def run():
        res = req.infer(feed)
        return [res[o] for o in outs]

    return run


# ------------------------------------------------------------------------------ worker processes


def _load_job(job_dir: str):
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    data = torch.load(os.path.join(job_dir, "data.pt"), weights_only=True)
    model, _input_fn, _src = build_model(job["model"], job["source"])
    model.load_state_dict(torch.load(os.path.join(job_dir, "state_dict.pt"), weights_only=True))
    model.eval()
    return job, data, model


def _worker_ort(job_dir: str) -> Dict[str, Any]:
    job, data, model = _load_job(job_dir)
    import onnxruntime as ort

    res: Dict[str, Any] = {"versions": {"onnxruntime": ort.__version__, **peer_versions("ort")}}
    fp32_path = os.path.join(job_dir, "model_fp32.onnx")
    int8_path = os.path.join(job_dir, "model_int8.onnx")
    t0 = time.perf_counter()
    info = export_onnx(model, data["eval"], fp32_path)
    res["export_s"] = time.perf_counter() - t0
    res["exporter"] = info["exporter"]
    res["quantize_s"] = ort_quantize_static(fp32_path, int8_path, data["calib"], info["input_names"])
    res["size_mb"] = {"fp32": file_size_mb(fp32_path), "int8": file_size_mb(int8_path)}
    spin = bool(job.get("ort_spin", False))
    res["spinning"] = spin
    sessions = {k: ort_session(p, job["threads"], spin) for k, p in (("fp32", fp32_path), ("int8", int8_path))}
    feed = _to_numpy_feed(data["eval"], info["input_names"])
    res["sqnr"] = {k: sqnr(data["ref"], s.run(None, feed)) for k, s in sessions.items()}
    res["latency"] = {}
    for b, args in data["bench"].items():
        fb = _to_numpy_feed(args, info["input_names"])
        fns = {k: (lambda s=s: s.run(None, fb)) for k, s in sessions.items()}
        kw = dict(n=job["n"], warmup=job["warmup"], wait_s=job.get("wait_quiet", 0.0), retries=job.get("retries", 0))
        if spin:  # spinning pools can't be interleaved fairly: time one session at a time
            stats = {}
            for k, f in fns.items():
                stats.update(latency_stats_quiet({k: f}, **kw))
        else:
            stats = latency_stats_quiet(fns, **kw)
        res["latency"][str(b)] = stats
    return res


def _worker_openvino(job_dir: str) -> Dict[str, Any]:
    job, data, model = _load_job(job_dir)
    import openvino as ov
    import nncf  # noqa: F401

    res: Dict[str, Any] = {"versions": {"openvino": ov.get_version(), **peer_versions("openvino")}}
    t0 = time.perf_counter()
    fp32_model = ov_convert(model, data["eval"])
    t1 = time.perf_counter()
    int8_model = nncf_quantize(fp32_model, data["calib"])
    t2 = time.perf_counter()
    res["convert_s"] = t1 - t0
    res["quantize_s"] = t2 - t0  # convert + nncf.quantize: the whole torch -> int8 path
    res["nncf_s"] = t2 - t1
    sizes = {}
    for k, m in (("fp32", fp32_model), ("int8", int8_model)):
        xml = os.path.join(job_dir, f"ov_{k}.xml")
        ov.save_model(m, xml, compress_to_fp16=False)
        sizes[k] = file_size_mb([xml, xml[:-4] + ".bin"])
    res["size_mb"] = sizes
    variants = {"fp32": (fp32_model, "f32"), "float_default": (fp32_model, None), "int8": (int8_model, None)}
    eval_shapes = [tuple(a.shape) for a in data["eval"]]
    res["sqnr"] = {}
    for k, (m, prec) in variants.items():
        out = _ov_runner(ov_compile(m, eval_shapes, job["threads"], prec), data["eval"])()
        res["sqnr"][k] = sqnr(data["ref"], out)
    prec = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    res["float_default_precision"] = prec.to_string() if hasattr(prec, "to_string") else str(prec)
    res["latency"] = {}
    for b, args in data["bench"].items():
        shapes = [tuple(a.shape) for a in args]
        fns = {k: _ov_runner(ov_compile(m, shapes, job["threads"], prec), args) for k, (m, prec) in variants.items()}
        res["latency"][str(b)] = latency_stats_quiet(
            fns, n=job["n"], warmup=job["warmup"], wait_s=job.get("wait_quiet", 0.0), retries=job.get("retries", 0)
        )
    return res


def _worker_qcast(job_dir: str, backend: str) -> Dict[str, Any]:
    """qcast.quantize with ``backend`` on the job's calibration data, in this process alone (its engine's threads
    compete with nothing else): quantize time, SQNR, which backend ran (auto's choice and candidates), latency."""
    job, data, model = _load_job(job_dir)
    import qcast

    res: Dict[str, Any] = {"versions": {"qcast": qcast.__version__, **peer_versions(f"qcast-{backend}")}}
    t0 = time.perf_counter()
    qm = qcast.quantize(model, data["calib"], backend=backend, progress=False, check_speed=False)
    res["quantize_s"] = time.perf_counter() - t0
    res["backend"] = qm.qcast_meta["backend"]
    if "backend_choice" in qm.qcast_meta:
        res["backend_choice"] = qm.qcast_meta["backend_choice"]
    rows = qcast.explain(qm)
    weighted = [r for r in rows if r.op in ("conv1d", "conv2d", "linear")]
    engines: Dict[str, int] = {}
    for r in weighted:
        engines[r.engine] = engines.get(r.engine, 0) + 1
    res["explain"] = (f"{sum(r.precision == 'int8' for r in weighted)}/{len(weighted)} conv/linear int8 on "
                      f"{res['backend']} ({', '.join(f'{k}: {v}' for k, v in sorted(engines.items()))})")
    with torch.no_grad():
        res["sqnr"] = sqnr(data["ref"], qm(*data["eval"]))
    res["latency"] = {}
    for b, args in data["bench"].items():
        res["latency"][str(b)] = latency_stats_quiet(
            {"int8": lambda a=args: qm(*a)}, n=job["n"], warmup=job["warmup"], wait_s=job.get("wait_quiet", 0.0),
            retries=job.get("retries", 0))
    return res


# ------------------------------------------------------------------------- backend studies (--study)


def _runtime_layers(compiled) -> Dict[str, int]:
    """How many layers of each ``type:precision`` OpenVINO's CPU plugin compiled (constants, inputs, outputs and
    reshapes left out). ``Subgraph:u8`` is an eltwise chain run on its own (e.g. a residual add + FakeQuantize the
    plugin did not fuse into the conv before it); ``Reorder`` a layout/precision copy."""
    counts: Dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else "?"
        if kind in ("Const", "Input", "Output", "Reshape"):
            continue
        key = f"{kind}:{info['runtimePrecision'].astype(str) if 'runtimePrecision' in info else '?'}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _study_calibrated(model, calib, config=None):
    """(observed, QDQ graph) of qcast on the job's calibration data, planned for ``config`` (default: torch's plan)."""
    import qcast
    from qcast.convert import to_qdq

    observed = qcast.prepare(model, calib[0], config) if config is not None else qcast.prepare(model, calib[0])
    qcast.calibrate(observed, calib, progress=False)
    return observed, to_qdq(observed)


def _worker_study_openvino(job_dir: str) -> Dict[str, Any]:
    """qcast's OpenVINO lowering next to NNCF's model, every variant compiled and timed in this one process,
    interleaved (the comparison the per-engine workers cannot make: their processes run one after another, minutes
    apart on a shared machine). Variants: ``qcast`` = ``convert(backend="openvino")`` called as users call it
    (``qmodel(x)``); ``qcast raw`` = the same ov.Model compiled with the backend's settings at the input's static
    shape and called through its infer request (the engine alone, without qcast's wrapper); ``qcast snippets on`` =
    the same without the backend's ``SNIPPETS_MODE=DISABLE`` (its residual adds then run as eltwise subgraphs of their
    own); ``qcast dynamic`` = its dynamic-shape compile; ``qcast bf16`` = static, OpenVINO's default inference
    precision instead of the backend's f32;
    ``qcast add apart`` = the graph planned with the residual add apart from the conv (``QuantConfig(backend=
    "onnxruntime")``: the conv output gets its own calibrated FakeQuantize, NNCF's pattern), static, f32;
    ``nncf`` / ``nncf f32`` = NNCF's int8 model at its default precision / f32; ``ov fp32`` = OpenVINO's float model
    in f32. Also per variant: output SQNR vs float and vs qcast's QDQ simulation, and the compiled layer counts."""
    job, data, model = _load_job(job_dir)
    import openvino as ov
    import qcast
    from qcast.backends.openvino import CONV_ADD_CONFIG, settings, to_openvino
    from qcast.convert import example_call

    observed, qdq = _study_calibrated(model, data["calib"])
    _, qdq_apart = _study_calibrated(model, data["calib"], qcast.QuantConfig(backend="onnxruntime"))
    q_ov = qcast.convert(observed, backend="openvino")
    src = to_openvino(qdq, *example_call(qdq))[0]
    src_apart = to_openvino(qdq_apart, *example_call(qdq_apart))[0]
    nncf_model = nncf_quantize(ov_convert(model, data["eval"]), data["calib"])
    fp32_model = ov_convert(model, data["eval"])
    backend = settings(qdq, job["threads"])  # what the backend compiles with (precision f32, snippets off if it adds)
    # name -> (ov.Model, compile settings, static shapes?) for the compiled variants; "qcast" is the qcast wrapper
    compiled_variants = {
        "qcast raw": (src, backend, True),
        "qcast snippets on": (src, {k: v for k, v in backend.items() if k not in CONV_ADD_CONFIG}, True),
        "qcast dynamic": (src, backend, False),
        "qcast bf16": (src, {k: v for k, v in backend.items() if k != "INFERENCE_PRECISION_HINT"}, True),
        "qcast add apart": (src_apart, settings(qdq_apart, job["threads"]), True),
        "nncf": (nncf_model, {}, True), "nncf f32": (nncf_model, {"INFERENCE_PRECISION_HINT": "f32"}, True),
        "ov fp32": (fp32_model, {"INFERENCE_PRECISION_HINT": "f32"}, True)}

    def compile_variant(m, cfg, static, args):
        m = m.clone()
        if static:
            m.reshape({m.inputs[i]: ov.PartialShape(list(a.shape)) for i, a in enumerate(args)})
        cfg = {"INFERENCE_NUM_THREADS": job["threads"], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, **cfg}
        return ov.Core().compile_model(m, "CPU", cfg)

    res: Dict[str, Any] = {"versions": {"openvino": ov.get_version(), **peer_versions("openvino")}, "variants": {}}
    with torch.no_grad():
        sim = qdq(*data["eval"])
        out = q_ov(*data["eval"])
    res["variants"]["qcast"] = {"sqnr": sqnr(data["ref"], out), "sqnr_vs_sim": sqnr(sim, out)}
    for k, (m, cfg, static) in compiled_variants.items():
        c = compile_variant(m, cfg, static, data["eval"])
        out = _ov_runner(c, data["eval"])()
        res["variants"][k] = {"sqnr": sqnr(data["ref"], out), "sqnr_vs_sim": sqnr(sim, out), "layers": _runtime_layers(c)}
    res["latency"] = {}
    for b, args in data["bench"].items():
        fns = {"qcast": (lambda a=args: q_ov(*a))}
        for k, (m, cfg, static) in compiled_variants.items():
            fns[k] = _ov_runner(compile_variant(m, cfg, static, args), args)
        res["latency"][str(b)] = latency_stats_quiet(
            fns, n=job["n"], warmup=job["warmup"], wait_s=job.get("wait_quiet", 0.0), retries=job.get("retries", 0))
    return res


ORT_INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearConcat",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul", "QLinearSigmoid", "QLinearSoftmax")


def _ort_int8_nodes(optimized) -> Dict[str, int]:
    """Int8 kernels (QLinearConv, QGemm, QLinearAdd...) in ORT's optimized model and how many of each."""
    counts: Dict[str, int] = {}
    for node in optimized.graph.node:
        if node.op_type in ORT_INT8_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _worker_study_onnxruntime(job_dir: str) -> Dict[str, Any]:
    """qcast's ONNX Runtime lowering next to ORT's own ``quantize_static``, in this one process, interleaved, no
    spinning. Variants: ``qcast`` = ``convert(backend="onnxruntime")`` of the graph planned for ORT (``QuantConfig(
    backend="onnxruntime")``: residual adds apart from the conv, as ORT's QDQ fusions need), called as ``qmodel(x)``;
    ``qcast fixed shape`` = its export at the input's fixed shape in a plain session (the backend leaves the batch
    free); ``qcast torch plan`` = ``convert(backend="onnxruntime")`` of the graph planned for the torch backend (its
    conv + add convs run in float on ORT); ``ort int8`` = ``quantize_static``; ``ort fp32``. Also the int8 kernels in
    each ORT-optimized model and the output SQNR vs float."""
    job, data, model = _load_job(job_dir)
    import onnxruntime as ort
    import qcast
    from qcast.backends.onnxruntime import optimized_session
    from qcast.backends.onnxruntime.export import to_onnx
    from qcast.convert import example_call, to_qdq

    observed, _ = _study_calibrated(model, data["calib"], qcast.QuantConfig(backend="onnxruntime"))
    observed_torch, _ = _study_calibrated(model, data["calib"])
    q_ort = qcast.convert(observed, backend="onnxruntime")
    q_ort_torch_plan = qcast.convert(observed_torch, backend="onnxruntime")
    qdq = to_qdq(observed)
    _, qcast_opt = optimized_session(to_onnx(qdq, *example_call(qdq)).model.SerializeToString(), job["threads"])
    fp32_path, int8_path = os.path.join(job_dir, "study_fp32.onnx"), os.path.join(job_dir, "study_int8.onnx")
    names = export_onnx(model, data["eval"], fp32_path)["input_names"]
    ort_quantize_static(fp32_path, int8_path, data["calib"], names)
    sessions = {"ort int8": ort_session(int8_path, job["threads"]), "ort fp32": ort_session(fp32_path, job["threads"])}
    static_opt = os.path.join(job_dir, "study_int8.opt.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = static_opt
    ort.InferenceSession(int8_path, so, providers=["CPUExecutionProvider"])
    import onnx

    res: Dict[str, Any] = {"versions": {"onnxruntime": ort.__version__, **peer_versions("ort")}, "variants": {}}
    with torch.no_grad():
        res["variants"]["qcast"] = {"sqnr": sqnr(data["ref"], q_ort(*data["eval"])), "int8_nodes": _ort_int8_nodes(qcast_opt)}
        res["variants"]["qcast torch plan"] = {"sqnr": sqnr(data["ref"], q_ort_torch_plan(*data["eval"]))}
    feed = _to_numpy_feed(data["eval"], names)
    for k, s in sessions.items():
        res["variants"][k] = {"sqnr": sqnr(data["ref"], s.run(None, feed))}
    res["variants"]["ort int8"]["int8_nodes"] = _ort_int8_nodes(onnx.load(static_opt))
    res["latency"] = {}
    for b, args in data["bench"].items():
        fixed, _ = optimized_session(to_onnx(qdq, args, dynamic=False).model.SerializeToString(), job["threads"])
        fixed_feed = {i.name: a.numpy() for i, a in zip(fixed.get_inputs(), args)}
        fb = _to_numpy_feed(args, names)
        fns = {"qcast": (lambda a=args: q_ort(*a)), "qcast fixed shape": (lambda: fixed.run(None, fixed_feed)),
               "qcast torch plan": (lambda a=args: q_ort_torch_plan(*a))}
        fns.update({k: (lambda s=s: s.run(None, fb)) for k, s in sessions.items()})
        res["latency"][str(b)] = latency_stats_quiet(
            fns, n=job["n"], warmup=job["warmup"], wait_s=job.get("wait_quiet", 0.0), retries=job.get("retries", 0))
    return res


WORKERS = {"ort": _worker_ort, "openvino": _worker_openvino,
           **{f"qcast-{b}": (lambda job_dir, b=b: _worker_qcast(job_dir, b)) for b in ("openvino", "onnxruntime", "auto")},
           "study-openvino": _worker_study_openvino, "study-onnxruntime": _worker_study_onnxruntime}


def write_job(job_dir: str, model_name: str, source: str, model: torch.nn.Module, data: Dict[str, Any],
              n: int, warmup: int, threads: int = BENCH_THREADS, wait_quiet: float = 0.0,
              retries: int = 0, ort_spin: bool = False) -> None:
    """Write what a peer worker needs: the model's state_dict, inputs/reference outputs, settings."""
    os.makedirs(job_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(job_dir, "state_dict.pt"))
    torch.save(data, os.path.join(job_dir, "data.pt"))
    with open(os.path.join(job_dir, "job.json"), "w") as f:
        json.dump({"model": model_name, "source": source, "n": n, "warmup": warmup, "threads": threads,
                   "wait_quiet": wait_quiet, "retries": retries, "ort_spin": ort_spin}, f)


def run_peer_subprocess(engine: str, job_dir: str, timeout: float = 1800) -> Dict[str, Any]:
    """Run one peer worker in a fresh Python process; returns its result dict (``status`` says how)."""
    missing = peer_missing(engine)
    if missing:
        return {"status": missing}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "QCAST_BENCH_THREADS"):
        env[var] = str(BENCH_THREADS)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.peers", "--worker", engine, "--job", job_dir]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"error: timed out after {timeout:.0f}s"}
    out_path = os.path.join(job_dir, f"result_{engine}.json")
    if proc.returncode != 0 or not os.path.exists(out_path):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
        return {"status": f"error: exit {proc.returncode}: " + " | ".join(tail)}
    with open(out_path) as f:
        return json.load(f)


def _worker_main(engine: str, job_dir: str) -> int:
    out_path = os.path.join(job_dir, f"result_{engine}.json")
    try:
        res = WORKERS[engine](job_dir)
        res["status"] = "ok"
    except ImportError as e:
        res = {"status": f"not installed: {e.name or e}"}
    except Exception as e:
        traceback.print_exc()
        res = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="peer engine worker (used by benchmarks/run.py)")
    p.add_argument("--worker", choices=sorted(WORKERS), required=True)
    p.add_argument("--job", required=True, help="job directory written by write_job()")
    a = p.parse_args()
    sys.exit(_worker_main(a.worker, a.job))
