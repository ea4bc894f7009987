"""qcast command line: a thin layer over the Python API.

    qcast demo                                  quantize the bundled digits CNN, print size/latency/fidelity/layers
    qcast quantize MODULE:FACTORY --calib PATH --out FILE [--engine qnnpack]
    qcast explain FILE [--model MODULE:FACTORY]
    qcast export FILE OUT.onnx|OUT.xml           the int8 model as ONNX Runtime's / OpenVINO's own file
    qcast report FILE --model MODULE:FACTORY --inputs PATH [--json OUT] [--html OUT]
    qcast sensitivity MODULE:FACTORY --calib PATH [--mode float_one|quantize_one] [--json OUT]
    qcast ops [--engine qnnpack]                the supported-op table, from the kernel registry
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings

from . import _TORCH_QTENSOR_NOTICE
from .errors import FormatError, QcastError

EXIT_USAGE, EXIT_ERROR = 2, 1


def _load_factory(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise QcastError(f"expected MODULE:FACTORY (e.g. mypkg.models:build), got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise QcastError(f"cannot load {spec!r}: {e}") from None
    model = obj() if callable(obj) and not hasattr(obj, "forward") else obj
    return model


def _load_tensors(path: str):
    """Calibration/inputs file: a safetensors file (each tensor one batch, or keys 'input_ids'... per batch)."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise QcastError(f"{path}: no such file")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise QcastError(f"{path}: not a safetensors file of input batches ({e})") from None
    return [tensors[k] for k in sorted(tensors, key=lambda k: (len(k), k))]


def _rows_table(rows) -> str:
    w = max([len(r.name) for r in rows] + [4])
    out = [f"{'op site':<{w}}  {'op':<18} {'prec':<5} {'engine':<12} reason"]
    for r in rows:
        out.append(f"{r.name:<{w}}  {r.op:<18} {r.precision:<5} {r.engine:<12} {r.reason}")
    n8 = sum(r.precision == "int8" for r in rows)
    from .capture import WEIGHTED_OPS
    cl = [r for r in rows if r.op in WEIGHTED_OPS]
    out.append(f"{n8}/{len(rows)} ops int8; conv/linear int8: {sum(r.precision == 'int8' for r in cl)}/{len(cl)}")
    return "\n".join(out)


def cmd_ops(args) -> int:
    from .backends import backend_names, get_backend
    from .config import ENGINES
    from .backends.torch.kernels import kernels
    from .backends.torch.kernels.engines import available
    table, executor = args.backend, ""
    if args.backend is not None:
        if args.backend not in backend_names():
            hint = (f"; {args.backend!r} is an int8 engine of the torch backend: qcast ops --engine {args.backend}"
                    if args.backend in ENGINES else "")
            raise QcastError(f"unknown backend {args.backend!r}; backends: {backend_names()}{hint}")
        table = get_backend(args.backend).kernels  # the engines execute the plan of the torch kernel table
        if table != args.backend:
            executor = (f" planned by the {table} kernel table and executed by {args.backend}, which may run some of "
                        "them in float: qcast.explain() reads back what it compiled")
    rows = kernels(table)
    if args.engine is not None:
        if args.engine not in available():
            raise QcastError(f"int8 engine {args.engine!r} is not in this PyTorch build; its engines: {available()}")
        rows = [k for k in rows if args.engine in k.engines or "native" in k.engines]
    columns = backend_columns(table, args.backend)
    print(f"{'op':<20} {'table':<6} {'kind':<12} " + "".join(f"{name:<12}" for name, _ in columns)
          + f"{'engines':<28} notes")
    for k in rows:
        print(f"{k.op:<20} {k.backend:<6} {k.kind:<12} " + "".join(f"{runs_on(b, k):<12}" for _, b in columns)
              + f"{','.join(k.engines):<28} {k.notes}")
    where = (f" on engine {args.engine}" if args.engine else "") + executor
    print(f"\n{len(rows)} int8 ops{where} ('native': the op's kernel runs on whichever engine is in use). Per backend "
          "column: int8 (its own int8 kernel, or the engine given the op between quantize/dequantize points), "
          "torch-int8 (not given to the engine, run by the torch kernel between its stages), float (the engine runs "
          "it in float), torch (float, in torch). Every other op runs in float with dequantize/quantize inserted "
          "around it, and qcast.explain() says so per op, reading back what each engine compiled.")
    return 0


def backend_columns(table: str | None, only: str | None = None) -> list:
    """``(name, Backend)`` of every registered backend (installed or not: its declarations say what it would run)
    that executes the plans of kernel table ``table`` (None: any), or just ``only``."""
    from .backends import registered
    table_of = registered()
    names = [only] if only else sorted((n for n, b in table_of.items() if table is None or b.kernels == table),
                                      key=lambda n: (n != "torch", n))  # the reference executor first
    return [(n, table_of[n]) for n in names]


def runs_on(backend, kernel) -> str:
    """A backend's cell of the ``qcast ops`` table for one kernel-table entry ('-': it executes another table)."""
    return backend.runs(kernel.op, kernel.kind) if backend.kernels == kernel.backend else "-"


def _config(args):
    """--config (a JSON file) with --engine on top."""
    import qcast
    config = qcast.QuantConfig.from_json(open(args.config).read()) if args.config else qcast.QuantConfig()
    return config.replace(engine=args.engine) if args.engine else config


def cmd_quantize(args) -> int:
    import qcast
    model = _load_factory(args.model)
    calib = _load_tensors(args.calib)
    config = _config(args)
    t = time.perf_counter()
    qmodel = qcast.quantize(model, calib, config=config, num_batches=args.num_batches, backend=args.backend)
    qcast.save(qmodel, args.out)
    print(f"quantized in {time.perf_counter() - t:.1f}s -> {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    print(_rows_table(qcast.explain(qmodel)))
    return 0


def _load_saved(path: str, model, backend: str | None = None):
    """qcast.load, with the command line's fix when the file needs the float model."""
    import qcast
    try:
        return qcast.load(path, model=model, backend=backend)
    except FormatError as e:
        if getattr(e, "needs_model", None) and model is None:
            raise QcastError(f"{e.needs_model}: give the float model's factory, qcast explain {path} --model "
                             "MODULE:FACTORY (e.g. mypkg.models:build, importable from this folder)") from None
        raise


def cmd_explain(args) -> int:
    import qcast
    model = _load_factory(args.model) if args.model else None
    print(_rows_table(qcast.explain(_load_saved(args.file, model))))
    return 0


def cmd_export(args) -> int:
    import qcast
    model = _load_factory(args.model) if args.model else None
    # torch: the cheapest lowering to load with; the export is made from the file's QDQ graph either way
    qmodel = _load_saved(args.file, model, backend="torch")
    print(f"wrote {qcast.export(qmodel, args.out)}")
    return 0


def cmd_report(args) -> int:
    import qcast
    model = _load_factory(args.model)
    qmodel = _load_saved(args.file, model)
    report = qcast.compare(model, qmodel, _load_tensors(args.inputs))
    print(report.table(args.limit))
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.html:
        report.to_html(args.html)
    return 0


def cmd_sensitivity(args) -> int:
    import qcast
    model = _load_factory(args.model)
    config = _config(args)
    report = qcast.sensitivity(model, _load_tensors(args.calib), config=config, mode=args.mode,
                               num_batches=args.num_batches)
    print(report.table(args.limit))
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(out=args.out)


def _engine_flag(p) -> None:
    from .config import ENGINES
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="int8 engine for conv/linear (QuantConfig.engine): auto (default) picks the first that runs "
                        "each layer; qnnpack is PyTorch's engine on ARM (Raspberry Pi, Jetson CPUs, phones)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcast", description="Turn a PyTorch model into a fast, accurate int8 model.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize the bundled digits CNN and print what happened")
    d.add_argument("--out", default=None, help="also save the int8 model to this file")
    d.set_defaults(fn=cmd_demo)
    q = sub.add_parser("quantize", help="quantize MODULE:FACTORY with calibration batches from a safetensors file")
    q.add_argument("model", help="MODULE:FACTORY returning the float nn.Module (or MODULE:OBJECT)")
    q.add_argument("--calib", required=True, help="safetensors file; each tensor is one calibration batch")
    q.add_argument("--out", required=True, help="where to write the int8 model (.qcast)")
    q.add_argument("--config", help="QuantConfig as a JSON file")
    q.add_argument("--num-batches", type=int, default=None)
    q.add_argument("--backend", default=None, help="who runs the int8 model: auto (default: the fastest installed "
                   "backend that agrees with the simulation), torch, openvino")
    _engine_flag(q)
    q.set_defaults(fn=cmd_quantize)
    e = sub.add_parser("explain", help="per-op table of a saved int8 model")
    e.add_argument("file")
    e.add_argument("--model", help="MODULE:FACTORY of the float model (needed if the file has uncaptured regions)")
    e.set_defaults(fn=cmd_explain)
    x = sub.add_parser("export", help="write a saved int8 model as an engine's own file: .onnx (canonical QDQ, ONNX "
                       "Runtime) or .xml (OpenVINO IR)")
    x.add_argument("file", help="a file written by qcast quantize / qcast.save")
    x.add_argument("out", help="the file to write: .onnx or .xml")
    x.add_argument("--model", help="MODULE:FACTORY of the float model (needed if the file has uncaptured regions)")
    x.set_defaults(fn=cmd_export)
    r = sub.add_parser("report", help="per-layer SQNR of a saved int8 model against its float model")
    r.add_argument("file")
    r.add_argument("--model", required=True)
    r.add_argument("--inputs", required=True, help="safetensors file of input batches")
    r.add_argument("--limit", type=int, default=20)
    r.add_argument("--json")
    r.add_argument("--html")
    r.set_defaults(fn=cmd_report)
    s = sub.add_parser("sensitivity", help="per-layer sensitivity of MODULE:FACTORY (output SQNR, most sensitive first)")
    s.add_argument("model", help="MODULE:FACTORY returning the float nn.Module (or MODULE:OBJECT)")
    s.add_argument("--calib", required=True, help="safetensors file; each tensor is one batch (calibration and metric)")
    s.add_argument("--mode", choices=["float_one", "quantize_one"], default="float_one")
    s.add_argument("--config", help="QuantConfig as a JSON file")
    s.add_argument("--num-batches", type=int, default=None)
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json")
    _engine_flag(s)
    s.set_defaults(fn=cmd_sensitivity)
    o = sub.add_parser("ops", help="the supported-op table (from the kernel registry)")
    o.add_argument("--backend", default=None, help="only the ops of this backend (torch)")
    o.add_argument("--engine", default=None, help="only the ops that run int8 on this engine (onednn, x86, fbgemm, "
                   "qnnpack)")
    o.set_defaults(fn=cmd_ops)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the command line runs only qcast's own code: PyTorch's quantized-tensor deprecation notice (qcast/__init__.py)
    # is silenced wherever it is attributed
    warnings.filterwarnings("ignore", message=_TORCH_QTENSOR_NOTICE, category=UserWarning)
    try:
        return args.fn(args)
    except QcastError as e:
        print(f"qcast: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
